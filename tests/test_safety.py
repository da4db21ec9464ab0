"""What a careless or hostile user finds: files outside the run, two processes on one folder,
flipped bits, torn writes, colliding seeds, values that slip through, data read wrong."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MOONS_CONFIG, TINY_MOONS
from PIL import Image

from dumo.cli import build_parser, main
from dumo.config import load_config, save_config
from dumo.data import DataConfig, build_dataset, build_stream
from dumo.data.images import DataError, load_image_folder
from dumo.data.latents import LatentDataset
from dumo.errors import CheckpointError, ConfigError, RunDirError, TrainingError
from dumo.files import load_checkpoint, save_checkpoint
from dumo.objectives.base import ObjectiveOutput
from dumo.runs.folder import RunLock
from dumo.runs.layout import CONFIG_FILE, TRAIN_LOG, list_checkpoints
from dumo.runs.loading import load_run
from dumo.sampling import chunk_seed, generate_many
from dumo.training import Trainer, TrainResult
from dumo.training.logs import truncate_log

ROOT = Path(__file__).resolve().parents[1]
CONFIG = MOONS_CONFIG
TINY = [*TINY_MOONS, "train.eval_samples=50"]  # later overrides win


def config(steps, *extra):
    return load_config(CONFIG, [*TINY, f"train.steps={steps}", *extra])


def dumo(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "dumo", *map(str, args)], capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def run_of_4(tmp_path_factory):
    run = tmp_path_factory.mktemp("safety") / "run"
    Trainer(config(4, "train.checkpoint_every=2"), run).run()
    return run


# -- 14: --overwrite stays inside the run folder ---------------------------------------------------------


def test_overwrite_refuses_a_symlinked_checkpoints_folder_and_deletes_nothing_outside(tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "precious"
    Trainer(config(2), run).run()
    elsewhere.mkdir()
    (elsewhere / "model.safetensors").write_bytes(b"someone else's weights")
    (elsewhere / "step_00000002.safetensors").write_bytes(b"not dumo's either")
    for path in (run / "checkpoints").iterdir():
        path.unlink()
    (run / "checkpoints").rmdir()
    (run / "checkpoints").symlink_to(elsewhere)
    with pytest.raises(RunDirError, match="is a link to .*only deletes inside the run folder"):
        Trainer(config(3, "objective.beta=0.2"), run).run(overwrite=True)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["model.safetensors", "step_00000002.safetensors"]


def test_overwrite_deletes_only_dumos_own_names(tmp_path):
    run = tmp_path / "run"
    Trainer(config(2), run).run()
    (run / "checkpoints" / "notes.safetensors").write_text("mine")
    (run / "checkpoints" / "backup.tmp").write_text("mine too")
    Trainer(config(3, "objective.beta=0.2"), run).run(overwrite=True)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["backup.tmp", "notes.safetensors", "step_00000003.safetensors"]


# -- 15: one process per run folder ----------------------------------------------------------------------


def test_a_second_process_is_refused_while_a_run_holds_the_folder(run_of_4):
    before = (run_of_4 / CONFIG_FILE).read_text()
    held = RunLock(run_of_4)
    held.acquire()
    try:
        result = dumo("train", CONFIG, "--out", run_of_4, "--overwrite", *[x for o in TINY for x in ("--set", o)])
        assert result.returncode == 2, result.stderr
        assert "is in use: another dumo process is training it now" in result.stderr
        with pytest.raises(RunDirError, match="in use"):
            Trainer(config(6), run_of_4).run()  # the same process, another Trainer
    finally:
        held.release()
    assert (run_of_4 / CONFIG_FILE).read_text() == before
    assert [p.name for p in list_checkpoints(run_of_4)][-1] == "step_00000004.safetensors"


# -- 16: checksums and the config recorded in a checkpoint -----------------------------------------------


def flip_bit_in_data(path: Path, offset_from_end: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_is_caught_and_resume_falls_back_to_the_previous_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(config(4, "train.checkpoint_every=2"), run).run()
    latest = list_checkpoints(run)[-1]
    flip_bit_in_data(latest)
    with pytest.raises(CheckpointError, match="is corrupt: its data does not match the checksum"):
        load_checkpoint(latest)
    result = Trainer(config(6, "train.checkpoint_every=2"), run).run()
    assert result.resumed_from == 2 and result.step == 6
    assert "step_00000004.safetensors is corrupt" in capsys.readouterr().err
    assert (run / "checkpoints" / "step_00000004.safetensors.corrupt").is_file()  # kept aside for inspection
    straight = tmp_path / "straight"
    Trainer(config(6, "train.checkpoint_every=2"), straight).run()
    a, _ = load_checkpoint(list_checkpoints(run)[-1])
    b, _ = load_checkpoint(list_checkpoints(straight)[-1])
    assert all(torch.equal(a[k], b[k]) for k in a)  # the fallback resumed exactly


def test_resume_refuses_a_config_yaml_that_contradicts_the_checkpoint(run_of_4, tmp_path):
    run = tmp_path / "run"
    Trainer(config(2), run).run()
    edited = config(2, "objective.beta=0.2")
    save_config(edited, run / CONFIG_FILE)  # as a second start once could
    with pytest.raises(RunDirError, match=r"trained with objective.beta=0.7 but the config now says 0.2"):
        Trainer(load_config(run / CONFIG_FILE, ["train.steps=4"]), run).run()


def test_sampling_an_export_whose_config_claims_other_data_keeps_the_weights_data(run_of_4, tmp_path, capsys):
    from dumo.runs.loading import export_run

    export_run(run_of_4, tmp_path / "export")
    text = (tmp_path / "export" / CONFIG_FILE).read_text()
    (tmp_path / "export" / CONFIG_FILE).write_text(text.replace("name: moons", "name: 8gaussians"))
    capsys.readouterr()
    assert load_run(tmp_path / "export").config.data.name == "moons"
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "differs from the config recorded in" in warning[0] and " in data.name;" in warning[0]


def sample_twice(run: Path, tmp_path: Path, capsys, damage) -> tuple[np.ndarray, np.ndarray, str]:
    """2-NFE samples and eval scores of ``run`` with its config.yaml intact, then after ``damage(text)``;
    and what the second sample and eval printed on stderr."""
    outputs, stderr = [], ""
    for name in ("intact", "damaged"):
        if name == "damaged":
            (run / CONFIG_FILE).write_text(damage((run / CONFIG_FILE).read_text()))
        capsys.readouterr()
        assert main(["sample", str(run), "--nfe", "2", "-n", "64", "--out", str(tmp_path / f"{name}.npy")]) == 0
        scores = tmp_path / f"{name}.json"
        assert main(["eval", str(run), "--nfe", "2", "-n", "64", "--json", str(scores)]) == 0
        stderr = capsys.readouterr().err
        outputs.append((np.load(tmp_path / f"{name}.npy"), scores.read_text()))
    (intact, intact_scores), (damaged, damaged_scores) = outputs
    assert damaged_scores == intact_scores
    return intact, damaged, stderr


@pytest.fixture(scope="module")
def run_with_sampler_settings(tmp_path_factory):
    """A run trained with non-default sample.* keys: a config.yaml that loses them samples differently."""
    run = tmp_path_factory.mktemp("sampler") / "run"
    Trainer(config(2, "sample.schedule_power=2.0", "sample.t_start=0.9"), run).run()
    return run


def test_sample_and_eval_use_the_checkpoints_config_over_a_truncated_config_yaml(
    run_with_sampler_settings, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(run_with_sampler_settings, run)
    intact, damaged, stderr = sample_twice(run, tmp_path, capsys, lambda text: text[: text.index("objective:")])
    np.testing.assert_array_equal(damaged, intact)
    warnings = [line for line in stderr.splitlines() if "warning" in line]
    assert len(warnings) == 2, stderr  # one line each for sample and eval
    assert f"{run / CONFIG_FILE} differs from the config recorded in {run}/checkpoints/step_00000002" in warnings[0]
    assert all(
        key in warnings[0] for key in ("objective.epsilon", "optim.lr", "sample.schedule_power", "sample.t_start")
    )


def test_sample_and_eval_use_the_checkpoints_config_over_an_unreadable_config_yaml(
    run_with_sampler_settings, tmp_path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(run_with_sampler_settings, run)
    intact, damaged, stderr = sample_twice(run, tmp_path, capsys, lambda text: text[: text.index("train:") + 12])
    np.testing.assert_array_equal(damaged, intact)
    warnings = [line for line in stderr.splitlines() if "warning" in line]
    assert len(warnings) == 2 and "config.yaml is unreadable (" in warnings[0], stderr


def test_weights_without_a_recorded_config_use_config_yaml(run_with_sampler_settings, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_with_sampler_settings, run)
    latest = list_checkpoints(run)[-1]
    tensors, metadata = load_checkpoint(latest)
    del metadata["config"]  # as an older dumo wrote them
    save_checkpoint(latest, tensors, metadata)
    save_config(load_config(run / CONFIG_FILE, ["sample.t_start=0.8"]), run / CONFIG_FILE)
    capsys.readouterr()
    assert load_run(run).config.sample.t_start == 0.8
    assert "warning" not in capsys.readouterr().err


def test_a_resumed_runs_older_checkpoint_loads_without_a_warning(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(config(2, "train.checkpoint_every=2"), run).run()
    Trainer(config(4, "train.checkpoint_every=2", "train.log_every=2"), run).run()  # config.yaml now says steps 4
    capsys.readouterr()
    assert load_run(run, checkpoint=list_checkpoints(run)[0]).config.train.steps == 2
    assert "warning" not in capsys.readouterr().err


# -- 17: writes that are atomic, outputs that are not replaced silently ----------------------------------


def test_config_yaml_is_rewritten_only_when_it_changes(run_of_4):
    path = run_of_4 / CONFIG_FILE
    before = os.stat(path)
    assert save_config(load_config(path), path) is False
    assert os.stat(path).st_ino == before.st_ino and os.stat(path).st_mtime_ns == before.st_mtime_ns


def test_log_truncation_survives_torn_and_empty_logs(tmp_path):
    log = tmp_path / TRAIN_LOG
    log.write_text("step,loss\n1,0.5\n2,0.4\n3,0.")  # killed mid-append: no newline at the end
    truncate_log(log, 10)
    assert log.read_text() == "step,loss\n1,0.5\n2,0.4\n"
    truncate_log(log, 1)
    assert log.read_text() == "step,loss\n1,0.5\n"
    log.write_text("")  # a kill that left an empty file: the next row writes the header again
    truncate_log(log, 1)
    from dumo.training.logs import append_row

    append_row(log, {"step": 2, "loss": 0.1})
    assert log.read_text().splitlines() == ["step,loss", "2,0.1"]


def test_sample_refuses_to_replace_an_output_and_writes_through_a_temporary(run_of_4, tmp_path, capsys):
    out = tmp_path / "s.npy"
    out.write_bytes(b"previous output")
    assert main(["sample", str(run_of_4), "--nfe", "1", "-n", "5", "--out", str(out)]) == 2
    assert "exists; pass --force to replace it" in capsys.readouterr().err
    assert out.read_bytes() == b"previous output"
    assert main(["sample", str(run_of_4), "--nfe", "1", "-n", "5", "--out", str(out), "--force"]) == 0
    assert np.load(out).shape == (5, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npy"]  # no temporary left


def test_a_truncated_classifier_cache_is_retrained(tmp_path, monkeypatch):
    from dumo.metrics import classifier

    monkeypatch.setenv("DUMO_CACHE", str(tmp_path))
    images, labels = torch.rand(40, 1, 8, 8), torch.arange(40) % 2
    first = classifier.train_classifier(images, labels, 2, epochs=1)
    (cached,) = (tmp_path / "classifiers").iterdir()
    cached.write_bytes(cached.read_bytes()[:100])
    again = classifier.train_classifier(images, labels, 2, epochs=1)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert oct(cached.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_checkpoints_and_exports_are_readable_like_any_file_the_user_writes(run_of_4, tmp_path):
    from dumo.runs.loading import export_run

    export_run(run_of_4, tmp_path / "export")
    expected = 0o666 & ~current_umask()
    for path in [*list_checkpoints(run_of_4), tmp_path / "export" / "model.safetensors"]:
        assert path.stat().st_mode & 0o777 == expected, path


# -- 19: seeds that never meet ---------------------------------------------------------------------------


def test_chunk_seeds_of_different_seeds_never_meet():
    seeds = {chunk_seed(seed, chunk) for seed in range(50) for chunk in range(50)}
    assert len(seeds) == 2500
    from dumo.config import SampleConfig

    class Noise(torch.nn.Module):  # a "model" whose one-step sample is its noise
        heads = ("u",)

        def forward(self, x, t, r=None, cond=None):
            from dumo.models.output import ModelOutput

            return ModelOutput(u=torch.zeros_like(x))

    three = generate_many(Noise(), "dumo", (8, 2), 1, SampleConfig(), seed=3, batch_size=2)
    zero = generate_many(Noise(), "dumo", (16, 2), 1, SampleConfig(), seed=0, batch_size=2)
    assert not any(torch.equal(row, other) for row in three for other in zero)  # was: chunk 3 of seed 0


# -- 18: values that slip through ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.eps=.inf", "config key 'optim.eps' must be a finite number; got inf"),
        ("optim.lr=.inf", "config key 'optim.lr' must be a finite number"),
        ("sample.schedule_power=.inf", "'sample.schedule_power' must be a finite number"),
        ("objective.beta=.nan", "'objective.beta' must be a finite number"),
    ],
)
def test_non_finite_numbers_are_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(CONFIG, [override])


def test_duplicate_yaml_keys_and_empty_configs(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  steps: 5\nobjective:\n  beta: 0.5\ntrain:\n  seed: 3\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'train' \(lines 1 and 5 of .*twice.yaml\)"):
        load_config(twice)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    cfg = load_config(empty, ["train.steps=1", "train.progress=false", "train.eval_samples=10"])
    Trainer(cfg, tmp_path / "run").run()  # the documented defaults build (mlp: 256 wide, 4 blocks)


def test_sizes_and_outputs_are_checked_before_the_work(run_of_4, tmp_path, capsys):
    from dumo.config import SampleConfig

    class Zero(torch.nn.Module):
        def forward(self, x, t, r=None, cond=None):
            from dumo.models.output import ModelOutput

            return ModelOutput(u=torch.zeros_like(x))

    # a batch far larger than the samples asked for allocates only what is asked for
    assert generate_many(Zero(), "dumo", (3, 2), 1, SampleConfig(), batch_size=10**12).shape == (3, 2)
    assert main(["sample", str(run_of_4), "--nfe", "1", "-n", str(10**13), "--out", str(tmp_path / "x.npy")]) == 2
    assert "more than this machine's" in capsys.readouterr().err
    assert main(["sample", str(run_of_4), "--nfe", "1", "-n", "4", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["sample", str(run_of_4), "--nfe", "1000000", "--out", str(tmp_path / "x.npy")]) == 2
    assert "--nfe must be <= 1000" in capsys.readouterr().err


def test_a_batch_that_cannot_fit_is_refused_before_anything_is_allocated(tmp_path):
    with pytest.raises(ConfigError, match=r"data.batch_size=1000000000 needs at least .* GB for one step"):
        Trainer(config(1, "data.batch_size=1000000000"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# -- 21: exit statuses -----------------------------------------------------------------------------------


def test_exit_status_says_whether_the_run_finished():
    assert TrainResult(Path("."), 10).exit_status == 0
    assert TrainResult(Path("."), 5, interrupted=True, signal=signal.SIGTERM).exit_status == 143
    assert TrainResult(Path("."), 5, interrupted=True, signal=signal.SIGINT).exit_status == 130
    assert TrainResult(Path("."), 5, interrupted=True).exit_status == 3  # train.max_minutes spent


def test_an_ascii_only_stdout_does_not_fail_after_the_work(run_of_4, tmp_path):
    out = tmp_path / "échantillons.npy"
    result = dumo(
        "sample", run_of_4, "--nfe", "1", "-n", "3", "--out", out, env={**os.environ, "PYTHONIOENCODING": "ascii"}
    )
    assert result.returncode == 0, result.stderr
    assert np.load(out).shape == (3, 2) and "wrote 3 samples" in result.stdout


# -- 20: data read right ---------------------------------------------------------------------------------


def test_sixteen_bit_and_transparent_pngs_are_read_right(tmp_path):
    (tmp_path / "grey").mkdir()
    (tmp_path / "cutout").mkdir()
    Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)).save(tmp_path / "grey" / "a.png")
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red, transparent in the top half
    rgba[2:, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout" / "b.png")
    dataset = load_image_folder(str(tmp_path))
    assert dataset.class_names == ["cutout", "grey"]
    cutout, grey = dataset.images
    assert torch.allclose(grey, torch.full((3, 4, 4), 32768 / 65535))  # mid-grey, not white
    assert torch.equal(cutout[:, 0, 0], torch.ones(3))  # transparent: over white
    assert torch.equal(cutout[:, 3, 0], torch.tensor([1.0, 0.0, 0.0]))  # opaque red stays red


def image_folder(root: Path, count: int) -> Path:
    generator = np.random.default_rng(0)
    for i in range(count):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(generator.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_resume_refuses_data_that_changed_and_the_stream_never_hangs(tmp_path):
    data = image_folder(tmp_path / "images", 12)
    images = ["data.name=image_folder", f"data.path={data}", "data.batch_size=8", "model.name=DiT-S/2",
              "model.hidden_dim=16", "model.num_heads=2", "train.eval_samples=12"]  # fmt: skip
    Trainer(config(3, *images), tmp_path / "run").run()
    for path in sorted(data.rglob("*.png"))[::2]:
        path.unlink()  # the folder shrank between two invocations
    with pytest.raises(RunDirError, match=r"training data changed since .* \(image_folder: 12 items .* now\)"):
        Trainer(config(5, *images), tmp_path / "run").run()
    # a stream state saved for 12 images, restored over 6: a new epoch, not an endless loop
    big = build_dataset(DataConfig(name="image_folder", path=str(image_folder(tmp_path / "twelve", 12))))
    small = build_dataset(DataConfig(name="image_folder", path=str(data)))
    stream = build_stream(big, DataConfig(batch_size=11), seed=0)
    stream.next_batch()
    shrunk = build_stream(small, DataConfig(batch_size=4), seed=0)
    shrunk.load_state(stream.state())
    assert shrunk.next_batch().x.shape[0] == 4


def test_nan_in_a_latent_file_is_refused(tmp_path):
    path = tmp_path / "z.safetensors"
    latents = torch.randn(4, 4, 2, 2)
    latents[1, 0, 0, 0] = float("nan")
    meta = {"autoencoder_kind": "sd-vae", "autoencoder_path": "x", "scaling_factor": "1.0", "shift_factor": "0.0",
            "image_shape": "[3, 16, 16]", "source": "t", "num_classes": "2", "flipped_copies": "false"}  # fmt: skip
    save_checkpoint(path, {"latents": latents, "labels": torch.zeros(4, dtype=torch.long)}, meta, kind="dumo-latents")
    with pytest.raises(DataError, match="holds 1 non-finite latent values"):
        LatentDataset(path)


def test_a_run_that_skipped_too_many_steps_fails_saying_how_many(tmp_path):
    trainer = Trainer(config(20, "train.max_nonfinite_steps=3"), tmp_path / "run")
    real = trainer.objective
    calls = []

    def nan_every_fifth(model, batch, target_model=None, teacher_model=None):
        calls.append(1)
        out = real(model, batch, target_model)
        if len(calls) % 5 == 0:
            out = ObjectiveOutput(loss=out.loss * float("nan"), parts=out.parts, targets=out.targets)
        return out

    nan_every_fifth.wants_teacher = real.wants_teacher
    trainer.objective = nan_every_fifth
    with pytest.raises(TrainingError, match=r"4 of 20 steps were skipped .*train.max_skipped_fraction=0.01"):
        trainer.run()
    assert list_checkpoints(tmp_path / "run")[-1].name == "step_00000020.safetensors"  # saved all the same


def test_set_takes_several_pairs_after_one_flag():
    args = build_parser().parse_args(["train", "c.yaml", "--out", "r", "--set", "a.b=1", "c.d=2", "--set", "e.f=3"])
    assert args.set == ["a.b=1", "c.d=2", "e.f=3"]
    with pytest.raises(ConfigError, match="give CONFIG before --set"):
        load_config(CONFIG, ["configs/toy/moons-dumo.yaml"])


# -- a run folder is dumo's only where dumo marked it; --overwrite clears what dumo wrote -----------------


def folder_digest(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_args(run: Path, *extra: str) -> list[str]:
    return ["train", str(CONFIG), "--out", str(run), *[x for o in [*TINY, *extra] for x in ("--set", o)]]


def test_resume_and_overwrite_together_are_refused_and_touch_nothing(run_of_4, capsys):
    before = folder_digest(run_of_4)
    assert main(["train", "--resume", "--overwrite", "--out", str(run_of_4)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--resume and --overwrite contradict each other" in error[0]
    assert folder_digest(run_of_4) == before


def test_a_folder_dumo_did_not_mark_is_not_taken_over(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / CONFIG_FILE).write_text("my own notes, not a dumo config\n")
    with pytest.raises(RunDirError, match="holds files dumo did not write"):
        Trainer(config(2), folder).run()
    # --overwrite trains beside the user's files, never over them: config.yaml would be replaced
    with pytest.raises(RunDirError, match=r"was not made by dumo .* holds config.yaml"):
        Trainer(config(2), folder).run(overwrite=True)
    assert (folder / CONFIG_FILE).read_text() == "my own notes, not a dumo config\n"
    assert not (folder / "checkpoints").exists()
    (folder / CONFIG_FILE).rename(folder / "notes.yaml")
    assert Trainer(config(2), folder).run(overwrite=True).step == 2
    assert (folder / "notes.yaml").read_text() == "my own notes, not a dumo config\n"


def test_a_start_that_failed_before_its_first_checkpoint_does_not_block_the_corrected_rerun(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="train.init_from"):
        Trainer(config(2, "data.batch_size=64", f"train.init_from={tmp_path / 'missing'}"), run).run()
    assert (run / CONFIG_FILE).is_file() and not list_checkpoints(run)  # what the failed start left behind
    result = Trainer(config(2), run).run()
    assert result.step == 2 and load_config(run / CONFIG_FILE).data.batch_size == 32


def test_a_run_made_before_the_run_record_still_resumes_and_gets_one(tmp_path):
    from dumo.runs.layout import RUN_RECORD

    run = tmp_path / "run"
    Trainer(config(2), run).run()
    (run / RUN_RECORD).unlink()  # as a run written by an earlier dumo
    result = Trainer(config(4), run).run()
    assert result.resumed_from == 2 and result.step == 4
    assert (run / RUN_RECORD).is_file()


def test_overwrite_clears_what_the_record_lists_says_so_and_keeps_the_rest(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(config(2, "train.eval_every=1", "train.tensorboard=true"), run).run()
    assert len(list((run / "samples").iterdir())) == 2 and any((run / "tensorboard").iterdir())
    (run / "samples" / "my_drawing.png").write_bytes(b"mine")
    capsys.readouterr()
    Trainer(config(1, "objective.beta=0.2"), run).run(overwrite=True)
    removed = [line for line in capsys.readouterr().out.splitlines() if "--overwrite: removed" in line]
    assert len(removed) == 1
    for name in ("config.yaml", "train_log.csv", "eval_log.csv", "checkpoints", "samples", "tensorboard"):
        assert name in removed[0]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["my_drawing.png", "step_00000001.png"]
    assert not (run / "tensorboard").exists()  # the new run logs no TensorBoard: none of the old events remain
    assert [p.name for p in list_checkpoints(run)] == ["step_00000001.safetensors"]


def test_overwrite_deletes_nothing_in_a_folder_that_was_never_a_run(tmp_path):
    folder = tmp_path / "mine"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "step_00000001.safetensors").write_bytes(b"someone's weights")
    (folder / TRAIN_LOG).write_text("my own measurements\n")
    before = folder_digest(folder)
    with pytest.raises(RunDirError, match=r"was not made by dumo .* holds checkpoints, train_log.csv"):
        Trainer(config(2), folder).run(overwrite=True)
    assert folder_digest(folder) == before


def test_sample_force_replaces_a_png_folder_as_a_whole(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DUMO_CACHE", str(tmp_path / "cache"))
    data = image_folder(tmp_path / "images", 12)
    images = ["data.name=image_folder", f"data.path={data}", "data.batch_size=8", "model.name=DiT-S/2",
              "model.hidden_dim=16", "model.num_heads=2", "train.eval_samples=12"]  # fmt: skip
    Trainer(config(1, *images), tmp_path / "run").run()
    out = tmp_path / "pngs"
    sample = ["sample", str(tmp_path / "run"), "--nfe", "1", "--out", str(out)]
    assert main([*sample, "-n", "6"]) == 0
    assert main([*sample, "-n", "2", "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pngs")]  # no temporary sibling left
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main([*sample, "-n", "2", "--force"]) == 2
    assert "holds files dumo did not write (notes.txt)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "notes.txt"]


def test_a_run_whose_only_checkpoint_is_corrupt_is_never_restarted_silently(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(config(2), run).run()
    log = (run / TRAIN_LOG).read_text()
    flip_bit_in_data(list_checkpoints(run)[0])
    with pytest.raises(CheckpointError, match="could be read"):
        Trainer(config(2), run).run()
    assert "moved it to step_00000002.safetensors.corrupt" in capsys.readouterr().err
    with pytest.raises(RunDirError, match=r"no readable checkpoint .*\.corrupt.*--overwrite"):
        Trainer(config(2), run).run()
    assert (run / TRAIN_LOG).read_text() == log
    assert Trainer(config(2), run).run(overwrite=True).step == 2
    assert not (run / "checkpoints" / "step_00000002.safetensors.corrupt").exists()


# -- options that cannot take effect say so ----------------------------------------------------------------


def test_guidance_on_an_unconditional_run_and_fsdp_in_one_process_are_reported(tmp_path, capsys):
    Trainer(config(1, "objective.zeta=0.5", "train.parallel=fsdp", "train.fsdp_param_dtype=bf16",
                   "objective.target_precision=bf16"), tmp_path / "run")  # fmt: skip
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dumo: warning:")]
    assert any("objective.zeta=0.5" in line and "without guidance" in line for line in warnings)
    assert any("train.parallel=fsdp" in line and "single process" in line for line in warnings)
    assert any("train.fsdp_param_dtype=bf16" in line for line in warnings)
    # FSDP and the exact JVP cannot go together: refused in one process as under torchrun
    with pytest.raises(ConfigError, match="train.parallel=fsdp needs objective.derivative=finite_difference"):
        Trainer(config(1, "train.parallel=fsdp", "objective.derivative=jvp"), tmp_path / "jvp")


def test_uint8_outside_a_npz_and_resume_of_nothing_are_reported(run_of_4, tmp_path, capsys):
    out = tmp_path / "points.npy"
    assert main(["sample", str(run_of_4), "--nfe", "1", "-n", "5", "--out", str(out), "--uint8"]) == 2
    assert "--uint8 writes a .npz only" in capsys.readouterr().err and not out.exists()
    picture = tmp_path / "points.png"
    assert main(["sample", str(run_of_4), "--nfe", "1", "-n", "5", "--out", str(picture), "--uint8"]) == 0
    assert "dumo: warning: --uint8" in capsys.readouterr().err and picture.is_file()
    empty = tmp_path / "empty"
    assert main(["train", str(CONFIG), "--resume", "--out", str(empty)]) == 2
    assert f"--resume: {empty} holds no run to resume" in capsys.readouterr().err
    assert not empty.exists()

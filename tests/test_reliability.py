"""Runs that survive interruption, checkpoints that cannot hurt, bad input that is named."""

import errno
import hashlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MOONS_CONFIG, TINY_MOONS
from PIL import Image

from dumo.cli import main
from dumo.config import load_config
from dumo.distributed import Distributed
from dumo.errors import DumoError, TrainingError
from dumo.files import load_checkpoint
from dumo.objectives.base import ObjectiveOutput
from dumo.runs.layout import list_checkpoints
from dumo.runs.sample_files import PngFolder, ShardedNpz
from dumo.training import Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = MOONS_CONFIG
TINY = TINY_MOONS


def config(steps, *extra):
    return load_config(CONFIG, [*TINY, f"train.steps={steps}", *extra])


def final_state(run_dir):
    tensors, metadata = load_checkpoint(list_checkpoints(run_dir)[-1])
    return tensors, metadata["step"]


def assert_identical(run_a, run_b):
    a, step_a = final_state(run_a)
    b, step_b = final_state(run_b)
    assert step_a == step_b
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def dumo(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "dumo", *map(str, args)], capture_output=True, text=True, **kwargs)


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_is_bit_identical(tmp_path):
    run = tmp_path / "run"
    sets = [x for o in [*TINY, "train.steps=100000", "train.checkpoint_every=0"] for x in ("--set", o)]
    process = subprocess.Popen(
        [sys.executable, "-m", "dumo", "train", CONFIG, "--out", run, *sets],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: (run / "train_log.csv").exists() and len((run / "train_log.csv").read_text().splitlines()) > 8)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    # not 0: a scheduler must see a preempted run as unfinished (128 + SIGTERM)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert stdout.startswith("interrupted at step "), stdout
    assert "not finished (exit status 143)" in stdout
    stopped = int(stdout.split()[3])
    assert [p.name for p in list_checkpoints(run)] == [f"step_{stopped:08d}.safetensors"]
    # resume to a few steps later and compare with a run that was never interrupted
    Trainer(config(stopped + 5, "train.checkpoint_every=0"), run).run()
    Trainer(config(stopped + 5, "train.checkpoint_every=0"), tmp_path / "straight").run()
    assert_identical(run, tmp_path / "straight")


KILL_DURING_SECOND_WRITE = textwrap.dedent(
    """
    import os, sys, time
    from dumo.config import load_config
    from dumo.training import Trainer

    marker, run_dir, config_path, *overrides = sys.argv[1:]
    real_fsync = os.fsync

    def fsync_then_hang(fd):
        real_fsync(fd)
        name = os.readlink(f"/proc/self/fd/{fd}")
        if ".step_00000010.safetensors." in name:  # the second checkpoint's data is on disk, not yet renamed
            open(marker, "w").close()
            time.sleep(600)

    os.fsync = fsync_then_hang
    Trainer(load_config(config_path, overrides), run_dir).run()
    """
)


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "writing"
    overrides = [*TINY, "train.steps=20", "train.checkpoint_every=5"]
    process = subprocess.Popen(
        [sys.executable, "-c", KILL_DURING_SECOND_WRITE, marker, run, CONFIG, *overrides],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(marker.exists)
    finally:
        process.kill()  # SIGKILL: no handler runs
        process.wait()
    leftovers = [p.name for p in (run / "checkpoints").iterdir()]
    assert any(name.endswith(".tmp") for name in leftovers), leftovers  # the torn write is there...
    assert [p.name for p in list_checkpoints(run)] == ["step_00000005.safetensors"]  # ...but not listed
    assert final_state(run)[1] == "5"
    Trainer(config(20, "train.checkpoint_every=5"), run).run()  # resumes from step 5
    assert not any(p.name.endswith(".tmp") for p in (run / "checkpoints").iterdir())
    Trainer(config(20, "train.checkpoint_every=5"), tmp_path / "straight").run()
    assert_identical(run, tmp_path / "straight")


class FillingFile:
    """A file on a disk that fills up: the first ``room`` bytes are written, then ENOSPC."""

    def __init__(self, handle, room: int):
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        self.handle.write(bytes(data[: self.room]))
        self.handle.flush()  # the partial file really is on disk, as it would be
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def fill_disk_while_writing(monkeypatch, prefix: str, room: int = 1000) -> None:
    """Make every atomic write of a file whose name starts with ``prefix`` stop after ``room``
    bytes with ENOSPC, as on a full disk (other files are written as usual)."""
    filling: set[int] = set()
    real_mkstemp, real_fdopen = tempfile.mkstemp, os.fdopen

    def mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        if Path(name).name.startswith(f".{prefix}"):
            filling.add(fd)
        return fd, name

    def fdopen(fd, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)
        return FillingFile(handle, room) if fd in filling else handle

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "fdopen", fdopen)


def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    Trainer(config(2, "train.checkpoint_every=2"), run).run()
    before = load_checkpoint(run / "checkpoints" / "step_00000002.safetensors")[0]
    capsys.readouterr()
    with monkeypatch.context() as patch:
        fill_disk_while_writing(patch, "step_")
        sets = [*TINY, "train.steps=4", "train.checkpoint_every=2"]
        status = main(["train", str(CONFIG), "--out", str(run), "--set", *sets])
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    failed = run / "checkpoints" / "step_00000004.safetensors"
    assert lines[0].startswith(f"dumo: error: no space left on device writing {failed} (needed ~"), lines[0]
    assert re.search(r"needed ~[\d.]+ [kM]B, [\d.]+ [kMGT]?B free\); step_00000002.safetensors is intact", lines[0])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002.safetensors"]  # no temp file
    after = load_checkpoint(run / "checkpoints" / "step_00000002.safetensors")[0]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert Trainer(config(4, "train.checkpoint_every=2"), run).run().resumed_from == 2  # once there is room again


def test_a_full_disk_while_writing_samples_keeps_the_previous_file(tmp_path, monkeypatch, capsys):
    run, out = tmp_path / "run", tmp_path / "samples.npy"
    Trainer(config(2), run).run()
    assert main(["sample", str(run), "--nfe", "1", "-n", "5", "--out", str(out)]) == 0
    previous = out.read_bytes()
    capsys.readouterr()

    def save_until_full(file, array, *args, **kwargs):
        Path(file).write_bytes(previous[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "save", save_until_full)
    status = main(["sample", str(run), "--nfe", "1", "-n", "7", "--out", str(out), "--force"])
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"dumo: error: no space left on device writing {out} (needed more than the 100 B")
    assert out.read_bytes() == previous and sorted(p.name for p in tmp_path.iterdir()) == ["run", "samples.npy"]


def test_a_full_disk_is_found_before_sampling_into_an_npz(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    out = tmp_path / "samples.npz"
    with pytest.raises(DumoError, match=r"no space left on device writing .*arr_0.00000.npy \(needed ~4.8 kB"):
        ShardedNpz(out, 100, 16, Distributed(), {"arr_0": ((4, 4, 3), np.uint8)})
    assert list(tmp_path.iterdir()) == []  # neither parts nor their folder left behind


TINY_DIGITS = [
    "data.name=digits",
    "data.conditional=true",
    "model.name=DiT-S/2",
    "model.hidden_dim=32",
    "model.depth=1",
    "model.num_heads=2",
    "train.eval_samples=50",
    "train.checkpoint_every=0",
]


@pytest.mark.parametrize("suffix", [".npz", ""])
def test_a_sampling_that_fails_midway_leaves_nothing_beside_its_output(tmp_path, monkeypatch, suffix):
    run, out = tmp_path / "run", tmp_path / f"samples{suffix}"
    Trainer(config(2, *TINY_DIGITS), run).run()
    # a killed earlier call left its temporary folder (dumo's own name): the next call clears it
    stale = tmp_path / (".samples.npz.parts" if suffix else ".samples.writing")
    stale.mkdir()
    (stale / "arr_0.00000.npy" if suffix else stale / "000000.png").write_bytes(b"stale")
    assert main(["sample", str(run), "--nfe", "1", "-n", "4", "--batch-size", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", out.name]
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else out.read_bytes()

    calls = []

    def fail_after_the_first_chunk(self, *args):
        calls.append(args)
        if len(calls) > 1:
            raise RuntimeError("the sampler failed midway")
        return original(self, *args)

    writer, method = (ShardedNpz, "write") if suffix else (PngFolder, "sink")
    original = getattr(writer, method)
    monkeypatch.setattr(writer, method, fail_after_the_first_chunk)
    with pytest.raises(RuntimeError, match="failed midway"):
        main(["sample", str(run), "--nfe", "1", "-n", "6", "--batch-size", "2", "--out", str(out), "--force"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", out.name]  # no .parts, no .writing left
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else out.read_bytes()) == before


def test_a_full_disk_in_any_other_write_is_one_line(tmp_path, monkeypatch, capsys):
    def log_on_a_full_disk(path, row):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("dumo.training.logs.append_row", log_on_a_full_disk)
    status = main(["train", str(CONFIG), "--out", str(tmp_path / "run"), "--set", *TINY, "train.steps=2"])
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    log = tmp_path / "run" / "train_log.csv"
    assert lines == [f"dumo: error: no space left on device writing {log}; free some space and run again"]


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    trainer = Trainer(config(50, "train.checkpoint_every=3", "train.max_nonfinite_steps=3"), tmp_path / "run")
    real_objective = trainer.objective
    calls = []

    def sometimes_nan(model, batch, target_model=None, teacher_model=None):
        calls.append(1)
        out = real_objective(model, batch, target_model)
        if len(calls) in (2,) or len(calls) >= 6:
            out = ObjectiveOutput(loss=out.loss * float("nan"), parts=out.parts, targets=out.targets)
        return out

    sometimes_nan.wants_teacher = real_objective.wants_teacher
    trainer.objective = sometimes_nan
    with pytest.raises(TrainingError) as error:
        trainer.run()
    message = str(error.value)
    assert "3 steps in a row at step 8" in message and "loss_u=" in message
    last_good = Path(message.split("last good checkpoint: ")[1])
    assert last_good == list_checkpoints(tmp_path / "run")[-1]
    assert all(torch.isfinite(t).all() for t in load_checkpoint(last_good)[0].values() if t.is_floating_point())
    assert trainer.skipped_steps == 4  # step 2, then 6, 7, 8
    weights = [p for p in trainer.model.parameters()]
    assert all(torch.isfinite(p).all() for p in weights)  # no NaN ever reached the weights


def test_export_then_sample_without_training_state(tmp_path):
    Trainer(config(6), tmp_path / "run").run()
    result = dumo("export", tmp_path / "run", tmp_path / "shared")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["config.yaml", "model.safetensors"]
    tensors, _ = load_checkpoint(tmp_path / "shared" / "model.safetensors", kind="dumo-model")
    assert not any(k.startswith(("optimizer", "rng")) for k in tensors)
    for source in ("run", "shared"):
        out = tmp_path / f"{source}.npy"
        assert dumo("sample", tmp_path / source, "--nfe", 1, "--num", 20, "--out", out).returncode == 0
    assert np.array_equal(np.load(tmp_path / "run.npy"), np.load(tmp_path / "shared.npy"))


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("existing") / "run"
    Trainer(config(4), run).run()
    return run


DATA = ["--set", "model.name=DiT-S/2", "--set", "model.hidden_dim=32", "--set", "model.num_heads=2", "--set"]
BAD_INPUTS = [
    # (name, arguments with {run} and {tmp} placeholders, fragment of the one-line message)
    (
        "unknown key",
        ["train", CONFIG, "--out", "{run}", "--set", "objective.bta=1"],
        "unknown config key 'objective.bta'",
    ),
    (
        "wrong type",
        ["train", CONFIG, "--out", "{run}", "--set", "train.steps=many"],
        "'train.steps' must be an integer",
    ),
    ("beta out of range", ["train", CONFIG, "--out", "{run}", "--set", "objective.beta=1.5"], "objective.beta must be"),
    ("negative batch", ["train", CONFIG, "--out", "{run}", "--set", "data.batch_size=-2"], "data.batch_size must be"),
    ("invalid YAML", ["train", "{tmp}/bad.yaml", "--out", "{tmp}/new"], "is not valid YAML"),
    ("missing config", ["train", "{tmp}/none.yaml", "--out", "{tmp}/new"], "config file not found"),
    ("different run", ["train", CONFIG, "--out", "{run}", "--set", "objective.beta=0.1"], "holds a different run"),
    ("resume nothing", ["train", "--resume", "--out", "{tmp}/empty"], "holds no run to resume"),
    ("nfe < 1", ["sample", "{run}", "--nfe", "0", "--num", "5", "--out", "{tmp}/x.npy"], "--nfe must be >= 1"),
    ("zero samples", ["sample", "{run}", "--nfe", "1", "--num", "0", "--out", "{tmp}/x.npy"], "--num must be >= 1"),
    ("out is a folder", ["sample", "{run}", "--nfe", "1", "--num", "5", "--out", "{tmp}"], "is a directory"),
    ("bad out suffix", ["sample", "{run}", "--nfe", "1", "--num", "5", "--out", "{tmp}/x.txt"], "must end in .npy"),
    ("missing run dir", ["sample", "{tmp}/nowhere", "--nfe", "1", "--num", "5", "--out", "{tmp}/x.npy"], "not found"),
    ("not a run dir", ["eval", "{tmp}", "--nfe", "1"], "is not a dumo run directory"),
    ("bad times", ["sample", "{run}", "--nfe", "2", "--out", "{tmp}/x.npy", "--times", "0.5,0.9"], "decreasing"),
    ("class of unconditional", ["sample", "{run}", "--nfe", "1", "--out", "{tmp}/x.npy", "--class", "1"], "uncondit"),
    ("export onto data", ["export", "{run}", "{run}"], "is not empty"),
    (
        "missing dataset",
        ["train", CONFIG, "--out", "{tmp}/new", *DATA, "data.name=fashion_mnist", "--set", "data.path={tmp}/nothing"],
        "apt-get install dataset-fashion-mnist",
    ),
    (
        "empty dataset",
        ["train", CONFIG, "--out", "{tmp}/new", *DATA, "data.name=image_folder", "--set", "data.path={tmp}/empty"],
        "no images",
    ),
    (
        "mixed image sizes",
        ["train", CONFIG, "--out", "{tmp}/new", *DATA, "data.name=image_folder", "--set", "data.path={tmp}/mixed"],
        "images of mixed sizes",
    ),
    (
        "empty class folder",
        ["train", CONFIG, "--out", "{tmp}/new", *DATA, "data.name=image_folder", "--set", "data.path={tmp}/classes"],
        "classes/owl has no images",
    ),
]


@pytest.mark.parametrize("name,arguments,fragment", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gives_one_line_and_leaves_runs_untouched(name, arguments, fragment, existing_run, tmp_path):
    (tmp_path / "bad.yaml").write_text("train: {steps: [1, 2\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "mixed").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "a.png")
    Image.new("RGB", (8, 6)).save(tmp_path / "mixed" / "b.png")
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    (tmp_path / "classes" / "owl").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "classes" / "cat" / "a.png")
    before = digest(existing_run)
    args = [str(a).format(run=existing_run, tmp=tmp_path) for a in arguments]
    result = dumo(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dumo: error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert digest(existing_run) == before
    assert not (tmp_path / "new").exists()


def test_debug_flag_shows_the_traceback(tmp_path):
    result = dumo("--debug", "train", CONFIG, "--out", tmp_path / "a", "--set", "x.y=1")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_overwrite_replaces_a_different_run(tmp_path):
    run = tmp_path / "run"
    Trainer(config(4), run).run()
    (run / "notes.txt").write_text("mine")
    sets = [x for o in [*TINY, "train.steps=3", "objective.beta=0.2"] for x in ("--set", o)]
    result = dumo("train", CONFIG, "--out", run, "--overwrite", *sets)
    assert result.returncode == 0, result.stderr
    assert load_config(run / "config.yaml").objective.beta == 0.2
    assert [p.name for p in list_checkpoints(run)] == ["step_00000003.safetensors"]
    assert (run / "notes.txt").read_text() == "mine"  # only dumo's own files are removed


def test_resume_flag_uses_the_runs_config(tmp_path):
    run = tmp_path / "run"
    Trainer(config(4), run).run()
    result = dumo("train", "--resume", "--out", run, "--set", "train.steps=6")
    assert result.returncode == 0, result.stderr
    assert "resumed from step 4" in result.stdout and "finished at step 6" in result.stdout
    assert os.path.exists(run / "checkpoints" / "step_00000006.safetensors")


def test_image_run_resumes_bit_identically(tmp_path):
    digits = [
        "data.name=digits",
        "data.conditional=true",
        "data.batch_size=500",  # crosses epoch boundaries of the 1,797 images
        "model.name=DiT-S/2",
        "model.hidden_dim=32",
        "model.depth=1",
        "model.num_heads=2",
        "objective.zeta=0.5",
        "train.eval_samples=50",
        "train.checkpoint_every=0",
    ]
    Trainer(config(8, *digits), tmp_path / "straight").run()
    Trainer(config(5, *digits), tmp_path / "split").run()
    Trainer(config(8, *digits), tmp_path / "split").run()
    assert_identical(tmp_path / "straight", tmp_path / "split")

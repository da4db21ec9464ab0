"""The command line as a user runs it: subprocesses of ``python -m dumo``."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from dumo.config import load_config
from dumo.files import load_checkpoint
from dumo.runs.layout import list_checkpoints
from dumo.training import Trainer

TINY = [
    "model.hidden_dim=16",
    "model.depth=1",
    "data.batch_size=32",
    "train.eval_samples=200",
    "train.log_every=5",
    "train.checkpoint_every=10",
    "train.progress=false",
]


def dumo(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dumo", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def sets(overrides):
    return [item for o in overrides for item in ("--set", o)]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, configs_dir):
    run = tmp_path_factory.mktemp("runs") / "dumo"
    result = dumo("train", configs_dir / "toy/moons-dumo.yaml", "--out", run, *sets([*TINY, "train.steps=20"]))
    assert result.returncode == 0, result.stderr
    assert "finished at step 20" in result.stdout
    return run


@pytest.fixture(scope="module")
def configs_dir(request):
    return request.config.rootpath / "configs"


def test_train_writes_config_logs_and_checkpoints(trained_run):
    assert (trained_run / "config.yaml").is_file()
    assert (trained_run / "train_log.csv").read_text().startswith("step,loss,loss_v,loss_u")
    assert [p.name for p in list_checkpoints(trained_run)] == ["step_00000010.safetensors", "step_00000020.safetensors"]


def test_sample_npy_in_original_coordinates(trained_run, tmp_path):
    out = tmp_path / "s.npy"
    result = dumo("sample", trained_run, "--nfe", 2, "--num", 50, "--out", out, "--seed", 3)
    assert result.returncode == 0, result.stderr
    points = np.load(out)
    assert points.shape == (50, 2) and points.dtype == np.float64 and np.isfinite(points).all()
    again = tmp_path / "again.npy"
    dumo("sample", trained_run, "--nfe", 2, "--num", 50, "--out", again, "--seed", 3)
    assert np.array_equal(points, np.load(again))  # seeded


def test_sample_png_and_eval(trained_run, tmp_path):
    out = tmp_path / "s.png"
    assert dumo("sample", trained_run, "--nfe", 1, "--num", 100, "--out", out).returncode == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = dumo("eval", trained_run, "--nfe", 1, 2, "--num", 100)
    assert result.returncode == 0, result.stderr
    assert "1 NFE  MMD" in result.stdout and "2 NFE  MMD" in result.stdout


def test_resume_through_the_cli_continues_from_the_last_checkpoint(trained_run, configs_dir):
    result = dumo("train", configs_dir / "toy/moons-dumo.yaml", "--out", trained_run, *sets([*TINY, "train.steps=30"]))
    assert result.returncode == 0, result.stderr
    assert "resumed from step 20" in result.stdout and "finished at step 30" in result.stdout


def tiny_config(configs_dir, name, steps):
    return load_config(configs_dir / f"toy/{name}.yaml", [*TINY, f"train.steps={steps}"])


@pytest.mark.parametrize("name", ["moons-dumo", "moons-meanflow", "moons-fm"])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, configs_dir, name):
    Trainer(tiny_config(configs_dir, name, 25), tmp_path / "straight").run()
    Trainer(tiny_config(configs_dir, name, 10), tmp_path / "split").run()  # stops at step 10
    Trainer(tiny_config(configs_dir, name, 25), tmp_path / "split").run()  # a new process would do the same
    a, meta_a = load_checkpoint(list_checkpoints(tmp_path / "straight")[-1])
    b, meta_b = load_checkpoint(list_checkpoints(tmp_path / "split")[-1])
    assert meta_a["step"] == meta_b["step"] == "25"
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def test_help_explains_every_command():
    for command in ("train", "sample", "eval", "demo"):
        result = dumo(command, "--help")
        assert result.returncode == 0 and "usage: dumo" in result.stdout
    assert "--nfe" in dumo("sample", "--help").stdout


def test_info_counts_parameters_without_weights(configs_dir):
    result = dumo(
        "info",
        configs_dir / "digits/dumo.yaml",
        "--set",
        "model.name=DiT-XL/2",
        "--set",
        "model.hidden_dim=null",
        "--set",
        "model.depth=null",
        "--set",
        "model.num_heads=null",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    total = int(lines[1].split()[1].replace(",", ""))
    heads = [int(line.split()[1].replace(",", "")) for line in lines if "-head:" in line]
    backbone = int(next(line for line in lines if "backbone:" in line).split()[1].replace(",", ""))
    assert total == backbone + sum(heads) and len(heads) == 2
    assert "effective settings:" in result.stdout and "beta: 0.7" in result.stdout


def test_trajectories_for_2d_runs(trained_run, tmp_path):
    out = tmp_path / "t.png"
    result = dumo("trajectories", trained_run, "--out", out, "--num", 50, "--nfe", 1, 2)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_2d_trajectories_draw_each_samplers_states_as_paths(trained_run, tmp_path, monkeypatch):
    import dumo.plotting
    from dumo.cli import main

    drawn = {}
    original = dumo.plotting.paths_over_density

    def record(panels, reference, path, **kwargs):
        drawn.update(panels)
        original(panels, reference, path, **kwargs)

    monkeypatch.setattr(dumo.plotting, "paths_over_density", record)
    out = tmp_path / "paths.png"
    assert main(["trajectories", str(trained_run), "--out", str(out), "--nfe", "1", "4"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    # one panel per (head, NFE); each holds the noise, the state at every later time, and the samples
    shapes = {label: states.shape for label, states in drawn.items()}
    assert shapes == {
        "u-head, 1 NFE": (2, 32, 2),
        "u-head, 4 NFE": (5, 32, 2),
        "v-head Euler, 1 NFE": (2, 32, 2),
        "v-head Euler, 4 NFE": (5, 32, 2),
    }
    # the same noise starts every path
    starts = [states[0] for states in drawn.values()]
    assert all(np.allclose(start, starts[0]) for start in starts)


# -- sampler numbers, samplers that fit the objective, sample counts, the cost of guidance ----------


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory, configs_dir):
    """Two-step moons runs: a class-conditional DuMo, a Flow Matching and a MeanFlow model."""
    folder = tmp_path_factory.mktemp("small")
    kinds = {
        "conditional": ("moons-dumo", ["data.conditional=true"]),
        "fm": ("moons-fm", []),
        "meanflow": ("moons-meanflow", []),
    }
    for name, (config, extra) in kinds.items():
        Trainer(load_config(configs_dir / f"toy/{config}.yaml", [*TINY, "train.steps=2", *extra]), folder / name).run()
    return {name: folder / name for name in kinds}


def run_main(capsys, *args):
    """``dumo ARGS`` in this process: (exit status, stdout, stderr); a traceback fails the test."""
    from dumo.cli import main

    status = main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize(
    "option", ["--guidance=nan", "--guidance=inf", "--guidance=-1", "--times=1,nan", "--times=inf,0.5"]
)
def test_non_finite_sampler_numbers_are_refused_in_one_line(small_runs, tmp_path, capsys, option):
    out = tmp_path / "x.npy"
    status, _, err = run_main(capsys, "sample", small_runs["conditional"], "--nfe", 2, "-n", 4, option, "--out", out)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "must be finite numbers" in err or "must be a finite number >= 0" in err, err
    assert not out.exists()


def test_eval_refuses_non_finite_samples_by_metric(small_runs, tmp_path, capsys):
    from dumo.files import MODEL_FORMAT, save_checkpoint
    from dumo.runs.loading import export_run

    weights = export_run(small_runs["conditional"], tmp_path / "export")
    tensors, metadata = load_checkpoint(weights, kind=MODEL_FORMAT)
    broken = {k: torch.full_like(v, float("nan")) if k.startswith("heads.u.") else v for k, v in tensors.items()}
    save_checkpoint(weights, broken, metadata, kind=MODEL_FORMAT)  # a diverged u-head: NaN samples
    status, out, err = run_main(capsys, "eval", tmp_path / "export", "--nfe", 1, "-n", 20)
    assert status == 2 and "nan" not in out.lower()
    assert err.strip().startswith("dumo: error: MMD: 20 of 20 samples are not finite (NaN/inf)"), err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("run", "method", "known"), [("fm", "flow_map", "euler, heun"), ("meanflow", "euler", "meanflow")]
)
@pytest.mark.parametrize("command", ["sample", "eval", "trajectories"])
def test_a_sampler_that_does_not_fit_the_objective_is_one_line(
    small_runs, tmp_path, capsys, command, run, method, known
):
    out = {"sample": ["--out", tmp_path / "x.npy"], "eval": [], "trajectories": ["--out", tmp_path / "x.png"]}[command]
    status, _, err = run_main(capsys, command, small_runs[run], "--nfe", 1, "-n", 4, "--method", method, *out)
    objective = "fm" if run == "fm" else "meanflow"
    expected = (
        f"dumo: error: sampler '{method}' does not fit this model (objective {objective}); it samples with {known}"
    )
    assert status == 2 and err.strip() == expected
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "x.png").exists()


def test_eval_names_the_fewest_samples_its_metric_needs(trained_run, capsys):
    status, _, err = run_main(capsys, "eval", trained_run, "--nfe", 1, "-n", 1)
    assert status == 2 and err.strip() == "dumo: error: -n 1: MMD needs at least 2 samples"


def test_guided_sampling_shows_steps_and_network_passes(small_runs, tmp_path, capsys):
    run = small_runs["conditional"]
    status, out, _ = run_main(capsys, "sample", run, "--nfe", 1, "-n", 4, "--guidance", 2, "--out", tmp_path / "x.npy")
    assert status == 0 and "(1 step (2 passes with guidance), step 2)" in out, out
    status, out, _ = run_main(capsys, "eval", run, "--nfe", 1, 2, "-n", 20, "--guidance", 2)
    assert status == 0 and " NFE" not in out, out
    assert "1 step (2 passes with guidance)  MMD" in out and "2 steps (4 passes with guidance)  MMD" in out
    status, out, _ = run_main(capsys, "eval", run, "--nfe", 3, "-n", 20, "--guidance", 2, "--method", "heun")
    assert "2 steps (6 passes with guidance)  MMD" in out, out  # Heun: 2 steps, 3 evaluations
    status, out, _ = run_main(capsys, "eval", run, "--nfe", 1, "-n", 20, "--guidance", 1)
    assert "    1 NFE  MMD" in out, out  # scale 1 is no guidance: one pass per NFE


def test_training_scores_of_guided_samples_say_what_they_cost(configs_dir, tmp_path, capsys):
    from dumo.cli.train import print_result

    overrides = [*TINY, "train.steps=2", "data.conditional=true", "sample.guidance_scale=2"]
    result = Trainer(load_config(configs_dir / "toy/moons-dumo.yaml", overrides), tmp_path / "run").run()
    print_result(result, 2)
    out = capsys.readouterr().out
    assert "mmd_1nfe" in out and "guidance scale 2.0: each NFE above is 2 network passes" in out, out

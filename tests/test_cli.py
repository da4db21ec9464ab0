"""The command line as a user runs it: subprocesses of ``python -m dumo``."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from dumo.config import load_config
from dumo.training import Trainer
from dumo.training.checkpoint import list_checkpoints, load_checkpoint

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

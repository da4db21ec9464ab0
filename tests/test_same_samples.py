"""The package redesign moved code, not arithmetic: the same runs train to the same weights and
draw the same samples, bit for bit, as the code before it did on this machine.

The fixtures in ``tests/data/before-redesign`` were written by its ``make.sh`` with dumo as it was
before the redesign: exports of a short moons run (the demo's config) and a short digits DuMo run,
and samples drawn from them. Single-threaded on both sides, so the arithmetic is the same.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

FIXTURES = Path(__file__).parent / "data" / "before-redesign"
ROOT = Path(__file__).resolve().parents[1]
SINGLE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
RUNS = {
    "moons": ("configs/toy/moons-dumo.yaml", ["train.steps=300", "train.progress=false"]),
    "digits": (
        "configs/digits/dumo.yaml",
        ["train.steps=60", "train.eval_every=0", "train.progress=false", "objective.zeta=0.5"],  # zeta of the fixtures
    ),
}
SAMPLES = {"moons": ("npy", 256), "digits": ("npz", 32)}


def dumo(*args: str) -> None:
    command = [sys.executable, "-m", "dumo", *args]
    result = subprocess.run(command, cwd=ROOT, env=SINGLE_THREAD, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def draw(export: Path, run: str, nfe: int, out_dir: Path) -> np.ndarray:
    suffix, count = SAMPLES[run]
    out = out_dir / f"{run}-{nfe}nfe.{suffix}"
    dumo("sample", str(export), "--nfe", str(nfe), "-n", str(count), "--seed", "3", "--out", str(out))
    return read_samples(out)


def read_samples(path: Path) -> np.ndarray:
    return np.load(path) if path.suffix == ".npy" else np.load(path)["images"]


@pytest.mark.parametrize("run", sorted(RUNS))
def test_exports_from_before_sample_the_same(run, tmp_path):
    for nfe in (1, 2):
        before = read_samples(next(FIXTURES.glob(f"{run}-{nfe}nfe.*")))
        now = draw(FIXTURES / run, run, nfe, tmp_path)
        assert now.dtype == before.dtype and now.shape == before.shape
        assert np.array_equal(now, before), f"{run} {nfe} NFE: max difference {np.abs(now - before).max()}"


@pytest.mark.parametrize("run", sorted(RUNS))
def test_the_same_run_trains_to_the_same_weights(run, tmp_path):
    config, overrides = RUNS[run]
    dumo("train", config, "--out", str(tmp_path / "run"), "--set", *overrides)
    dumo("export", str(tmp_path / "run"), str(tmp_path / "export"))
    before, now = load_file(FIXTURES / run / "model.safetensors"), load_file(tmp_path / "export" / "model.safetensors")
    assert sorted(now) == sorted(before)
    differing = [name for name in before if not np.array_equal(before[name], now[name])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"
    assert np.array_equal(
        draw(tmp_path / "export", run, 1, tmp_path), read_samples(next(FIXTURES.glob(f"{run}-1nfe.*")))
    )

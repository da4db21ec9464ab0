"""The package redesign moved code, not arithmetic: the same runs train to the same weights and
draw the same samples as the code before it did: bit for bit on a machine of the kind that wrote the
fixtures. Another CPU's kernels may sum in another order (one differed by 3e-7 in the samples): there
the exports' samples must agree within 1e-5, the short digits run's weights within 1e-2 (relative),
and the moons run, whose 300 steps grow the rounding, is skipped with that reason.

The fixtures in ``tests/data/before-redesign`` were written by its ``make.sh`` with dumo as it was
before the redesign: exports of a short moons run (the demo's config) and a short digits DuMo run,
and samples drawn from them. Single-threaded on both sides, so the arithmetic is the same.
"""

import functools
import os
import subprocess
import sys
from collections.abc import Callable
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
# Another CPU's rounding, not a change of arithmetic: a moved sign or factor is off by far more.
SAMPLE_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-2  # relative: training carries rounding forward over its steps
# On another CPU the 300 moons steps grow a 3e-7 rounding difference to 28% of a bias; the 60 digits
# steps keep it under 4e-4, so only digits is compared there.
ROUNDING_GROWS = {"moons"}


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


@pytest.fixture(scope="module")
def drawn_from_fixtures(tmp_path_factory) -> Callable[[str, int], np.ndarray]:
    """Samples of the fixtures' own exports drawn by today's code, each (run, NFE) drawn once."""
    out_dir = tmp_path_factory.mktemp("from-fixtures")
    return functools.cache(lambda run, nfe: draw(FIXTURES / run, run, nfe, out_dir))


def stored_samples(run: str, nfe: int) -> np.ndarray:
    return read_samples(next(FIXTURES.glob(f"{run}-{nfe}nfe.*")))


def same_arithmetic(run: str, drawn_from_fixtures) -> bool:
    """Whether this machine draws the fixtures' own 1-NFE samples from their export bit for bit."""
    return np.array_equal(drawn_from_fixtures(run, 1), stored_samples(run, 1))


@pytest.mark.parametrize("run", sorted(RUNS))
def test_exports_from_before_sample_the_same(run, drawn_from_fixtures):
    exact = same_arithmetic(run, drawn_from_fixtures)
    for nfe in (1, 2):
        before, now = stored_samples(run, nfe), drawn_from_fixtures(run, nfe)
        assert now.dtype == before.dtype and now.shape == before.shape
        difference = float(np.abs(now.astype(np.float64) - before.astype(np.float64)).max())
        assert difference <= (0.0 if exact else SAMPLE_TOLERANCE), f"{run} {nfe} NFE: max difference {difference}"


@pytest.mark.parametrize("run", sorted(RUNS))
def test_the_same_run_trains_to_the_same_weights(run, tmp_path, drawn_from_fixtures):
    config, overrides = RUNS[run]
    dumo("train", config, "--out", str(tmp_path / "run"), "--set", *overrides)
    dumo("export", str(tmp_path / "run"), str(tmp_path / "export"))
    before, now = load_file(FIXTURES / run / "model.safetensors"), load_file(tmp_path / "export" / "model.safetensors")
    assert sorted(now) == sorted(before)
    samples, before_samples = draw(tmp_path / "export", run, 1, tmp_path), stored_samples(run, 1)
    if same_arithmetic(run, drawn_from_fixtures):  # the fixtures' kind of machine: bit for bit
        differing = [name for name in before if not np.array_equal(before[name], now[name])]
        assert not differing, f"{len(differing)} tensors differ, e.g. {differing[:3]}"
        assert np.array_equal(samples, before_samples)
        return
    if run in ROUNDING_GROWS:
        pytest.skip(f"{run}: this CPU rounds unlike the fixtures' machine and {RUNS[run][1][0]} carry that far")
    differences = {name: relative_difference(now[name], before[name]) for name in before}
    worst = max(differences, key=differences.get)
    assert differences[worst] <= WEIGHT_TOLERANCE, f"{run}: {worst} differs by {differences[worst]:.3g} (relative)"
    assert relative_difference(samples, before_samples) <= WEIGHT_TOLERANCE


def relative_difference(now: np.ndarray, before: np.ndarray) -> float:
    """||now - before|| / ||before||, in float64."""
    now, before = now.astype(np.float64), before.astype(np.float64)
    return float(np.linalg.norm(now - before) / max(np.linalg.norm(before), 1e-12))

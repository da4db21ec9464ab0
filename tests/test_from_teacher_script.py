"""experiments/from_teacher.py's diagnostics on tiny runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "from_teacher.py"


def untrained_moons_run(tmp_path: Path, objective: str) -> Path:
    """A one-step moons run of ``objective`` at lr 1e-12: its zero-initialised heads stay at zero."""
    run = tmp_path / objective
    command = [sys.executable, "-m", "dumo", "train", str(ROOT / "configs" / "toy" / f"moons-{objective}.yaml")]
    command += ["--out", str(run), "--set", "train.steps=1", "--set", "optim.lr=1e-12"]
    command += ["--set", "train.eval_samples=64"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return run


def test_coupling_of_an_untrained_model_is_the_identity(tmp_path: Path) -> None:
    # The heads start at zero (adaLN-zero / zero-init output layers), and with lr 1e-12 they stay
    # there: v = u = 0, so Euler steps and the one-step map both return the noise unchanged.
    runs = [untrained_moons_run(tmp_path, name) for name in ("fm", "dumo")]
    result = subprocess.run([sys.executable, str(SCRIPT), "coupling", *map(str, runs)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = [line.strip("|").split("|") for line in result.stdout.splitlines() if line.startswith("| /")]
    assert [row[1].strip() for row in rows] == ["50 Euler", "1 NFE"]
    for row in rows:
        assert abs(float(row[2]) - 1.0) < 1e-4 and abs(float(row[3]) - 1.0) < 1e-4  # slope, correlation


def test_last_step_reads_a_run_and_its_export_alike(tmp_path: Path) -> None:
    run, export = tmp_path / "run", tmp_path / "export"
    command = [
        sys.executable,
        "-m",
        "dumo",
        "train",
        str(ROOT / "configs" / "toy" / "moons-fm.yaml"),
        "--out",
        str(run),
    ]
    command += ["--set", "train.steps=3", "--set", "train.eval_samples=64"]
    trained = subprocess.run(command, capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr
    result = subprocess.run(
        [sys.executable, "-m", "dumo", "export", str(run), str(export)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    module = load_script(SCRIPT)
    assert module.last_step(run) == 3
    assert module.last_step(export) == 3  # an export has no checkpoints: the step its weights record


@pytest.mark.parametrize("dataset", ["moons", "digits", "fashion_mnist"])
def test_every_results_variant_is_a_config_that_builds(dataset: str) -> None:
    # A variant's overrides are applied by `dumo train` only when the (long) study runs: check here
    # that each one names real keys and values for its dataset's config and that the network builds.
    import argparse

    import torch

    from dumo.config import load_config
    from dumo.network import build_network

    module = load_script(SCRIPT)
    args = argparse.Namespace(dataset=dataset, seeds=[0], zeta=0.5, direction_seeds=None, variants=None)
    found = module.variants(args)
    assert len({(method, label) for method, label, _, _ in found}) == len(found)
    for method, _, extra, _ in found:
        config = load_config(module.config_path(dataset, f"{method}-from-fm"), extra)
        classes = config.data.expected_classes() if config.data.conditional else 0
        with torch.device("meta"):
            build_network(config, config.data.expected_shape(), classes)


@pytest.mark.parametrize("objective", ["dumo", "meanflow"])
def test_second_step_renoises_with_fresh_noise_then_takes_the_runs_own_step(tmp_path: Path, objective: str) -> None:
    # An untrained run (zero-initialised heads, lr 1e-12) has u = 0, so the second step returns the
    # re-noised point itself: s * fresh noise + (1 - s) * x0, the noise drawn from the generator given.
    import torch

    from dumo.runs.loading import load_run

    loaded = load_run(untrained_moons_run(tmp_path, objective))
    module = load_script(SCRIPT)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    out = module.second_step(loaded.model, loaded.objective_name, x0, 0.25, None, torch.Generator().manual_seed(7))
    fresh = torch.randn(64, 2, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, 0.25 * fresh + 0.75 * x0)
    assert not torch.allclose(out, x0)  # the noise was added, not skipped


def test_names_pick_variants_by_their_run_folder_and_refuse_a_typo() -> None:
    import argparse

    module = load_script(SCRIPT)
    wanted = ["meanflow-zeta0.5", "dumo-zeta0.5-conditionaldirection"]
    args = argparse.Namespace(
        dataset="fashion_mnist", seeds=[0], zeta=0.5, direction_seeds=None, variants=None, names=wanted
    )
    picked = module.variants(args)
    # in the study's order, whatever the order of --names
    assert [module.variant_name(method, label) for method, label, _, _ in picked] == wanted[::-1]
    assert picked[0][2] == ["objective.zeta=0.5", "objective.derivative_direction=conditional"]
    args.names = ["dumo-zeta0.5-conditional"]  # the folder name less "direction"
    with pytest.raises(SystemExit, match="unknown --names dumo-zeta0.5-conditional; the variants are: dumo-zeta0,"):
        module.variants(args)


def test_samples_other_than_1000_keep_their_own_scores(tmp_path: Path) -> None:
    # Scores at another sample count must not be read as (or overwrite) the 1000-sample ones.
    module = load_script(SCRIPT)
    assert module.scores_file(tmp_path) == tmp_path / "scores.json"
    module.NUM_SAMPLES = 5000
    assert module.scores_file(tmp_path) == tmp_path / "scores-5000.json"


def test_results_with_a_mistyped_name_stops_before_training_anything(tmp_path: Path) -> None:
    out = tmp_path / "study"
    command = [sys.executable, str(SCRIPT), "results", "--dataset", "moons", "--out", str(out), "--names", "dumo-zeta"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode != 0
    assert "unknown --names dumo-zeta; the variants are: dumo-zeta0," in result.stderr
    assert not out.exists()  # no teacher was started

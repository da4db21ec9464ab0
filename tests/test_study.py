"""The paper's study (experiments/study.py): each command's --quick form writes its table and figure.

Each run is a ``dumo train`` process of a few steps, so these take tens of seconds on a busy CPU;
the commands that train the most runs are marked slow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "experiments" / "study.py"


def study(tmp_path: Path, *args: str) -> str:
    """Run ``study.py ARGS --quick`` into tmp_path; return table.md after checking figure.png."""
    command = [sys.executable, str(STUDY), *args, "--quick", "--out", str(tmp_path / "out")]
    if args[0] != "throughput":
        command += ["--runs", str(tmp_path / "runs"), "--samples", "64"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "out" / "figure.png").stat().st_size > 1000
    table = (tmp_path / "out" / "table.md").read_text()
    assert "Command: `python experiments/study.py" in table and "CPUs" in table and "Wall time" in table
    return table


def rows(table: str) -> list[list[str]]:
    """The cells of the table's body rows."""
    lines = [line for line in table.splitlines() if line.startswith("|")][2:]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_rho_beta_quick_and_resumes(tmp_path: Path) -> None:
    table = study(tmp_path, "rho-beta", "--datasets", "moons")
    found = [(row[0], row[1], row[2]) for row in rows(table)]
    assert found == [("moons", "MeanFlow", "rho = 0.75"), ("moons", "DuMo", "beta = 0.7"), ("moons", "Shortcut", "-")]
    for row in rows(table):
        assert float(row[3]) >= 0 and row[5] == "1" and row[6] == "20"  # 1-NFE MMD, one seed, 20 steps
    # finished runs are neither trained nor scored again: the same table, no new log lines
    logs = {path: path.read_text() for path in (tmp_path / "runs").glob("*.log")}
    assert len(logs) == 3
    again = study(tmp_path, "rho-beta", "--datasets", "moons")
    assert rows(again) == rows(table)
    # the header counts the earlier invocation's training time too, where the wall time cannot
    headers = [next(line for line in text.splitlines() if line.startswith("Wall time")) for text in (table, again)]
    seconds = [header.split("took ")[1].split(" s")[0] for header in headers]
    assert seconds[0] == seconds[1] and float(seconds[0]) > 0
    assert {path: path.read_text() for path in (tmp_path / "runs").glob("*.log")} == logs


def test_throughput_quick(tmp_path: Path) -> None:
    table = study(tmp_path, "throughput")
    found = rows(table)
    assert [row[1] for row in found] == ["Flow Matching", "MeanFlow (JVP-free)", "DuMo (FD, batched)"]
    assert found[0][2] == "1" and found[1][3] == "1"  # each method against itself
    assert float(found[2][2]) > 0


def test_trajectories_quick(tmp_path: Path) -> None:
    table = study(tmp_path, "trajectories")
    found = rows(table)
    assert [(row[0], row[1]) for row in found] == [(s, n) for s in ("10", "20") for n in ("1", "2", "4")]
    assert all(float(row[2]) > 0 and float(row[3]) > 0 for row in found)  # domain FD of both heads
    assert sorted(p.name for p in (tmp_path / "out").glob("step-*.png")) == ["step-10.png", "step-20.png"]


@pytest.mark.slow
def test_beta_grid_quick(tmp_path: Path) -> None:
    table = study(tmp_path, "beta-grid")
    assert [(row[0], row[1]) for row in rows(table)] == [("1.0", "2.0"), ("2.0", "2.0")]


@pytest.mark.slow
def test_multiplicity_quick(tmp_path: Path) -> None:
    table = study(tmp_path, "multiplicity", "--datasets", "moons")
    assert [row[1] for row in rows(table)] == ["DuMo (v, u)", "three heads (v, m, u)", "three heads (v, s, u)"]


@pytest.mark.slow
def test_table1_quick(tmp_path: Path) -> None:
    table = study(tmp_path, "table1", "--datasets", "digits")
    main_part, curve_part = table.split("## Quality against training steps")
    expected = [("Flow Matching", "1"), ("Flow Matching", "50"), ("Shortcut", "1"), ("Shortcut", "2")]
    expected += [("Shortcut", "4"), ("MeanFlow", "1"), ("MeanFlow", "2"), ("DuMo", "1"), ("DuMo", "2")]
    found = rows(main_part)
    assert [(row[1], row[3]) for row in found] == expected
    assert all(row[2] == "-" for row in found)  # each config's own setting
    assert all(float(row[8]) > 0 for row in found)  # wall-clock per run
    # the curve: checkpoints at thirds of the 20 quick steps, the last one scored as in the main table
    curves = rows(curve_part)
    assert [(row[1], row[2]) for row in curves] == expected
    for curve, main in zip(curves, found):
        points = [point.split(": ") for point in curve[3].split(", ")]
        assert [int(step) for step, _ in points] == [7, 14, 20]
        assert points[-1][1] == main[4]
        assert len({value for _, value in points}) == 3  # three different checkpoints, not one scored thrice
    assert (tmp_path / "out" / "curve.png").stat().st_size > 1000


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    command = [sys.executable, str(STUDY), "table1", "--quick", "--config-dir", str(tmp_path), "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode != 0
    assert "no config" in result.stderr and "Traceback" not in result.stderr
    command = [sys.executable, str(STUDY), "trajectories", "--quick", "--set", "train.no_such_key=1"]
    result = subprocess.run([*command, "--out", str(tmp_path), "--runs", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode != 0
    assert "unknown config key 'train.no_such_key'" in result.stderr and "Traceback" not in result.stderr


def test_a_failed_run_stops_the_queue(tmp_path: Path) -> None:
    """After a run fails, no queued run starts: the error comes at once, not after the whole queue."""
    study_module = load_script(STUDY)
    study = study_module.Study(
        name="beta-grid",
        quick=True,
        out=tmp_path / "out",
        runs=tmp_path / "runs",
        seeds=1,
        steps=None,
        samples=None,
        jobs=1,
        config_dir=ROOT / "configs",
        sets=[],
        datasets=["moons"],
    )
    runs = [study_module.Run("moons", "dumo", f"beta = {beta}", (f"objective.beta={beta}",)) for beta in (5, 6, 7)]
    with pytest.raises(SystemExit, match="training failed"):
        study.train_all(runs)
    assert sorted(path.name for path in (tmp_path / "runs").glob("*.log")) == ["moons-dumo-beta-5-s0.log"]
    assert "beta must be in [0, 1]" in (tmp_path / "runs" / "moons-dumo-beta-5-s0.log").read_text()


def test_sweep_chooses_the_lowest_selection_score_and_never_a_diverged_run() -> None:
    study_module = load_script(STUDY)

    def row(method: str, setting: str, scores: dict) -> object:
        run = study_module.Run("moons", "dumo", setting)
        return study_module.Row("moons", method, setting, [], [scores], run)

    rows = [
        row("DuMo", "a", {"1 NFE/mmd": float("nan"), "2 NFE/mmd": 0.01}),
        row("DuMo", "b", {"1 NFE/mmd": 0.30, "2 NFE/mmd": 0.05}),
        row("DuMo", "c", {"1 NFE/mmd": 0.20, "2 NFE/mmd": 0.90}),
    ]
    assert study_module.best_row(rows).setting == "c"  # by 1 NFE, whatever 2 NFE says
    fm = [
        row("Flow Matching", "a", {"1 NFE/mmd": 0.1, "50 NFE/mmd": 0.5}),
        row("Flow Matching", "b", {"1 NFE/mmd": 0.9, "50 NFE/mmd": 0.2}),
    ]
    assert study_module.best_row(fm).setting == "b"  # Flow Matching by its 50 Euler steps
    run = study_module.sweep_run("moons", "MeanFlow", 1e-3, 0.5, 1.0)
    assert run.config == "meanflow" and run.setting == "lr = 0.001, rho = 0.5, p = 1.0"
    assert run.overrides == ("optim.lr=0.001", "objective.rho=0.5", "objective.adaptive_p=1.0")


@pytest.mark.slow
def test_sweep_quick_and_table1_reads_its_choice(tmp_path: Path) -> None:
    table = study(tmp_path, "sweep")
    sweep_part, _ = table.split("## The best of each")
    tried = rows(sweep_part)
    # Flow Matching and Shortcut: two learning rates; DuMo and MeanFlow: two, then the other p
    assert [row[1] for row in tried] == ["Flow Matching"] * 2 + ["DuMo"] * 3 + ["MeanFlow"] * 3 + ["Shortcut"] * 2
    assert tried[4][2].endswith("p = 1.0") and tried[7][2].endswith("p = 1.0")  # the moons configs have p = 0
    for method in ("Flow Matching", "DuMo", "MeanFlow", "Shortcut"):
        mine = [row for row in tried if row[1] == method]
        chosen = [row for row in mine if row[5] == "yes"]
        assert len(chosen) == 1 and float(chosen[0][4]) == min(float(row[4]) for row in mine)
    best = json.loads((tmp_path / "out" / "best.json").read_text())["moons"]
    assert best["DuMo"]["setting"] == next(row[2] for row in tried if row[1] == "DuMo" and row[5] == "yes")

    def table1(tuned: Path) -> subprocess.CompletedProcess:
        command = [sys.executable, str(STUDY), "table1", "--quick", "--datasets", "moons", "--tuned", str(tuned)]
        command += ["--out", str(tmp_path / "t1"), "--runs", str(tmp_path / "runs"), "--samples", "64"]
        return subprocess.run(command, capture_output=True, text=True)

    # table1 --tuned trains each method with the chosen overrides: the sweep's runs, nothing new
    logs = sorted(p.name for p in (tmp_path / "runs").glob("*.log"))
    result = table1(tmp_path / "out" / "best.json")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "runs").glob("*.log")) == logs
    assert f"| moons | DuMo | {best['DuMo']['setting']} | 1 |" in (tmp_path / "t1" / "table.md").read_text()
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"moons": {"DuMo": best["DuMo"]}}))
    result = table1(missing)
    assert result.returncode != 0
    assert (
        result.stderr.strip().splitlines()[-1] == "study.py: error: --tuned has no setting for Flow Matching on moons"
    )

"""experiments/common.py: the helpers the experiment scripts share, and each script's own formats."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from conftest import load_script
from safetensors.torch import save_file

from dumo.runs.layout import EXPORTED_WEIGHTS, checkpoint_path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_each_script_keeps_its_number_format() -> None:
    path_before = list(sys.path)
    study = load_script(EXPERIMENTS / "study.py")
    from_teacher = load_script(EXPERIMENTS / "from_teacher.py")
    assert sys.path == path_before  # the scripts' folder is on the path only while they are imported
    values = [1.23456, 2.34567]
    # study: 4 significant digits, 2 for the std; from_teacher: 3 decimals for both
    assert study.mean_std(values) == "1.79 ± 0.79"
    assert from_teacher.mean_std(values) == "1.790 ± 0.786"
    assert study.mean_std([0.000123456]) == "0.0001235"
    assert from_teacher.mean_std([0.000123456]) == "0.000"
    common = sys.modules["common"]
    assert study.last_step is common.last_step and from_teacher.last_step is common.last_step


def test_last_step_of_a_run_by_position_and_of_an_export(tmp_path: Path) -> None:
    common = load_script(EXPERIMENTS / "common.py")
    run, export = tmp_path / "run", tmp_path / "export"
    for step in (10, 200, 30):
        path = checkpoint_path(run, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.zeros(1)}, str(path))
    assert common.last_step(run) == 200
    assert common.last_step(run, 0) == 10
    assert common.last_step(run, -2) == 30
    export.mkdir()
    save_file({"w": torch.zeros(1)}, str(export / EXPORTED_WEIGHTS), metadata={"step": "7"})
    assert common.last_step(export) == 7
    assert common.last_step(export, 0) == 7  # an export holds one set of weights, whatever the position

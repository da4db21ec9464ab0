"""The shipped shapes configs train, and experiments/shapes.py tabulates their accuracy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")

from conftest import load_script  # noqa: E402

from dumo.config import load_config  # noqa: E402
from dumo.training import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "configs" / "shapes"
QUICK = ["train.steps=2", "data.batch_size=8", "train.progress=false", "train.log_every=0"]


def test_the_shapes_configs_are_the_four_of_the_comparison_and_are_shipped():
    import dumo

    names = sorted(path.name for path in SHAPES.glob("*.yaml"))
    assert names == ["dumo-from-fm.yaml", "dumo.yaml", "fm.yaml", "meanflow.yaml"]
    shipped = Path(dumo.__file__).parent / "configs" / "shapes"
    assert sorted(path.name for path in shipped.glob("*.yaml")) == names
    teacher = load_config(SHAPES / "fm.yaml")
    student = load_config(SHAPES / "dumo-from-fm.yaml")
    assert student.train.steps <= teacher.train.steps // 2  # the student takes at most half the teacher's steps
    assert student.model == teacher.model and student.text == teacher.text  # init_from maps every weight


def test_every_shapes_config_trains_two_steps(tmp_path, monkeypatch):
    # The end-of-run evaluation (the judge, a picture) is tested on tiny runs in test_text_runs.py; here
    # it would only cost time.
    monkeypatch.setattr("dumo.training.loop.evaluate_and_log", lambda trainer: {})
    teacher = tmp_path / "fm"
    Trainer(load_config(SHAPES / "fm.yaml", QUICK), teacher).run()
    for name in ("dumo-from-fm", "dumo", "meanflow"):
        overrides = [*QUICK, f"train.init_from={teacher}"] if name == "dumo-from-fm" else QUICK
        result = Trainer(load_config(SHAPES / f"{name}.yaml", overrides), tmp_path / name).run()
        assert result.step == 2 and result.skipped_steps == 0, name


def test_compare_tabulates_seen_and_held_out_accuracy_of_the_runs_there(tmp_path, monkeypatch):
    monkeypatch.setattr("dumo.training.loop.evaluate_and_log", lambda trainer: {})
    Trainer(load_config(SHAPES / "fm.yaml", [*QUICK, "model.depth=1", "model.hidden_dim=32"]), tmp_path / "fm-s0").run()
    command = [sys.executable, str(ROOT / "experiments" / "shapes.py"), "compare", "--seeds", "0", "--table-only"]
    result = subprocess.run([*command, "--out", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| FM teacher")]
    assert [row.split("|")[2].strip() for row in rows] == ["50 NFE", "50 NFE, guidance 2"]
    assert [row.split("|")[6].strip() for row in rows] == ["1.00", "1.00"]  # training time over the teacher's
    scores = json.loads((tmp_path / "fm-s0" / "shapes-scores.json").read_text())
    assert 0 <= scores["50 NFE"]["seen"] <= 1 and scores["training"]["step"] == 2
    assert scores["per_prompt"] == 4  # 748 images: 4 of each of the 187 evaluation prompts
    assert (tmp_path / "results.md").read_text().count("| FM teacher") == 2
    # scores made with another number of images per prompt are not reused
    result = subprocess.run([*command, "--out", str(tmp_path), "--per-prompt", "1"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "fm-s0" / "shapes-scores.json").read_text())["per_prompt"] == 1


def test_compare_passes_its_overrides_to_the_teacher_and_the_student_alike(tmp_path, monkeypatch):
    shapes = load_script(ROOT / "experiments" / "shapes.py")
    trained = {}

    def train(config, folder, overrides, table_only):
        trained[folder.name] = overrides

    monkeypatch.setattr(shapes, "train", train)
    monkeypatch.setattr(shapes, "score", lambda folder, wanted, per_prompt: {})
    argv = ["shapes.py", "compare", "--seeds", "3", "--out", str(tmp_path), "--jobs", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--set", "model.name=TextDiT-XS/2", "--set", "optim.lr=0.001"])
    shapes.main()
    assert sorted(trained) == ["dumo-from-fm-s3", "dumo-s3", "fm-s3", "meanflow-s3"]
    for overrides in trained.values():  # the student can start from its teacher only on the same network
        assert overrides[:3] == ["model.name=TextDiT-XS/2", "optim.lr=0.001", "train.seed=3"]
    assert trained["dumo-from-fm-s3"][3] == f"train.init_from={tmp_path / 'fm-s3'}"
    assert "--set model.name=TextDiT-XS/2 optim.lr=0.001" in (tmp_path / "results.md").read_text()


def test_info_counts_a_text_model_with_its_encoder(capsys):
    from dumo.cli import main

    assert main(["info", str(SHAPES / "dumo.yaml")]) == 0
    out = capsys.readouterr().out
    assert "model TextDiT-XS/4, data shapes (3, 32, 32)" in out and "encoder: small" in out

"""dumo grid: prompts (rows) at 1 and 2 NFE from each EMA snapshot of a run (columns), as one picture."""

import json

import pytest
import torch

pytest.importorskip("tokenizers")

from dumo.cli import main  # noqa: E402
from dumo.config import config_from_dict  # noqa: E402
from dumo.runs.snapshot_grid import draw_snapshot_grid  # noqa: E402
from dumo.training import Trainer  # noqa: E402

TINY = {
    "data": {"name": "shapes", "batch_size": 8},
    "model": {"name": "TextDiT-XS/4", "hidden_dim": 32, "depth": 1, "num_heads": 2},
    "text": {"width": 16, "depth": 1, "heads": 2, "max_tokens": 10},
    "objective": {"name": "dumo"},
    "train": {"steps": 2, "checkpoint_every": 2, "progress": False, "ema_decay": 0.5, "snapshot_steps": [1, 2]},
}
PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a white circle"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grid")
    Trainer(config_from_dict(json.loads(json.dumps(TINY))), folder / "run").run()
    (folder / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return folder / "run"


def test_grid_draws_every_prompt_from_every_snapshot_at_each_nfe(run):
    grid = draw_snapshot_grid(run, PROMPTS, nfes=(1, 2), report=lambda line: None)
    assert grid.columns == [(1, 1), (1, 2), (2, 1), (2, 2)] and grid.prompts == PROMPTS
    assert grid.images.shape == (3, 4, 3, 32, 32) and grid.images.min() >= 0 and grid.images.max() <= 1
    assert not torch.equal(grid.images[:, 0], grid.images[:, 2])  # the snapshots' weights differ
    again = draw_snapshot_grid(run, PROMPTS, nfes=(1, 2), steps=[2], report=lambda line: None)
    assert again.columns == [(2, 1), (2, 2)]
    assert torch.equal(again.images, grid.images[:, 2:])  # the same noise whatever the columns beside


def test_grid_command_writes_a_labelled_png_and_refuses_what_it_cannot_draw(run, tmp_path, capsys):
    from PIL import Image

    prompts, out = run.parent / "prompts.txt", tmp_path / "grid.png"
    args = ["grid", str(run), "--prompts", str(prompts), "--nfe", "1", "2", "--out", str(out)]
    assert main(args) == 0
    assert "3 rows x 4 columns" in capsys.readouterr().out
    width, height = Image.open(out).size
    assert width > height > 0  # four columns, three rows
    assert main(args) == 2 and "--force" in capsys.readouterr().err  # an existing picture is kept
    assert main([*args, "--force", "--steps", "7"]) == 2
    assert capsys.readouterr().err.strip() == f"dumo: error: {run} has no snapshot of step 7 (it has 1, 2)"
    bare = tmp_path / "bare"
    Trainer(config_from_dict({**TINY, "train": {**TINY["train"], "snapshot_steps": []}}), bare).run()
    assert main(["grid", str(bare), "--prompts", str(prompts), "--out", str(tmp_path / "b.png")]) == 2
    assert "has no EMA snapshots" in capsys.readouterr().err

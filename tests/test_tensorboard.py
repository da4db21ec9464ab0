"""train.tensorboard: the logged scalars and scores as TensorBoard events, and a missing package named."""

import sys

import pytest
from conftest import MOONS_CONFIG, TINY_MOONS

from dumo.config import load_config
from dumo.errors import ConfigError
from dumo.training import Trainer

CONFIG = MOONS_CONFIG
TINY = [
    *TINY_MOONS,
    "train.steps=3",
    "train.checkpoint_every=0",
]


def test_tensorboard_events_hold_the_logged_scalars_and_scores(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(load_config(CONFIG, [*TINY, "train.tensorboard=true"]), tmp_path / "run").run()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/loss_u", "train/loss_v", "train/grad_norm", "train/lr", "train/steps_per_sec"):
        assert tag in tags, tags
    assert [event.step for event in events.Scalars("train/loss_u")] == [1, 2, 3]
    assert any(tag.startswith("eval/") for tag in tags) and events.Scalars(next(t for t in tags if "eval/" in t))


def test_tensorboard_is_off_by_default(tmp_path):
    Trainer(load_config(CONFIG, TINY), tmp_path / "run").run()
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_missing_tensorboard_is_one_line_naming_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the import now fails
    with pytest.raises(ConfigError, match="pip install tensorboard") as caught:
        Trainer(load_config(CONFIG, [*TINY, "train.tensorboard=true"]), tmp_path / "run")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()

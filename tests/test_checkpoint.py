import os

import pytest
import torch
from safetensors.torch import save_file

from dumo.config import config_from_dict
from dumo.errors import CheckpointError, RunDirError
from dumo.run import load_run
from dumo.training import Trainer
from dumo.training.checkpoint import (
    atomic_write,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    unprefixed,
)

TINY = {
    "model": {"hidden_dim": 16, "depth": 1},
    "data": {"batch_size": 16},
    "train": {"steps": 4, "checkpoint_every": 2, "progress": False, "eval_samples": 50},
}


def test_round_trip(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"a": torch.arange(3.0)}, {"step": "7"})
    tensors, metadata = load_checkpoint(path)
    assert torch.equal(tensors["a"], torch.arange(3.0)) and metadata["step"] == "7"


def test_truncated_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"a": torch.randn(100)}, {"step": "1"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(path)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a dumo-checkpoint file"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nothing.safetensors")


def test_pickle_file_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.safetensors"
    torch.save({"x": Exploit()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "file.bin"
    atomic_write(path, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]  # no temporary left behind


def test_checkpoint_of_another_architecture_is_named(tmp_path):
    Trainer(config_from_dict(TINY), tmp_path / "run").run()
    checkpoint = list_checkpoints(tmp_path / "run")[-1]
    wider = config_from_dict({**TINY, "model": {"hidden_dim": 32, "depth": 1}})
    # the config recorded in the checkpoint names the key that differs, before any weight is loaded
    with pytest.raises(RunDirError, match="trained with model.hidden_dim=16 but the config now says 32"):
        Trainer(wider, tmp_path / "other").restore(checkpoint)
    # weights that do not fit are named too (a file that records no config, or a foreign one)
    tensors, _ = load_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match="does not match this model"):
        load_weights(Trainer(wider, tmp_path / "other").model, unprefixed(tensors, "ema."), str(checkpoint))


def test_keeps_the_configured_number_of_checkpoints(tmp_path):
    cfg = config_from_dict(
        {**TINY, "train": {**TINY["train"], "steps": 10, "checkpoint_every": 1, "keep_checkpoints": 2}}
    )
    Trainer(cfg, tmp_path / "run").run()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == [
        "step_00000009.safetensors",
        "step_00000010.safetensors",
    ]


def test_load_run_uses_ema_weights(tmp_path):
    trainer = Trainer(config_from_dict(TINY), tmp_path / "run")
    trainer.run()
    run = load_run(tmp_path / "run")
    assert run.step == 4
    for (name, value), ema in zip(run.model.state_dict().items(), trainer.ema.model.state_dict().values()):
        assert torch.equal(value, ema), name

import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dumo.config import config_from_dict
from dumo.distributed import Distributed
from dumo.errors import CheckpointError, RunDirError
from dumo.files import atomic_write, load_checkpoint, save_checkpoint
from dumo.runs.checkpoints import agreed_checkpoint, load_weights, unprefixed
from dumo.runs.layout import checkpoint_path, list_checkpoints
from dumo.runs.loading import load_run
from dumo.training import Trainer
from dumo.training.state import restore, resume_latest

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
        restore(Trainer(wider, tmp_path / "other"), checkpoint)
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


# -- resuming on other ranks: every rank loads the checkpoint rank 0 chose -----------------------


def test_agreed_checkpoint_names_the_rank_its_folder_and_the_step(tmp_path):
    for step in (2, 3):
        save_checkpoint(checkpoint_path(tmp_path, step), {"a": torch.zeros(1)}, {"step": str(step)})
    assert agreed_checkpoint(tmp_path, 3, rank=1) == checkpoint_path(tmp_path, 3)
    folder = tmp_path / "checkpoints"
    with pytest.raises(
        CheckpointError, match=rf"^rank 1 expected checkpoint step 4 in {folder} but its newest is step 3"
    ):
        agreed_checkpoint(tmp_path, 4, rank=1)  # a copy that lags behind rank 0's
    with pytest.raises(CheckpointError, match=r"^rank 2 expected checkpoint step 2 .* its newest is step 3"):
        agreed_checkpoint(tmp_path, 2, rank=2)  # one that runs ahead of it
    with pytest.raises(CheckpointError, match=r"^rank 1 expected no checkpoint \(rank 0 starts at step 0\)"):
        agreed_checkpoint(tmp_path, None, rank=1)
    with pytest.raises(CheckpointError, match=r"^rank 3 expected checkpoint step 3 in .*node_local.* but it has none"):
        agreed_checkpoint(tmp_path / "node_local", 3, rank=3)
    assert agreed_checkpoint(tmp_path / "node_local", None, rank=3) is None


@dataclass(frozen=True)
class TwoRanks(Distributed):
    """One rank of two, without a process group: rank 0's broadcast step and the other rank's
    outcome are given, so that one rank's side of the agreement can be tested in one process."""

    world_size: int = 2
    step_of_rank0: int = -1
    other_rank_ok: bool = True

    def broadcast_int(self, value, device, source=0):
        return value if self.rank == source else self.step_of_rank0

    def flags(self, flag, device):
        return [flag if rank == self.rank else self.other_rank_ok for rank in range(self.world_size)]


def test_a_rank_that_sees_another_newest_checkpoint_stops_and_so_does_rank_0(tmp_path):
    config = config_from_dict({**TINY, "train": {**TINY["train"], "checkpoint_every": 1}})
    Trainer(config, tmp_path / "run").run()  # steps 3 and 4 kept
    (tmp_path / "run" / "checkpoints" / "step_00000004.safetensors").unlink()  # this node's copy lags
    follower = Trainer(config, tmp_path / "run")
    follower.dist = TwoRanks(rank=1, step_of_rank0=4)
    with pytest.raises(CheckpointError, match=r"^rank 1 expected checkpoint step 4 in .* but its newest is step 3"):
        resume_latest(follower)
    assert follower.step == 0
    follower.dist = TwoRanks(rank=1, step_of_rank0=3)  # rank 0 sees step 3 too: resumed
    assert resume_latest(follower) == tmp_path / "run" / "checkpoints" / "step_00000003.safetensors"
    assert follower.step == 3
    # rank 0 learns from the all-gather that rank 1 failed, and loads nothing either
    main = Trainer(config, tmp_path / "run")
    main.dist = TwoRanks(rank=0, other_rank_ok=False)
    with pytest.raises(
        CheckpointError, match=r"^rank 0 stopped without resuming: rank 1 could not resume checkpoint step 3"
    ):
        resume_latest(main)
    assert main.step == 0
    # and a rank 0 that cannot choose (config changed) stops the others without them reading anything
    other = Trainer(config_from_dict({**TINY, "model": {"hidden_dim": 32, "depth": 1}}), tmp_path / "run")
    other.dist = TwoRanks(rank=1, step_of_rank0=-2, other_rank_ok=False)
    with pytest.raises(CheckpointError, match=r"^rank 1 stopped without resuming: rank 0 could not resume the run"):
        resume_latest(other)


def test_global_batch_must_stay_but_grad_accumulation_may_change(tmp_path):
    Trainer(config_from_dict(TINY), tmp_path / "run").run()
    resumed = Trainer(
        config_from_dict({**TINY, "train": {**TINY["train"], "steps": 6, "grad_accumulation": 2}}), tmp_path / "run"
    ).run()
    assert (resumed.resumed_from, resumed.step) == (4, 6)
    bigger = config_from_dict({**TINY, "data": {"batch_size": 32}, "train": {**TINY["train"], "steps": 8}})
    with pytest.raises(
        RunDirError, match=r"global batch of data.batch_size=16 but the config now says 32: a run resumes only"
    ):
        Trainer(bigger, tmp_path / "run").run()  # config.yaml checked first (rank 0, before the lock)
    with pytest.raises(
        RunDirError, match=r"step_00000006.safetensors was trained with a global batch of data.batch_size=16"
    ):
        restore(Trainer(bigger, tmp_path / "run"), list_checkpoints(tmp_path / "run")[-1])


def image_folder(root, seed):
    generator = np.random.default_rng(seed)
    for i in range(8):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(generator.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_data_path_may_move_but_must_hold_the_same_data(tmp_path):
    def images(path, steps):
        return config_from_dict({
            "model": {"name": "DiT-S/2", "hidden_dim": 16, "depth": 1, "num_heads": 2},
            "data": {"name": "image_folder", "path": str(path), "batch_size": 8},
            "train": {"steps": steps, "progress": False, "eval_samples": 8, "checkpoint_every": 0},
        })  # fmt: skip

    data = image_folder(tmp_path / "scratch" / "images", seed=0)
    Trainer(images(data, 2), tmp_path / "run").run()
    (tmp_path / "project").mkdir()
    moved = data.rename(tmp_path / "project" / "images")  # the data moved between two invocations
    result = Trainer(images(moved, 3), tmp_path / "run").run()
    assert (result.resumed_from, result.step) == (2, 3)
    other = image_folder(tmp_path / "other", seed=1)  # same names and sizes, other pixels
    with pytest.raises(RunDirError, match="training data changed since"):
        Trainer(images(other, 4), tmp_path / "run").run()


def test_importing_a_small_training_module_does_not_load_the_loop():
    # the loop needs the data, network, objectives and evaluation: a checkpoint or EMA utility must not
    loaded = "import sys, dumo.training.ema, dumo.training.snapshots; print(sorted(sys.modules))"
    modules = subprocess.run([sys.executable, "-c", loaded], capture_output=True, text=True, check=True).stdout
    assert "dumo.training.ema" in modules
    assert "dumo.training.loop" not in modules and "dumo.training.trainer" not in modules
    assert "dumo.evaluation" not in modules
    # the loop's names are still there, imported on first use
    used = "from dumo.training import Trainer, TrainResult, train; print(Trainer.__module__, train.__name__)"
    assert subprocess.run([sys.executable, "-c", used], capture_output=True, text=True, check=True).stdout.split() == [
        "dumo.training.loop",
        "train",
    ]

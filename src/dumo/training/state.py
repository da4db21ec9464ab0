"""The training state of a run and its checkpoints: saving it, choosing the checkpoint to resume
from, checking that it belongs to this run and loading it back, and the teacher of the run.

A checkpoint holds the model, EMA and optimiser, the random states of torch and of the data
stream, the step and skipped-step counters and the training time, so that a resumed run draws
and computes what the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dumo.config import config_differences, config_from_dict
from dumo.data import SampleSpace
from dumo.errors import CheckpointError, ConfigError, DiskFullError, RunDirError
from dumo.files import MODEL_FORMAT, CorruptCheckpointError, load_checkpoint, save_checkpoint
from dumo.runs.checkpoints import (
    agreed_checkpoint,
    load_weights,
    optimizer_state_dict,
    optimizer_tensors,
    prefixed,
    saved_state,
    unprefixed,
)
from dumo.runs.folder import RESUMABLE_KEYS, check_global_batch
from dumo.runs.layout import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    CORRUPT_SUFFIX,
    LORA_DIR,
    TEACHER_FILE,
    checkpoint_path,
    list_checkpoints,
)
from dumo.training.initialise import initial_weights
from dumo.training.parallel import full_model_state, full_optimizer_state, load_full_optimizer_state
from dumo.version import __version__

if TYPE_CHECKING:
    from dumo.training.loop import Trainer

#: what rank 0 broadcasts instead of a checkpoint step when it starts afresh, or could not choose one
NO_CHECKPOINT, RANK0_FAILED = -1, -2


def save(trainer: Trainer) -> Path | None:
    """Write a checkpoint from rank 0. Under FSDP every rank must call it (gathering is collective)."""
    model_state = saved_state(trainer.model, full_model_state(trainer.model))
    ema_state = saved_state(trainer.ema.model, full_model_state(trainer.ema.model))
    optimizer_state = full_optimizer_state(trainer.model, trainer.optimizer)
    if not trainer.dist.is_main:
        return None
    tensors = {
        **prefixed(model_state, "model."),
        **prefixed(ema_state, "ema."),
        "rng.torch": torch.get_rng_state(),
        "rng.data": trainer.stream.state(),
    }
    if trainer.device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(trainer.device)
    optimizer_flat, param_groups = optimizer_tensors(optimizer_state)
    tensors.update(optimizer_flat)
    metadata = {
        "step": str(trainer.step),
        "skipped_steps": str(trainer.skipped_steps),
        "optimizer_param_groups": param_groups,
        "config": json.dumps(trainer.config.to_dict()),
        "data": trainer.space.to_json(),  # what sampling needs without the data (see dumo.data.space)
        "dumo_version": __version__,
        "wall_seconds": repr(trainer.wall_seconds),
    }
    pretrained = getattr(trainer.model, "pretrained_record", None)
    if pretrained is not None:  # the pipeline folder the frozen weights are read from
        metadata["pretrained"] = json.dumps(pretrained)
    path = checkpoint_path(trainer.run_dir, trainer.step)
    try:
        save_checkpoint(path, tensors, metadata)
    except DiskFullError as error:
        kept = list_checkpoints(trainer.run_dir)
        resume = f"; {kept[-1].name} is intact: free some space and resume" if kept else ""
        raise DiskFullError(f"{error}{resume}") from error
    for old in list_checkpoints(trainer.run_dir)[: -trainer.config.train.keep_checkpoints]:
        old.unlink(missing_ok=True)
    save_adapter(trainer, ema_state)
    return path


def save_adapter(trainer: Trainer, ema_state: dict[str, torch.Tensor]) -> None:
    """A LoRA run's EMA adapter in diffusers' format (and its u-head) in RUN/lora, replaced at every
    save; from ``ema_state``, the EMA model's gathered state (under FSDP rank 0 holds no full weights)."""
    from dumo.bridge.dual_head import DualHeadTransformer

    model = trainer.ema.model
    if not isinstance(model, DualHeadTransformer) or trainer.config.model.lora is None:
        return
    import shutil

    from dumo.bridge.lora import save_lora

    final = trainer.run_dir / LORA_DIR
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_lora(model, partial, ema_state)
    (partial / "step.txt").write_text(f"{trainer.step}\n")
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)


def save_everywhere(trainer: Trainer) -> None:
    """Rank 0 writes (under FSDP after every rank helped gather the state); the others wait."""
    save(trainer)
    trainer.dist.barrier()


def restore(trainer: Trainer, path: Path) -> None:
    """Load the training state at ``path`` into this rank (under FSDP every rank must call it)."""
    _load_state(trainer, path, *read_checkpoint(trainer, path))


def read_checkpoint(trainer: Trainer, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata at ``path``, verified and checked against this run; nothing loaded yet
    (and nothing collective: ranks may do it apart and then agree on the outcome)."""
    tensors, metadata = load_checkpoint(path)
    check_matches(trainer, path, metadata)
    return tensors, metadata


def _load_state(trainer: Trainer, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    load_weights(trainer.model, unprefixed(tensors, "model."), str(path))
    load_weights(trainer.ema.model, unprefixed(tensors, "ema."), str(path))
    optimizer_state = optimizer_state_dict(tensors, metadata["optimizer_param_groups"])
    load_full_optimizer_state(trainer.model, trainer.optimizer, optimizer_state)
    torch.set_rng_state(tensors["rng.torch"])
    trainer.stream.load_state(tensors["rng.data"])
    if "rng.cuda" in tensors and trainer.device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], trainer.device)
    trainer.step = int(metadata["step"])
    trainer.skipped_steps = int(metadata.get("skipped_steps", 0))
    trainer.wall_seconds = float(metadata.get("wall_seconds", 0.0))


def check_matches(trainer: Trainer, path: Path, metadata: dict[str, str]) -> None:
    """Refuse to resume a checkpoint trained with another config or on other data.

    config.yaml can be edited (or, before the run lock, replaced by a second process) between
    two invocations; the checkpoint's own record of both is what its weights were trained with.
    """
    try:
        stored = config_from_dict(json.loads(metadata["config"]))
    except (KeyError, ValueError, ConfigError):
        stored = None  # written by a dumo that had other keys: nothing reliable to compare
    if stored is not None:
        differences = config_differences(stored, trainer.config, ignore=RESUMABLE_KEYS)
        if differences == ["data.batch_size"]:
            check_global_batch(stored, trainer.config, path)
        if differences:
            key = differences[0]
            old, new = _lookup(stored.to_dict(), key), _lookup(trainer.config.to_dict(), key)
            more = f" (and {len(differences) - 1} more keys)" if len(differences) > 1 else ""
            raise RunDirError(
                f"{path} was trained with {key}={old!r} but the config now says {new!r}{more}; restore "
                f"{CONFIG_FILE} or start afresh with --overwrite"
            )
    if "pretrained" in metadata:
        from dumo.bridge.build import check_pretrained

        check_pretrained(trainer.model, json.loads(metadata["pretrained"]), str(path))
    if "data" in metadata:
        then = SampleSpace.from_json(metadata["data"])
        if then.fingerprint and then.fingerprint != trainer.space.fingerprint:
            raise RunDirError(
                f"the training data changed since {path} was written ({then.summary} then, {trainer.space.summary} "
                "now); put the original data back, or start afresh with --overwrite or another --out"
            )


def _lookup(raw: dict, dotted: str):
    node = raw
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def resume_latest(trainer: Trainer) -> Path | None:
    """Restore, on every rank, the checkpoint that rank 0 chooses; None when there is none.

    Rank 0 picks its newest checkpoint that verifies (a corrupt one is renamed aside with a
    message) and broadcasts its step; every other rank reads the checkpoint of that step from
    its own view of the run folder, and refuses if it sees another newest one (a node-local
    folder would otherwise silently restart it from other weights). All ranks then agree on
    success before any of them loads the state, so that one rank's error stops every rank
    instead of leaving the others waiting at a collective.
    """
    chosen: tuple[Path, dict[str, torch.Tensor], dict[str, str]] | None = None
    failure: Exception | None = None
    if trainer.dist.is_main:
        try:
            chosen = _choose_checkpoint(trainer)
        except Exception as error:  # re-raised below, once the other ranks know
            failure = error
    code = RANK0_FAILED if failure is not None else NO_CHECKPOINT if chosen is None else int(chosen[2]["step"])
    step = trainer.dist.broadcast_int(code, trainer.device)
    if not trainer.dist.is_main and step != RANK0_FAILED:
        try:
            path = agreed_checkpoint(trainer.run_dir, None if step == NO_CHECKPOINT else step, trainer.dist.rank)
            chosen = None if path is None else (path, *read_checkpoint(trainer, path))
        except Exception as error:
            failure = error
    succeeded = trainer.dist.flags(failure is None, trainer.device)
    if failure is not None:
        raise failure
    if not all(succeeded):
        failed = [str(rank) for rank, ok in enumerate(succeeded) if not ok]
        ranks = f"rank{'s' * (len(failed) > 1)} {', '.join(failed)}"
        what = f"checkpoint step {step}" if step >= 0 else "the run"
        raise CheckpointError(
            f"rank {trainer.dist.rank} stopped without resuming: {ranks} could not resume {what} (its error says why)"
        )
    if chosen is None:
        return None
    path, tensors, metadata = chosen
    _load_state(trainer, path, tensors, metadata)
    return path


def _choose_checkpoint(trainer: Trainer) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]] | None:
    """Rank 0: the newest checkpoint that verifies, read; a corrupt one is renamed aside with a message."""
    existing = list_checkpoints(trainer.run_dir)
    for path in reversed(existing):
        try:
            return path, *read_checkpoint(trainer, path)
        except CorruptCheckpointError as error:
            aside = path.with_name(path.name + CORRUPT_SUFFIX)
            with contextlib.suppress(OSError):
                path.rename(aside)
            older = "the previous checkpoint" if path != existing[0] else "nothing: no readable checkpoint"
            print(f"dumo: warning: {error}; moved it to {aside.name}, resuming from {older}", file=sys.stderr)
    if existing:
        raise CheckpointError(
            f"no checkpoint in {trainer.run_dir / CHECKPOINT_DIR} could be read (see above): put a good copy back, "
            "or start afresh with --overwrite"
        )
    return None


def initialise_from(trainer: Trainer, path: str) -> None:
    """Load the weights at ``path`` into model and EMA before step 0 (see dumo.training.initialise)."""
    model_config = trainer.config.model
    weights = initial_weights(
        path, trainer.scratch_model(), model_config.u_head_init, model_config, trainer.objective.head_inits()
    )
    load_weights(trainer.model, weights.state, str(weights.source))
    load_weights(trainer.ema.model, weights.state, str(weights.source))
    if trainer.objective.wants_teacher() and trainer.dist.is_main:
        save_checkpoint(trainer.run_dir / TEACHER_FILE, weights.state, {"step": "0"}, kind=MODEL_FORMAT)
    if trainer.dist.is_main:
        print(f"init_from: {weights.summary()}", flush=True)


def load_teacher(trainer: Trainer) -> None:
    """The frozen teacher from the run folder (written when the run started from init_from)."""
    path = trainer.run_dir / TEACHER_FILE
    if not path.is_file():
        raise RunDirError(f"{trainer.run_dir} has no {TEACHER_FILE}; the objective needs the teacher to resume")
    teacher = trainer.scratch_model()
    load_weights(teacher, load_checkpoint(path, kind=MODEL_FORMAT)[0], str(path))
    trainer.teacher = teacher.to(trainer.device).eval().requires_grad_(False)

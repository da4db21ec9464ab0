"""Checkpoints: one safetensors file per save, written atomically, loaded without unpickling.

The files are written and read by :mod:`dumo.files`; their names are :mod:`dumo.runs.layout`'s.
A checkpoint holds tensors under prefixes (``model.``, ``ema.``, ``optimizer.state.``,
``rng.``) and JSON metadata (format tag, step, optimiser hyper-parameters, the config).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from dumo.distributed import load_full_model_state
from dumo.errors import CheckpointError
from dumo.runs.layout import CHECKPOINT_DIR, checkpoint_path, checkpoint_step, list_checkpoints


def agreed_checkpoint(run_dir: Path, step: int | None, rank: int) -> Path | None:
    """This rank's checkpoint of the ``step`` that rank 0 resumes from (None: rank 0 starts afresh).

    Every rank reads the checkpoint from its own view of the run folder. A rank whose newest
    checkpoint is not ``step`` (a node-local folder, a copy that lags behind or runs ahead) would
    silently train from other weights than rank 0, so it gets a one-line :class:`CheckpointError`
    naming the rank, its folder and the step it expected.
    """
    existing = list_checkpoints(run_dir)
    latest = checkpoint_step(existing[-1]) if existing else None
    if latest == step:
        return None if step is None else checkpoint_path(run_dir, step)
    folder = Path(run_dir) / CHECKPOINT_DIR
    expected = f"checkpoint step {step}" if step is not None else "no checkpoint (rank 0 starts at step 0)"
    found = f"its newest is step {latest}" if latest is not None else "it has none"
    raise CheckpointError(
        f"rank {rank} expected {expected} in {folder} but {found}: every rank must see the same run folder "
        "(put --out on a shared file system, or copy rank 0's checkpoints to every node)"
    )


def prefixed(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {f"{prefix}{k}": v for k, v in state.items()}


def unprefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def saved_state(module: nn.Module, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """What a checkpoint keeps of ``module`` (of its ``state``, by default its state dict): every
    tensor, or only those its ``saved_keys`` name (a diffusers model: its trainable weights and null
    prompt; the frozen base is read from its pipeline folder)."""
    state = module.state_dict() if state is None else state
    keys = getattr(module, "saved_keys", None)
    if keys is None or not state:  # empty: a rank other than 0 after gathering a sharded model's state
        return state
    return {key: state[key] for key in keys}


def load_weights(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load a full state dict (or what :func:`saved_state` keeps of one), naming mismatching keys or
    shapes in one line instead of a long report.

    ``module`` may be sharded with FSDP (every rank passes the same full ``state``).
    """
    expected = saved_state(module)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong_shape:
            k = wrong_shape[0]
            problems.append(
                f"shape of {k}: {tuple(state[k].shape)} in checkpoint vs {tuple(expected[k].shape)} in model"
            )
        raise CheckpointError(
            f"{source} does not match this model (another architecture or config?): {'; '.join(problems)}"
        )
    # with saved_keys (a diffusers model) the frozen rest stays as the pipeline folder has it
    load_full_model_state(module, state, strict=getattr(module, "saved_keys", None) is None)


def optimizer_tensors(state_dict: dict) -> tuple[dict[str, Tensor], str]:
    """An ``optimizer.state_dict()`` as flat tensors plus its param_groups as JSON."""
    tensors = {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            tensors[f"optimizer.state.{index}.{name}"] = torch.as_tensor(value)
    return tensors, json.dumps(state_dict["param_groups"])


def optimizer_state_dict(tensors: dict[str, Tensor], param_groups_json: str) -> dict:
    """The inverse of :func:`optimizer_tensors`."""
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in unprefixed(tensors, "optimizer.state.").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = json.loads(param_groups_json)
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}

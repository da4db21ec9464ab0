"""Checkpoints: one safetensors file per save, written atomically, loaded without unpickling.

A checkpoint holds tensors under prefixes (``model.``, ``ema.``, ``optimizer.state.``,
``rng.``) and JSON metadata (format tag, step, optimiser hyper-parameters, the config).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from dumo.errors import CheckpointError


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that cannot be read or fails its checksum (as opposed to one that is
    intact but does not fit): resuming may fall back to an older one."""


FORMAT = "dumo-checkpoint"  # full training state
MODEL_FORMAT = "dumo-model"  # exported weights only (``dumo export``)
FORMAT_VERSION = "1"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_NAME = re.compile(r"^step_(\d{8,})\.safetensors$")
CORRUPT_SUFFIX = ".corrupt"  # a checkpoint that failed verification on resume is renamed aside with this
#: temporary files of :func:`atomic_write` for a checkpoint (``.step_XXXXXXXX.safetensors.<random>.tmp``)
TEMP_NAME = re.compile(r"^\.step_\d{8,}\.safetensors\.[^/]*\.tmp$")
CHECKSUM_KEY = "checksum_sha256"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}.safetensors"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files of a torn write are ignored)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> int:
    """The step in a checkpoint's file name (``step_00000042.safetensors`` -> 42)."""
    match = CHECKPOINT_NAME.match(Path(path).name)
    if match is None:
        raise CheckpointError(f"{path} is not named like a checkpoint (step_XXXXXXXX.safetensors)")
    return int(match.group(1))


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


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix) to write to; on success fsync it and
    rename it over ``path``, so that a crash at any point leaves the old file or the complete new one.

    The file gets the permissions of a plain ``open()`` (0666 less the umask): ``mkstemp`` would
    leave it 0600, unreadable to the user's group.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_current_umask())  # after the writer: some replace the file they are given
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename it over ``path``.

    A crash at any point leaves either the old file or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())  # mkstemp's 0600 would hide exports from the group
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def checksum(tensors: dict[str, Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 of every tensor (name, dtype, shape, bytes) and every metadata entry, in sorted order.

    Stored in the file and recomputed on load, so that flipped bits anywhere in the data (a bad
    disk, a partial copy) are caught instead of silently changing samples or poisoning a resume.
    """
    digest = hashlib.sha256()
    for key in sorted(metadata):
        if key != CHECKSUM_KEY:
            digest.update(f"{key}={metadata[key]}\0".encode())
    for key in sorted(tensors):
        tensor = tensors[key].detach().contiguous().cpu()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def save_checkpoint(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str], kind: str = FORMAT) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {"format": kind, "version": FORMAT_VERSION, **metadata}
    metadata[CHECKSUM_KEY] = checksum(tensors, metadata)
    atomic_write(path, safetensors_bytes(tensors, metadata=metadata))


def load_checkpoint(path: Path, kind: str = FORMAT) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a dumo file of the given kind; :class:`CheckpointError` for anything else.

    Only safetensors is read: nothing in the file can run code.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as error:  # safetensors raises several types for torn or foreign files
        raise CorruptCheckpointError(
            f"{path} is not a readable safetensors file (truncated, corrupt or another format): {error}"
        ) from None
    if metadata.get("format") != kind:
        found = metadata.get("format", "no format tag")
        raise CheckpointError(f"{path} is a safetensors file but not a {kind} file ({found})")
    if metadata.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {metadata.get('version')}; expected {FORMAT_VERSION}"
        )
    # Files written before checksums existed have none; every file dumo writes now does.
    if CHECKSUM_KEY in metadata and checksum(tensors, metadata) != metadata[CHECKSUM_KEY]:
        raise CorruptCheckpointError(f"{path} is corrupt: its data does not match the checksum stored in it")
    return tensors, metadata


def prefixed(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {f"{prefix}{k}": v for k, v in state.items()}


def unprefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_weights(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load a full state dict, naming mismatching keys or shapes in one line instead of a long report.

    ``module`` may be sharded with FSDP (every rank passes the same full ``state``).
    """
    from dumo.training.parallel import load_full_model_state

    expected = module.state_dict()
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
    load_full_model_state(module, state)


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

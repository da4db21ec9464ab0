"""Safetensors files written atomically and read back with a checksum: dumo's file I/O.

Neutral ground for every package that stores tensors (training checkpoints, exported weights,
encoded latent shards): nothing here knows about training. Only safetensors is read, so nothing
in a file can run code.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from dumo.errors import CheckpointError, DiskFullError


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that cannot be read or fails its checksum (as opposed to one that is
    intact but does not fit): resuming may fall back to an older one."""


FORMAT = "dumo-checkpoint"  # full training state
MODEL_FORMAT = "dumo-model"  # exported weights only (``dumo export``)
FORMAT_VERSION = "1"
CHECKSUM_KEY = "checksum_sha256"


#: errno values of a write that failed for want of room: the disk itself, or the user's quota on it
DISK_FULL_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


def format_bytes(count: float) -> str:
    """``12345678`` -> ``"12.3 MB"`` (decimal units, as ``df -H`` shows them)."""
    if count < 1000:
        return f"{count:.0f} B"
    for unit in ("kB", "MB", "GB"):
        count /= 1000
        if round(count, 1) < 1000:
            return f"{count:.1f} {unit}"
    return f"{count / 1000:.1f} TB"


def disk_full_error(error: OSError, path: Path, needed: int | None, written: int | None = None) -> DiskFullError:
    """A one-line :class:`DiskFullError` for ``error`` while writing ``path``: the room the file needed
    (when known; else what was written before the disk filled) and the room left beside it."""
    try:
        free = f"{format_bytes(shutil.disk_usage(path.parent).free)} free"
    except OSError:
        free = "free space unknown"
    if needed is not None:
        room = f"needed ~{format_bytes(needed)}, {free}"
    elif written:
        room = f"needed more than the {format_bytes(written)} written, {free}"
    else:
        room = free
    return DiskFullError(f"{DISK_FULL_ERRNOS[error.errno]} writing {path} ({room})")


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str | Path, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix) to write to; on success fsync it and
    rename it over ``path``, so that a crash at any point leaves the old file or the complete new one.

    The file gets the permissions of a plain ``open()`` (0666 less the umask): ``mkstemp`` would
    leave it 0600, unreadable to the user's group. A full disk gives a :class:`DiskFullError` naming
    ``path`` and the room it needed (``expected_bytes`` when the caller knows it), with the
    temporary file removed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    except OSError as error:
        if is_disk_full(error):
            raise disk_full_error(error, path, expected_bytes) from error
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_current_umask())  # after the writer: some replace the file they are given
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException as error:
        written = _size_or_none(tmp_path)
        tmp_path.unlink(missing_ok=True)
        if is_disk_full(error):
            raise disk_full_error(error, path, expected_bytes, written) from error
        raise
    fsync_directory(path.parent)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename it over ``path``.

    A crash at any point leaves either the old file or the complete new one; a full disk gives a
    :class:`DiskFullError` naming ``path`` and its size, with the temporary file removed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        if is_disk_full(error):
            raise disk_full_error(error, path, len(data)) from error
        raise
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())  # mkstemp's 0600 would hide exports from the group
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(error):  # named once the partial file is gone, so the free space shown is the real one
            raise disk_full_error(error, path, len(data)) from error
        raise
    fsync_directory(path.parent)


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


def fsync_directory(folder: Path) -> None:
    """Flush ``folder``'s entries to disk, so that a rename into it survives a power cut."""
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)

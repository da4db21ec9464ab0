"""Sample files written by every rank at once, a chunk at a time, with bounded memory.

An ``.npz`` of 50,000 ImageNet samples is 9.8 GB as uint8 (the ``arr_0`` layout of the ADM
evaluation suite): no rank gathers it. Each rank writes the samples of its own chunks into its
own memory-mapped ``.npy`` part files in a folder beside the output; at the end rank 0 copies the
parts into the ``.npz`` in sample order, one chunk at a time, and deletes them. The parts need as
much disk as the ``.npz`` (on a filesystem every rank can write to), the merge about one chunk
of memory. The ``.npz`` is an ordinary uncompressed one, as ``np.savez`` writes it.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from dumo.distributed import Distributed
from dumo.files import atomic_output, disk_full_error, is_disk_full
from dumo.runs.generation import image_shape
from dumo.sampling import rank_chunks


def parts_folder(out: Path) -> Path:
    """Where the ranks' part files of ``out`` are kept until they are merged."""
    return out.parent / f".{out.name}.parts"


class ShardedNpz:
    """``num`` samples of the arrays in ``arrays`` (key -> (per-sample shape, dtype)) written to
    ``out`` by all ranks of ``dist``, each its own chunks (``batch_size`` samples each, chunk c on
    rank c % W, as :func:`dumo.sampling.sample_chunks` deals them); ``whole`` arrays are known
    in full on rank 0 (labels) and written by it."""

    def __init__(
        self,
        out: Path,
        num: int,
        batch_size: int,
        dist: Distributed,
        arrays: Mapping[str, tuple[tuple[int, ...], np.dtype]],
        whole: Mapping[str, np.ndarray] | None = None,
    ):
        self.out, self.num, self.dist = out, num, dist
        self.batch, mine = rank_chunks(num, batch_size, dist)
        self.arrays = {key: (tuple(shape), np.dtype(dtype)) for key, (shape, dtype) in arrays.items()}
        self.whole = dict(whole or {})
        self.folder = parts_folder(out)
        if dist.is_main and self.folder.is_dir() and not self.folder.is_symlink():
            shutil.rmtree(self.folder)  # left by a killed call: dumo's own temporary name
        dist.barrier()  # no rank creates its parts before the stale ones are gone
        self.folder.mkdir(parents=True, exist_ok=True)
        count = sum(min(self.batch, num - chunk * self.batch) for chunk in mine)
        self.parts = {}
        try:
            for key, (shape, dtype) in self.arrays.items():
                path = self.part(key, dist.rank)
                self.parts[key] = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(count, *shape))
                reserve_disk(path)
        except BaseException as error:
            self.parts = {}  # unmaps the files
            for key in self.arrays:
                self.part(key, dist.rank).unlink(missing_ok=True)
            if dist.world_size == 1:
                with contextlib.suppress(OSError):
                    self.folder.rmdir()
            if is_disk_full(error):  # named once this rank's parts are gone, so the free space shown is real
                needed = sum(count * math.prod(shape) * dtype.itemsize for shape, dtype in self.arrays.values())
                raise disk_full_error(error, self.part(next(iter(self.arrays)), dist.rank), needed) from error
            raise

    def part(self, key: str, rank: int) -> Path:
        return self.folder / f"{key}.{rank:05d}.npy"

    def abort(self) -> None:
        """Remove this rank's parts after a failure, and the parts folder once it is empty, so a
        sampling that fails midway leaves nothing beside the output (each rank calls it on its own)."""
        self.parts = {}  # unmaps the files
        for key in self.arrays:
            self.part(key, self.dist.rank).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.folder.rmdir()  # fails while another rank's parts are still there; the last rank out removes it

    def write(self, key: str, start: int, values: np.ndarray) -> None:
        """Samples ``start`` to ``start + len(values) - 1`` (global indices, within one of this rank's chunks)."""
        chunk = start // self.batch
        if chunk % self.dist.world_size != self.dist.rank:
            raise ValueError(f"sample {start} belongs to chunk {chunk}, not one of rank {self.dist.rank}'s")
        offset = (chunk // self.dist.world_size) * self.batch + start - chunk * self.batch
        self.parts[key][offset : offset + len(values)] = values

    def finish(self) -> None:
        """Wait for every rank's parts; rank 0 merges them into ``out`` and removes them (all ranks call this)."""
        for part in self.parts.values():
            part.flush()
        self.parts = {}  # unmaps the files
        self.dist.barrier()
        if self.dist.is_main:
            try:
                self.merge()
            finally:
                shutil.rmtree(self.folder, ignore_errors=True)
        self.dist.barrier()  # the .npz exists once any rank returns

    def merge(self) -> None:
        chunks, world = math.ceil(self.num / self.batch), self.dist.world_size
        size = sum(self.part(key, rank).stat().st_size for key in self.arrays for rank in range(world))
        size += sum(value.nbytes for value in self.whole.values())
        with (
            atomic_output(self.out, expected_bytes=size) as tmp,
            zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive,
        ):
            for key, (shape, dtype) in self.arrays.items():
                parts = [np.load(self.part(key, rank), mmap_mode="r") for rank in range(world)]
                with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
                    np.lib.format.write_array_header_1_0(member, {**header, "shape": (self.num, *shape)})
                    for chunk in range(chunks):  # chunk c is slot c // W of rank c % W
                        first = (chunk // world) * self.batch
                        size = min(self.batch, self.num - chunk * self.batch)
                        member.write(np.ascontiguousarray(parts[chunk % world][first : first + size]).tobytes())
                del parts
            for key, value in self.whole.items():
                with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.ascontiguousarray(value), allow_pickle=False)


def reserve_disk(path: Path) -> None:
    """Allocate the blocks of the (sparse) memory-mapped file at ``path`` now: a disk that fills up
    later would kill the process with SIGBUS on a write to the map, instead of an ``OSError`` (ENOSPC)
    here. File systems without ``fallocate`` are left as they are."""
    allocate = getattr(os, "posix_fallocate", None)
    if allocate is None:
        return
    with open(path, "rb+") as handle:
        try:
            allocate(handle.fileno(), 0, path.stat().st_size)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise


def open_npz_array(path: Path, key: str) -> np.ndarray:
    """Array ``key`` of an ``.npz``: memory-mapped, read only, when it is stored uncompressed (as
    ``np.savez`` and :class:`ShardedNpz` store it), so a 10 GB sample file is read a batch at a
    time; loaded whole when it is compressed."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            with archive.open(info) as member:
                return np.lib.format.read_array(member, allow_pickle=False)
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            header = np.lib.format
            read_header = header.read_array_header_1_0 if version == (1, 0) else header.read_array_header_2_0
            shape, fortran_order, dtype = read_header(member)
            header_size = member.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: {key!r} holds Python objects, not numbers")
    with open(path, "rb") as handle:  # the member's data follows its local header (30 bytes, name, extra)
        handle.seek(info.header_offset + 26)
        name_size, extra_size = np.frombuffer(handle.read(4), dtype="<u2")
    offset = info.header_offset + 30 + int(name_size) + int(extra_size) + header_size
    order = "F" if fortran_order else "C"
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)


def npz_sink(writer, float_images: bool):
    """Write decoded batches into a :class:`dumo.runs.sample_files.ShardedNpz` ('arr_0' NHWC uint8, 'images')."""

    def sink(first: int, images, pixels) -> None:
        writer.write("arr_0", first, pixels.permute(0, 2, 3, 1).cpu().numpy())
        if float_images:
            writer.write("images", first, images.float().cpu().numpy())

    return sink


def sample_npz(out: Path, run, num: int, batch_size: int, labels, dist, float_images: bool, prompts=None):
    """The writer of a samples .npz: 'arr_0' (N, H, W, C) uint8, 'labels' (N,) int64 (-1: no class),
    with ``float_images`` 'images' (N, C, H, W) float32 in [0, 1], and with ``prompts`` (one per sample)
    'prompts' (N,) unicode strings."""
    channels, height, width = image_shape(run)
    arrays = {"arr_0": ((height, width, channels), np.uint8)}
    if float_images:
        arrays["images"] = ((channels, height, width), np.float32)
    whole = {"labels": label_array(labels, num)}
    if prompts is not None:
        whole["prompts"] = np.array(list(prompts), dtype=str)
    return ShardedNpz(out, num, batch_size, dist, arrays, whole)


def label_array(labels, num: int) -> np.ndarray:
    """Class labels as int64, -1 for samples without a class (unconditional, or conditioned on prompts)."""
    if labels is None or not hasattr(labels, "numpy"):
        return np.full(num, -1, dtype=np.int64)
    return labels.cpu().numpy().astype(np.int64)


class PngFolder:
    """A folder of one PNG per sample (``000000.png``, ... by global sample index) and, for labelled
    samples, labels.csv: every rank writes its own chunks into a temporary sibling folder, which rank
    0 then puts in place of the old folder, so that the folder holds this call's files only (16 new
    images never sit beside 48 stale ones). The old folder must hold only such files
    (``dumo.cli.common.check_png_folder``)."""

    def __init__(self, out: Path, dist, labels: np.ndarray | None, space, prompts=None):
        self.out, self.dist, self.labels, self.space = out, dist, labels, space
        self.prompts = None if prompts is None else list(prompts)  # written as prompts.txt, one a line
        self.staging = out.parent / f".{out.name}.writing"
        if dist.is_main:
            if self.staging.is_dir() and not self.staging.is_symlink():
                shutil.rmtree(self.staging)  # left by a killed call: dumo's own temporary name
            self.staging.mkdir(parents=True)
        dist.barrier()  # the staging folder exists before any rank writes to it

    def sink(self, first: int, images, pixels) -> None:
        write_png_folder(self.staging, pixels.permute(0, 2, 3, 1).cpu().numpy(), first)

    def abort(self) -> None:
        """Remove the staging folder after a failure (rank 0; the old folder is left as it was)."""
        if self.dist.is_main:
            shutil.rmtree(self.staging, ignore_errors=True)

    def finish(self) -> None:
        """Wait for every rank's images; rank 0 writes labels.csv and swaps the folder in (all ranks call this)."""
        self.dist.barrier()
        if self.dist.is_main:
            if self.labels is not None:
                write_labels_csv(self.staging, self.labels, self.space)
            if self.prompts is not None:
                from dumo.files import atomic_output

                with atomic_output(self.staging / "prompts.txt") as tmp:
                    tmp.write_text("".join(f"{prompt}\n" for prompt in self.prompts), encoding="utf-8")
            replace_folder(self.staging, self.out)
        self.dist.barrier()


def replace_folder(new: Path, out: Path) -> None:
    """Put the folder ``new`` at ``out``; an old folder there (checked to hold dumo's files only) is
    renamed aside first and deleted after, so an interruption leaves one whole folder or the other."""
    old = out.parent / f".{out.name}.replaced"
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    if out.is_symlink():
        out.unlink()  # the link goes; the folder it pointed to keeps its files
    elif out.exists():
        os.replace(out, old)
    os.replace(new, out)
    if old.exists():
        shutil.rmtree(old)


#: the files of a folder of PNG samples: its images, labels.csv, prompts.txt, and their temporary copies
PNG_FOLDER_FILES = (
    r"^(?:\d{6,}\.png|labels\.csv|prompts\.txt|\.(?:\d{6,}\.png|labels\.csv|prompts\.txt)\.[^/]+\.tmp(?:\.\w+)?)$"
)


def write_png_folder(folder: Path, pixels: np.ndarray, first: int = 0) -> None:
    """One PNG per sample of uint8 (N, H, W, C) ``pixels``, named by global sample index: first
    ``{first:06d}.png``, then the next, ... (each rank writes its own)."""
    from PIL import Image

    from dumo.files import atomic_output

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(pixels, start=first):
        with atomic_output(folder / f"{i:06d}.png") as tmp:
            Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(tmp, format="PNG")


def write_labels_csv(folder: Path, labels: np.ndarray, space) -> None:
    """labels.csv beside the PNGs of class-conditional samples: file, label, class name."""
    from dumo.files import atomic_output

    if (labels >= 0).any():
        rows = "".join(f"{i:06d}.png,{int(c)},{space.class_name(int(c))}\n" for i, c in enumerate(labels))
        with atomic_output(folder / "labels.csv") as tmp:
            tmp.write_text("file,label,class\n" + rows)

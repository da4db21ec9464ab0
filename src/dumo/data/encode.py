"""``dumo encode``: an image set into latent shards, streamed through a DataLoader, spread over ranks.

The sorted image list is cut into shards of a fixed number of images (shard k: images
[k*S, (k+1)*S)), so the output does not depend on how many ranks wrote it. Under ``torchrun``
the ranks share the shards still to be written; each reads its images with DataLoader workers,
encodes them in batches on its own device (batches never cross a shard, so every shard is
computed from the same batches whatever the number of ranks) and writes each finished shard
atomically. A rerun skips the shards already present and complete; a shard of another encoding
is refused. When every shard exists, rank 0 reduces the per-shard channel sums to the latent
mean and std and writes ``index.json`` (the format is described in :mod:`dumo.data.latents`).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dumo.data.images import DataError, ImageDataset, list_image_folder, read_rgb
from dumo.data.latents import (
    INDEX_FORMAT,
    INDEX_NAME,
    SHARD_FORMAT,
    SHARDED_VERSION,
    LatentCodec,
    check_shard,
    shard_name,
)
from dumo.distributed import Distributed

DEFAULT_SHARD_SIZE = 4096  # images per shard: 128 MiB of SD-VAE 4x32x32 float32 latents with flips


class Item(NamedTuple):
    """One image as a DataLoader worker hands it over (``error`` instead of an image it cannot read)."""

    index: int
    image: Tensor | None
    label: int
    transparent: bool
    error: str


class ImageBatch(NamedTuple):
    images: Tensor | None  # (B, C, H, W) in [0, 1]
    labels: Tensor | None
    transparent: int  # images whose transparent pixels were composited over white
    error: str  # the first unreadable image of the batch, as one line ("" if none)


def collate(items: list[Item]) -> ImageBatch:
    """Stack a batch; a worker's read error travels back as text (a worker's exception would reach the
    main process as a multi-line traceback, not as the one-line error the user should see)."""
    errors = [item.error for item in items if item.error]
    if errors:
        return ImageBatch(None, None, 0, errors[0])
    images = torch.stack([item.image for item in items])
    labels = torch.tensor([item.label for item in items], dtype=torch.int64)
    return ImageBatch(images, labels, sum(item.transparent for item in items), "")


class FolderImages(Dataset):
    """The files of an image folder, read (and ADM-centre-cropped) one by one."""

    def __init__(self, files: list[tuple[Path, int]], resolution: int | None, shape: tuple[int, ...]):
        self.files = files
        self.resolution = resolution
        self.shape = shape

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Item:
        file, label = self.files[index]
        try:
            array, transparent = read_rgb(file, self.resolution)
        except OSError as error:
            return Item(index, None, label, False, f"cannot read image {file}: {error}")
        image = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        if tuple(image.shape) != self.shape:
            return Item(
                index,
                None,
                label,
                False,
                f"images of mixed sizes: {file} is {image.shape[2]}x{image.shape[1]}, the first was "
                f"{self.shape[2]}x{self.shape[1]}; pass --resolution to centre-crop them all",
            )
        return Item(index, image, label, transparent, "")

    def describe(self, index: int) -> str:
        return str(self.files[index][0])


class MemoryImages(Dataset):
    """A small dataset already in memory (digits, MNIST, CIFAR-10, ...)."""

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Item:
        return Item(index, self.dataset.images[index], int(self.dataset.labels[index]), False, "")

    def describe(self, index: int) -> str:
        return f"image {index} of {self.dataset.name}"


@dataclass
class ImageSource:
    """What to encode: the images in a fixed order, their classes, and what identifies the set."""

    name: str
    items: FolderImages | MemoryImages
    num_classes: int
    class_names: list[str] | None
    image_shape: tuple[int, ...]
    identity: dict  # data name, folder, resolution and a digest of the items: part of every shard
    captions: list[str] | None = None  # a caption dataset: the caption of each item, kept in the shards


def image_source(name: str, path: str | None, resolution: int | None) -> ImageSource:
    """The dataset ``name`` as a source of images; an image folder (or a caption folder or manifest) is
    listed, not read."""
    if name == "captions":
        return caption_source(path, resolution)
    if name != "image_folder":
        from dumo.data import DataConfig, build_dataset

        dataset = build_dataset(DataConfig(name=name, path=path))
        digest = hashlib.sha256(dataset.labels.numpy().tobytes())
        digest.update(dataset.images.numpy().tobytes())
        identity = {"data": name, "data_path": path, "resolution": None, "items_sha256": digest.hexdigest()}
        items = MemoryImages(dataset)
        return ImageSource(name, items, dataset.num_classes, dataset.class_names, dataset.shape, identity)
    root, files, class_names = list_image_folder(path)
    try:
        first, _ = read_rgb(files[0][0], resolution)
    except OSError as error:
        raise DataError(f"cannot read image {files[0][0]}: {error}") from None
    shape = (first.shape[2], first.shape[0], first.shape[1])
    # the list itself (names relative to the folder, and labels) identifies the set: a shard
    # encoded from another list must not be mixed into this one
    digest = hashlib.sha256()
    for file, label in files:
        digest.update(f"{file.relative_to(root).as_posix()}\t{label}\n".encode())
    identity = {
        "data": name,
        "data_path": str(root.resolve()),
        "resolution": resolution,
        "items_sha256": digest.hexdigest(),
    }
    return ImageSource(name, FolderImages(files, resolution, shape), len(class_names), class_names, shape, identity)


def caption_source(path: str | None, resolution: int | None) -> ImageSource:
    """A caption folder or ``.jsonl`` manifest (:mod:`dumo.data.captions`) as a source of images whose
    captions travel into the shards."""
    from dumo.data.captions import list_caption_folder, read_manifest

    if path is None:
        raise DataError("--data captions needs --data-path: a caption folder or a .jsonl manifest")
    where = Path(path).expanduser()
    files, captions = read_manifest(where) if where.suffix.lower() == ".jsonl" else list_caption_folder(where)
    try:
        first, _ = read_rgb(files[0], resolution)
    except OSError as error:
        raise DataError(f"cannot read image {files[0]}: {error}") from None
    shape = (first.shape[2], first.shape[0], first.shape[1])
    # the images (relative to the folder or manifest) and their captions identify the set
    root = where if where.is_dir() else where.parent
    digest = hashlib.sha256()
    for file, caption in zip(files, captions):
        name = file.relative_to(root).as_posix() if file.is_relative_to(root) else str(file)
        digest.update(f"{name}\t{caption}\n".encode())
    identity = {
        "data": "captions",
        "data_path": str(where.resolve()),
        "resolution": resolution,
        "items_sha256": digest.hexdigest(),
    }
    items = FolderImages([(file, 0) for file in files], resolution, shape)
    return ImageSource("captions", items, 0, None, shape, identity, list(captions))


@dataclass
class EncodeSummary:
    num_images: int
    num_latents: int
    num_shards: int
    skipped_shards: int  # found complete and kept
    latent_shape: tuple[int, ...]
    mean: list[float]  # per channel
    std: list[float]
    transparent: int


def encode_images(
    source: ImageSource,
    codec: LatentCodec,
    out: Path,
    autoencoder_path: str | Path,
    *,
    device: torch.device,
    dist: Distributed,
    flip: bool = True,
    batch_size: int = 64,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int = 0,
) -> EncodeSummary | None:
    """Encode ``source`` into shards in the folder ``out`` (this rank's share of those still missing);
    rank 0 then writes the index and returns the summary (the other ranks return None)."""
    count = len(source.items)
    encoding = {
        **source.identity,
        "num_images": count,
        "flip": flip,
        "shard_size": shard_size,
        "autoencoder_kind": codec.kind,
        "autoencoder_path": str(Path(autoencoder_path).resolve()),
        "scaling_factor": codec.scale,
        "shift_factor": codec.shift,
    }
    encoding = json.loads(json.dumps(encoding))  # as read back from a shard (tuples become lists)
    num_shards = math.ceil(count / shard_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's barrier runs on the current device
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main:  # temporary files of shards whose writing was killed (nothing is writing yet)
        for stale in out.glob(".shard-*.tmp"):
            stale.unlink(missing_ok=True)
    done = [k for k in range(num_shards) if (out / shard_name(k)).exists()]
    for k in done:
        check_shard(out / shard_name(k), encoding, k, shard_images(k, count, shard_size))
    # every rank lists the finished shards before any rank writes one, so all split the same rest
    dist.barrier()
    pending = [k for k in range(num_shards) if k not in set(done)]
    mine = pending[dist.rank :: dist.world_size]
    failure: Exception | None = None
    try:
        write_shards(source, codec, out, encoding, mine, len(pending), device, dist, batch_size, workers)
    except Exception as error:  # every rank must reach the agreement below, or the others would hang
        failure = error
    nccl = dist.enabled and torch.distributed.get_backend() == "nccl"  # it reduces only GPU tensors
    if dist.any(failure is not None, torch.device("cuda", dist.local_rank) if nccl else torch.device("cpu")):
        if failure is not None:
            raise failure
        raise DataError("encoding failed on another rank (its error is above); rerun to resume from the shards written")
    if not dist.is_main:
        return None
    summary = write_index(source, out, encoding, num_shards, shard_size)
    summary.skipped_shards = len(done)
    return summary


def shard_images(k: int, count: int, shard_size: int) -> int:
    return min(count, (k + 1) * shard_size) - k * shard_size


def write_shards(
    source: ImageSource,
    codec: LatentCodec,
    out: Path,
    encoding: dict,
    shards: list[int],
    pending: int,
    device: torch.device,
    dist: Distributed,
    batch_size: int,
    workers: int,
) -> None:
    """Encode and write ``shards``, one DataLoader over all their images."""
    from dumo.files import save_checkpoint  # the atomic safetensors writer (tmp file + rename)

    count, flip, shard_size = len(source.items), encoding["flip"], encoding["shard_size"]
    plan = []  # (shard, image indices of one batch); batches start at each shard's first image
    for k in shards:
        first, end = k * shard_size, k * shard_size + shard_images(k, count, shard_size)
        plan += [(k, list(range(start, min(start + batch_size, end)))) for start in range(first, end, batch_size)]
    if not plan:
        return
    loader = DataLoader(
        source.items,
        batch_sampler=[indices for _, indices in plan],
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )
    originals: list[Tensor] = []
    mirrors: list[Tensor] = []
    labels: list[Tensor] = []
    transparent, written, images_done, started = 0, 0, 0, time.perf_counter()
    for (k, indices), batch in zip(plan, loader):
        if batch.error:
            raise DataError(batch.error)
        images = batch.images.to(device, non_blocking=True)
        views = [(originals, images), (mirrors, images.flip(-1))] if flip else [(originals, images)]
        for store, view in views:
            latents = codec.encode(view).float().cpu()
            if not torch.isfinite(latents).all():
                bad = int((~torch.isfinite(latents.flatten(1))).any(1).nonzero()[0])
                raise DataError(
                    f"the autoencoder gave non-finite latents (NaN or inf) for {source.items.describe(indices[bad])}"
                )
            store.append(latents)
        labels.append(batch.labels)
        transparent += batch.transparent
        if indices[-1] != k * shard_size + shard_images(k, count, shard_size) - 1:
            continue
        latents = torch.cat(originals + mirrors)
        dims = [0, *range(2, latents.dim())]
        tensors = {
            "latents": latents,
            "labels": torch.cat(labels * (2 if flip else 1)),
            # float64 sums per channel: the index reduces them over shards to the mean and std
            "channel_sum": latents.double().sum(dims),
            "channel_sum_sq": latents.double().square().sum(dims),
        }
        metadata = {
            "version": str(SHARDED_VERSION),
            "shard": str(k),
            "first_image": str(k * shard_size),
            "images": str(shard_images(k, count, shard_size)),
            "transparent_images": str(transparent),
            "encoding": json.dumps(encoding, sort_keys=True),
        }
        if source.captions is not None:  # the originals' captions, in order (mirrors repeat them)
            first = k * shard_size
            metadata["captions"] = json.dumps(source.captions[first : first + shard_images(k, count, shard_size)])
        save_checkpoint(out / shard_name(k), tensors, metadata, kind=SHARD_FORMAT)
        originals, mirrors, labels, transparent = [], [], [], 0
        written += 1
        images_done += shard_images(k, count, shard_size)
        if dist.is_main:
            rate = images_done / (time.perf_counter() - started)
            print(
                f"dumo encode: wrote {shard_name(k)} ({written}/{len(shards)} of rank 0; {pending} shards to write "
                f"over {dist.world_size} ranks), about {rate:.0f} images/s",
                file=sys.stderr,
                flush=True,
            )


def recorded_text_encoders(out: Path, encoding: dict) -> list[dict]:
    """The text encoders whose caption embeddings an earlier index of this same encoding listed (a rerun
    keeps them: their embeddings are still in the folder)."""
    try:
        previous = json.loads((out / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(previous, dict) or previous.get("encoding") != encoding:
        return []
    return list(previous.get("text_encoders") or [])


def write_index(source: ImageSource, out: Path, encoding: dict, num_shards: int, shard_size: int) -> EncodeSummary:
    """Check that every shard is there, reduce their channel sums and write ``index.json`` atomically."""
    from dumo.files import atomic_write

    count = len(source.items)
    entries, latent_shape, num_latents, transparent = [], None, 0, 0
    sums, squares = None, None
    for k in range(num_shards):
        path = out / shard_name(k)
        if not path.is_file():
            raise DataError(f"{path} is missing after encoding; rerun the same command to write it")
        images = shard_images(k, count, shard_size)
        shapes = check_shard(path, encoding, k, images)
        if latent_shape is None:
            latent_shape = shapes["latents"][1:]
        elif shapes["latents"][1:] != latent_shape:
            raise DataError(f"{path} holds latents of shape {shapes['latents'][1:]}, the others {latent_shape}")
        with safe_open(str(path), framework="pt") as handle:
            shard_sum, shard_squares = handle.get_tensor("channel_sum"), handle.get_tensor("channel_sum_sq")
            transparent += int(handle.metadata()["transparent_images"])
        sums = shard_sum if sums is None else sums + shard_sum
        squares = shard_squares if squares is None else squares + shard_squares
        num_latents += shapes["latents"][0]
        entries.append({"file": shard_name(k), "images": images, "latents": shapes["latents"][0]})
    values = num_latents * math.prod(latent_shape[1:])  # per channel
    mean = sums / values
    std = (squares / values - mean.square()).clamp(min=0).sqrt()
    index = {
        "format": INDEX_FORMAT,
        "version": SHARDED_VERSION,
        "autoencoder_kind": encoding["autoencoder_kind"],
        "autoencoder_path": encoding["autoencoder_path"],
        "scaling_factor": encoding["scaling_factor"],
        "shift_factor": encoding["shift_factor"],
        "source": source.name,
        "image_shape": list(source.image_shape),
        "latent_shape": latent_shape,
        "num_classes": source.num_classes,
        "class_names": source.class_names,
        "flipped_copies": encoding["flip"],
        "num_images": count,
        "num_latents": num_latents,
        "statistics": {"mean": mean.tolist(), "std": std.tolist()},
        "transparent_images": transparent,
        "encoding": encoding,
        "shards": entries,
    }
    if source.captions is not None:  # shards carry captions: data.name caption_latents reads them
        index["captions"] = True
        index["text_encoders"] = recorded_text_encoders(out, encoding)
    atomic_write(out / INDEX_NAME, (json.dumps(index, indent=1) + "\n").encode())
    return EncodeSummary(
        count, num_latents, num_shards, 0, tuple(latent_shape), mean.tolist(), std.tolist(), transparent
    )

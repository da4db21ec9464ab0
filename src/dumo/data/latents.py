"""Latent datasets: images encoded once by a pretrained autoencoder, trained on in latent space.

``dumo encode`` (:mod:`dumo.data.encode`) writes a folder of safetensors shards plus an
``index.json``: shard k holds the latents of images [k*S, (k+1)*S) of the sorted image list
(S: the shard size), already multiplied by the autoencoder's scaling factor (after subtracting its
shift factor, where it has one), then those of their horizontal mirror images (included by default,
as is standard), and their ``labels``. The index records the autoencoder (kind and local folder) so
samples can be decoded back to images, ``x = decode(z / scale + shift)``, and the per-channel mean
and std of the latents. :class:`LatentDataset` memory-maps the shards (nothing is read into memory
but the labels); it also reads the single-file format of earlier versions. Weights are only ever
read from a local folder.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor, nn

from dumo.data.images import DataError, ImageDataset
from dumo.errors import CheckpointError

LATENTS_FORMAT = "dumo-latents"  # the single file of earlier versions (read, no longer written)
SHARD_FORMAT = "dumo-latents-shard"
INDEX_FORMAT = "dumo-latents-index"
INDEX_NAME = "index.json"
SHARDED_VERSION = 1
AUTOENCODER_KINDS = ("sd-vae", "dc-ae")


def load_autoencoder(kind: str, path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """diffusers' AutoencoderKL (SD-VAE) or AutoencoderDC (DC-AE) from a local folder, no download."""
    if kind not in AUTOENCODER_KINDS:
        raise DataError(f"unknown autoencoder kind {kind!r}; choose from {', '.join(AUTOENCODER_KINDS)}")
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise DataError(f"no autoencoder at {folder} (expected a diffusers folder with config.json and weights)")
    try:
        from diffusers import AutoencoderDC, AutoencoderKL
    except ImportError:
        raise DataError("latent models need diffusers: pip install diffusers") from None
    cls = AutoencoderKL if kind == "sd-vae" else AutoencoderDC
    try:
        model = cls.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot load the {kind} autoencoder from {folder}: {error}") from None
    return model.to(device).eval().requires_grad_(False)


class LatentCodec:
    """Images in [0, 1] <-> scaled latents, for one autoencoder."""

    def __init__(self, autoencoder: nn.Module, kind: str):
        self.autoencoder = autoencoder
        self.kind = kind
        self.scale = float(getattr(autoencoder.config, "scaling_factor", 1.0) or 1.0)
        self.shift = float(getattr(autoencoder.config, "shift_factor", 0.0) or 0.0)
        self.in_channels = int(autoencoder.config.in_channels)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Posterior mean (SD-VAE) or latent (DC-AE) of images in [0, 1], scaled for training."""
        x = images * 2 - 1
        if x.shape[1] == 1 and self.in_channels == 3:  # grey data through an RGB autoencoder
            x = x.expand(-1, 3, -1, -1)
        encoded = self.autoencoder.encode(x)
        latents = encoded.latent_dist.mean if self.kind == "sd-vae" else encoded.latent
        return (latents - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        images = self.autoencoder.decode(latents / self.scale + self.shift).sample
        return ((images + 1) / 2).clamp(0, 1)


# -- the sharded format ------------------------------------------------------------------------------


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_shard_header(path: Path) -> tuple[dict[str, str], dict[str, list[int]]]:
    """A shard's metadata and tensor shapes, from its header alone (no tensor is read).

    :class:`DataError` (one line) for a file that is not a readable dumo latent shard.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            shapes = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises several types for torn or foreign files
        raise DataError(
            f"{path} is not a readable safetensors file (truncated, corrupt or another format: {first_line(error)}); "
            "delete it and rerun 'dumo encode' to encode its images again"
        ) from None
    if metadata.get("format") != SHARD_FORMAT:
        found = metadata.get("format", "no format tag")
        raise DataError(f"{path} is a safetensors file but not a dumo latent shard ({found})")
    if metadata.get("version") != str(SHARDED_VERSION):
        raise DataError(f"{path} has latent shard version {metadata.get('version')}; expected {SHARDED_VERSION}")
    return metadata, shapes


def check_shard(path: Path, encoding: dict, index: int, images: int) -> dict[str, list[int]]:
    """Refuse (one line) a shard that is unreadable, of another encoding, or not shard ``index`` of
    ``images`` images; return its tensor shapes."""
    metadata, shapes = read_shard_header(path)
    try:
        recorded = json.loads(metadata.get("encoding", ""))
    except ValueError:
        recorded = {}
    differing = [key for key in sorted(set(encoding) | set(recorded)) if recorded.get(key) != encoding.get(key)]
    if differing:
        key = differing[0]
        raise DataError(
            f"{path} belongs to another encoding ({key} {recorded.get(key)!r}, not {encoding.get(key)!r}); "
            "write to another folder or delete its shards"
        )
    rows = images * (2 if encoding.get("flip") else 1)
    latents, labels = shapes.get("latents", []), shapes.get("labels", [])
    if metadata.get("shard") != str(index) or latents[:1] != [rows] or labels != [rows]:
        raise DataError(
            f"{path} is not shard {index} of {images} images ({rows} latents) of this encoding; "
            "delete it and rerun 'dumo encode' to encode its images again"
        )
    return shapes


def read_index(folder: Path) -> dict:
    """The ``index.json`` of a shard folder; :class:`DataError` if it is missing or not one."""
    file = folder / INDEX_NAME
    if not file.is_file():
        if any(folder.glob("shard-*.safetensors")):
            raise DataError(
                f"{folder} has shards but no {INDEX_NAME}: the encoding did not finish; "
                "rerun the same 'dumo encode' command to complete it"
            )
        raise DataError(f"{folder} is not a latent folder written by 'dumo encode' (no {INDEX_NAME})")
    try:
        index = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{file} is not readable JSON: {first_line(error)}") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise DataError(f"{file} is not a dumo latent index")
    if index.get("version") != SHARDED_VERSION:
        raise DataError(f"{file} has latent index version {index.get('version')}; expected {SHARDED_VERSION}")
    return index


def memory_map(path: Path, name: str) -> np.ndarray:
    """Tensor ``name`` of a safetensors file as a read-only float32 numpy memmap.

    The file's layout (an 8-byte header length, a JSON header of dtypes, shapes and byte offsets,
    then the data) is the documented safetensors format; safetensors itself reads tensors only
    into memory, which is what a data set larger than RAM must avoid.
    """
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        entry = json.loads(handle.read(size))[name]
    if entry["dtype"] != "F32":
        raise DataError(f"{path}: {name} is {entry['dtype']}, not float32")
    begin, _ = entry["data_offsets"]
    return np.memmap(path, dtype=np.float32, mode="r", offset=8 + size + begin, shape=tuple(entry["shape"]))


class ShardedLatents:
    """The latents of several shards as one read-only (N, C, h, w) array.

    Each shard is memory-mapped; indexing (an int, a slice or a tensor of indices) reads just
    those rows into a new float32 tensor, so the set is never held in memory as a whole.
    """

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        lengths = np.array([len(array) for array in arrays], dtype=np.int64)
        self.ends = np.cumsum(lengths)
        self.starts = self.ends - lengths
        self.shape = torch.Size((int(self.ends[-1]), *arrays[0].shape[1:]))
        self.dtype = torch.float32

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int | slice | Tensor | np.ndarray | list[int]) -> Tensor:
        if isinstance(index, int):
            return self[[index]][0]
        if isinstance(index, slice):
            rows = np.arange(*index.indices(len(self)), dtype=np.int64)
        else:
            rows = np.asarray(index.cpu() if isinstance(index, Tensor) else index).reshape(-1)
            rows = np.flatnonzero(rows) if rows.dtype == np.bool_ else rows.astype(np.int64)
        rows = np.where(rows < 0, rows + len(self), rows)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"latent index out of range for {len(self)} latents")
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.float32)
        shard_of = np.searchsorted(self.ends, rows, side="right")
        for shard in np.unique(shard_of):
            picked = shard_of == shard
            out[picked] = self.arrays[shard][rows[picked] - self.starts[shard]]
        return torch.from_numpy(out)


class LatentDataset(ImageDataset):
    """Scaled latents as training data; ``unstandardise`` decodes them to images in [0, 1].

    ``path`` is a folder written by ``dumo encode`` (memory-mapped) or a latent file of earlier
    versions (read whole). ``statistics`` holds the per-channel mean and std of the latents.
    """

    def __init__(self, path: str | Path, autoencoder_path: str | None = None):
        path = Path(path).expanduser()
        self.path = path
        self._codec: LatentCodec | None = None
        if path.is_dir():
            self._read_shards(path)
        else:
            self._read_file(path)
        self.autoencoder_path = autoencoder_path or self.metadata["autoencoder_path"]

    def _read_shards(self, folder: Path) -> None:
        index = read_index(folder)
        try:
            shards = index["shards"]
            encoding = index["encoding"]
            arrays, labels = [], []
            for number, entry in enumerate(shards):
                file = folder / entry["file"]
                if not file.is_file():
                    raise DataError(f"{file} is missing (listed in {folder / INDEX_NAME}); rerun 'dumo encode'")
                check_shard(file, encoding, number, int(entry["images"]))
                arrays.append(memory_map(file, "latents"))
                with safe_open(str(file), framework="pt") as handle:
                    labels.append(handle.get_tensor("labels"))
            mean, std = index["statistics"]["mean"], index["statistics"]["std"]
            num_classes = int(index["num_classes"])
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"{folder / INDEX_NAME} is incomplete ({first_line(error)}); rerun 'dumo encode'") from None
        if not arrays:
            raise DataError(f"{folder}: the dataset is empty")
        self.metadata = index
        self.name = "latents"
        self.images = ShardedLatents(arrays)
        self.labels = torch.cat(labels).long()
        self.num_classes = num_classes
        self.class_names = index.get("class_names")
        self.shape = tuple(self.images.shape[1:])
        self.statistics = (torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64))

    def _read_file(self, path: Path) -> None:
        from dumo.files import load_checkpoint

        try:
            tensors, metadata = load_checkpoint(path, kind=LATENTS_FORMAT)
        except CheckpointError as error:
            raise DataError(str(error)) from None
        # NaN or inf in the data would make every step that draws it non-finite and be skipped
        # silently, step after step: refuse the file instead. (``dumo encode`` refuses them when it
        # writes shards.)
        bad = int((~torch.isfinite(tensors["latents"])).sum())
        if bad:
            raise DataError(
                f"{path} holds {bad} non-finite latent values (NaN or inf); re-encode it with 'dumo encode'"
            )
        self.metadata = metadata
        super().__init__("latents", tensors["latents"], tensors["labels"], int(metadata["num_classes"]))
        self.images = tensors["latents"].float()  # latents are not images: no clamp to [0, 1]
        dims = [0, *range(2, self.images.dim())]
        variance, mean = torch.var_mean(self.images, dim=dims, correction=0)
        self.statistics = (mean.double(), variance.double().sqrt())

    def standardise(self, latents: Tensor) -> Tensor:
        return latents

    def unstandardise(self, x: Tensor) -> Tensor:
        return self.codec().decode(x.to(next(self.codec().autoencoder.parameters()).device)).cpu()

    def codec(self) -> LatentCodec:
        if self._codec is None:
            kind = self.metadata["autoencoder_kind"]
            self._codec = LatentCodec(load_autoencoder(kind, self.autoencoder_path), kind)
        return self._codec


class RandomLatentDataset(LatentDataset):
    """Standard-normal "latents" with random labels, made from a seed: data for timing, not learning.

    The benchmark configs (configs/bench) train on it so that ``dumo train`` times the same
    work as benchmarks/step_cost.py without any encoded dataset on disk. There is no decoder.
    """

    SIZE = 4096

    def __init__(self, shape: tuple[int, ...], num_classes: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        latents = torch.randn((self.SIZE, *shape), generator=generator)
        labels = torch.randint(num_classes, (self.SIZE,), generator=generator)
        ImageDataset.__init__(self, "random_latents", latents, labels, num_classes)
        self.images = latents  # not images: no clamp to [0, 1]
        self.statistics = (torch.zeros(shape[0], dtype=torch.float64), torch.ones(shape[0], dtype=torch.float64))
        self.path = None
        self.metadata = {}
        self.autoencoder_path = None
        self._codec = None

    def unstandardise(self, x: Tensor) -> Tensor:
        raise DataError("random_latents have no decoder: they are data for timing runs, not for samples")

"""Datasets and the configs that select them.

2-D toys are generated on the fly; image datasets are read once from local files into memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dumo.data.batch import Batch
from dumo.data.images import (
    DataError,
    ImageDataset,
    ImageStream,
    load_cifar10,
    load_digits_dataset,
    load_fashion_mnist,
    load_image_folder,
    load_mnist_json,
)
from dumo.data.latents import LatentDataset, RandomLatentDataset
from dumo.data.space import SampleSpace, data_fingerprint, data_summary
from dumo.data.toy import TOY_DATASETS, ToyDataset, ToyStream
from dumo.schema import require

IMAGE_SHAPES = {"digits": (1, 8, 8), "fashion_mnist": (1, 28, 28), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
#: training images of the built-in image datasets (the splits dumo reads)
IMAGE_COUNTS = {"digits": 1_797, "mnist": 60_000, "fashion_mnist": 60_000, "cifar10": 50_000}
Dataset = ToyDataset | ImageDataset


@dataclass
class DataConfig:
    name: Literal[
        "moons",
        "8gaussians",
        "checkerboard",
        "digits",
        "fashion_mnist",
        "mnist",
        "cifar10",
        "image_folder",
        "latents",
        "random_latents",
    ] = "moons"
    batch_size: int = 256
    conditional: bool = False  # train with class labels (needed for guidance, zeta > 0)
    path: str | None = None  # file-based datasets: where the files are (default: the usual install location)
    resolution: int | None = None  # image_folder: centre-crop to this size (ADM preprocessing)
    hflip: bool = False  # random horizontal flips (images)
    latent_shape: tuple[int, ...] | None = None  # latents: expected (C, H, W), checked against the file
    num_classes: int | None = None  # latents: expected number of classes, checked against the file
    # (random_latents, data for timing runs: both required; the tensors come from a fixed seed)
    autoencoder_path: str | None = None  # latents: decoder folder (default: the one recorded by dumo encode)
    # images in one epoch of the training data, for a plan made without the files (a latents file's own
    # count wins where it can be read; the built-in datasets know theirs); null = unknown
    train_images: int | None = None

    def validate(self, prefix: str) -> None:
        require(self.batch_size > 0, f"{prefix}.batch_size must be > 0; got {self.batch_size}")
        if self.name == "random_latents":
            require(
                self.latent_shape is not None and self.num_classes is not None,
                f"{prefix}: random_latents needs latent_shape and num_classes",
            )
        require(self.resolution is None or self.resolution > 0, f"{prefix}.resolution must be > 0 or null")
        require(self.train_images is None or self.train_images > 0, f"{prefix}.train_images must be > 0 or null")
        if self.conditional and self.name in TOY_DATASETS:
            require(
                TOY_DATASETS[self.name].num_classes > 0,
                f"{prefix}.conditional: dataset '{self.name}' has no class labels",
            )

    def is_generated(self) -> bool:
        """Whether the samples are drawn afresh for every batch (toys, random latents): no epochs."""
        return self.name in TOY_DATASETS or self.name == "random_latents"

    def expected_images(self) -> int | None:
        """Training images in one epoch as far as the config tells: ``train_images``, else a built-in
        dataset's own count (None: only the files know)."""
        return self.train_images if self.train_images is not None else IMAGE_COUNTS.get(self.name)

    def expected_shape(self) -> tuple[int, ...] | None:
        """The shape of one sample, known without reading the data (None for an uncropped image folder)."""
        if self.name in TOY_DATASETS:
            return TOY_DATASETS[self.name].shape
        if self.name == "image_folder":
            return (3, self.resolution, self.resolution) if self.resolution else None
        if self.name in ("latents", "random_latents"):
            return self.latent_shape
        return IMAGE_SHAPES[self.name]

    def expected_classes(self) -> int | None:
        """Number of classes, known without reading the images (an image folder's subfolders are
        counted; None where only the data file knows)."""
        if self.name in TOY_DATASETS:
            return TOY_DATASETS[self.name].num_classes
        if self.name in ("latents", "random_latents"):
            return self.num_classes
        if self.name == "image_folder":
            root = Path(self.path).expanduser() if self.path else None
            if root is None or not root.is_dir():
                return None
            return max(1, sum(1 for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))
        return 10


def build_dataset(config: DataConfig) -> Dataset:
    """The dataset named in ``config`` (image datasets are read from disk here)."""
    if config.name in TOY_DATASETS:
        return TOY_DATASETS[config.name]()
    if config.name == "digits":
        return load_digits_dataset()
    if config.name == "fashion_mnist":
        return load_fashion_mnist(config.path)
    if config.name == "mnist":
        return load_mnist_json(config.path)
    if config.name == "cifar10":
        return load_cifar10(config.path)
    if config.name == "random_latents":
        return RandomLatentDataset(tuple(config.latent_shape), config.num_classes)
    if config.name == "latents":
        if config.path is None:
            raise DataError("the latents dataset needs data.path: a file written by 'dumo encode'")
        dataset = LatentDataset(config.path, config.autoencoder_path)
        if config.latent_shape is not None and tuple(config.latent_shape) != dataset.shape:
            raise DataError(
                f"{config.path} holds latents of shape {dataset.shape}, not data.latent_shape {config.latent_shape}"
            )
        return dataset
    return load_image_folder(config.path, config.resolution)


def build_stream(dataset: Dataset, config: DataConfig, seed: int) -> ToyStream | ImageStream:
    if isinstance(dataset, ImageDataset):
        return ImageStream(dataset, config.batch_size, config.conditional, seed, config.hflip)
    return ToyStream(dataset, config.batch_size, config.conditional, seed)


def conditioning_classes(dataset: Dataset, config: DataConfig) -> int:
    """Classes the model is conditioned on (0 = unconditional)."""
    return dataset.num_classes if config.conditional else 0


__all__ = [
    "Batch",
    "DataConfig",
    "DataError",
    "Dataset",
    "ImageDataset",
    "ImageStream",
    "LatentDataset",
    "SampleSpace",
    "ToyDataset",
    "ToyStream",
    "build_dataset",
    "build_stream",
    "conditioning_classes",
    "data_fingerprint",
    "data_summary",
]

"""Datasets and the configs that select them.

2-D toys and the shapes world are generated on the fly; image datasets (captioned ones too) are
read once from local files into memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dumo.data.batch import Batch
from dumo.data.caption_latents import CaptionLatentDataset, caption_latent_prompts
from dumo.data.captions import CaptionDataset, CaptionStream, load_captions
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
from dumo.data.prompts import TEXT_DATASETS, Prompts, PromptStream, TextConfig, TextSpec, text_spec
from dumo.data.shapes import CATEGORIES, ShapesError, ShapesStream, ShapesWorld, parse_held_out, vocabulary
from dumo.data.space import SampleSpace, data_fingerprint, data_summary
from dumo.data.toy import TOY_DATASETS, ToyDataset, ToyStream
from dumo.errors import ConfigError
from dumo.schema import require

IMAGE_SHAPES = {"digits": (1, 8, 8), "fashion_mnist": (1, 28, 28), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
#: training images of the built-in image datasets (the splits dumo reads)
IMAGE_COUNTS = {"digits": 1_797, "mnist": 60_000, "fashion_mnist": 60_000, "cifar10": 50_000}
Dataset = ToyDataset | ImageDataset | ShapesWorld


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
        "shapes",
        "captions",
        "caption_latents",
    ] = "moons"
    batch_size: int = 256
    conditional: bool = False  # train with class labels (needed for guidance, zeta > 0)
    path: str | None = None  # file-based datasets: where the files are (default: the usual install location)
    # (captions: a caption folder, image + same-named .txt, or a .jsonl manifest)
    resolution: int | None = None  # image_folder: centre-crop to this size (ADM preprocessing)
    hflip: bool = False  # random horizontal flips (images)
    latent_shape: tuple[int, ...] | None = None  # (caption_)latents: expected (C, H, W), checked with the file
    num_classes: int | None = None  # latents: expected number of classes, checked against the file
    # (random_latents, data for timing runs: both required; the tensors come from a fixed seed)
    autoencoder_path: str | None = None  # latents: decoder folder (default: the one recorded by dumo encode)
    # images in one epoch of the training data, for a plan made without the files (a latents file's own
    # count wins where it can be read; the built-in datasets know theirs); null = unknown
    train_images: int | None = None

    # shapes: colour-shape pairs no training prompt names, e.g. ["yellow triangle"]; null = yellow triangle,
    # purple circle and green square; [] = none
    held_out: list[str] | None = None
    # shapes: weights of the prompt categories (single, two_objects, counting, position; a category left out
    # weighs 0); null = all four equally often
    prompt_mix: dict[str, float] | None = None

    @property
    def is_text(self) -> bool:
        """Whether every sample comes with a prompt (the network is conditioned on text)."""
        return self.name in TEXT_DATASETS

    def held_out_pairs(self) -> frozenset[tuple[str, str]]:
        """The shapes world's held-out colour-shape pairs (the default three when held_out is null)."""
        from dumo.data.shapes import DEFAULT_HELD_OUT

        return DEFAULT_HELD_OUT if self.held_out is None else parse_held_out(self.held_out)

    def category_weights(self) -> tuple[float, ...] | None:
        """prompt_mix as one weight per category, in the world's order (None: all equal)."""
        if self.prompt_mix is None:
            return None
        return tuple(float(self.prompt_mix.get(category, 0.0)) for category in CATEGORIES)

    def validate(self, prefix: str) -> None:
        require(self.batch_size > 0, f"{prefix}.batch_size must be > 0; got {self.batch_size}")
        if self.name != "shapes":
            for key in ("held_out", "prompt_mix"):
                require(getattr(self, key) is None, f"{prefix}.{key} applies to data.name=shapes only")
        else:
            unknown = [key for key in self.prompt_mix or {} if key not in CATEGORIES]
            require(
                not unknown,
                f"{prefix}.prompt_mix: unknown category {unknown[:1]} (categories: {', '.join(CATEGORIES)})",
            )
            try:
                ShapesWorld(self.held_out_pairs(), self.category_weights())
            except ShapesError as error:
                raise ConfigError(f"{prefix}: {error}") from None
        require(
            not (self.conditional and self.is_text),
            f"{prefix}.conditional is for class labels; data.name={self.name} conditions on its prompts: remove it",
        )
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
        if self.name in ("latents", "random_latents", "caption_latents"):
            return self.latent_shape
        if self.name == "shapes":
            return ShapesWorld.shape
        if self.name == "captions":
            return (3, self.resolution, self.resolution) if self.resolution else None
        return IMAGE_SHAPES[self.name]

    def expected_classes(self) -> int | None:
        """Number of classes, known without reading the images (an image folder's subfolders are
        counted; None where only the data file knows)."""
        if self.name in TOY_DATASETS:
            return TOY_DATASETS[self.name].num_classes
        if self.name in ("latents", "random_latents"):
            return self.num_classes
        if self.is_text:
            return 0
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
    if config.name == "shapes":
        return ShapesWorld(config.held_out_pairs(), config.category_weights())
    if config.name == "captions":
        return load_captions(config.path, config.resolution)
    if config.name == "random_latents":
        return RandomLatentDataset(tuple(config.latent_shape), config.num_classes)
    if config.name in ("latents", "caption_latents"):
        if config.path is None:
            raise DataError(f"the {config.name} dataset needs data.path: a folder written by 'dumo encode'")
        if config.name == "caption_latents":
            dataset = CaptionLatentDataset(config.path, config.autoencoder_path)
        else:
            dataset = LatentDataset(config.path, config.autoencoder_path)
        if config.latent_shape is not None and tuple(config.latent_shape) != dataset.shape:
            raise DataError(
                f"{config.path} holds latents of shape {dataset.shape}, not data.latent_shape {config.latent_shape}"
            )
        return dataset
    return load_image_folder(config.path, config.resolution)


def build_stream(
    dataset: Dataset, config: DataConfig, seed: int, prompts: Prompts | None = None
) -> ToyStream | ImageStream | PromptStream:
    """The training stream of ``dataset``; a text dataset's prompts become ``prompts``' conditions."""
    if isinstance(dataset, (ShapesWorld, CaptionDataset, CaptionLatentDataset)):
        if prompts is None:
            raise ValueError(f"the {dataset.name} dataset needs the prompts' encoding (dataset_prompts)")
        if isinstance(dataset, ShapesWorld):
            return PromptStream(ShapesStream(dataset, config.batch_size, seed), prompts)
        return PromptStream(CaptionStream(dataset, config.batch_size, seed, config.hflip), prompts)  # type: ignore[arg-type]
    if isinstance(dataset, ImageDataset):
        return ImageStream(dataset, config.batch_size, config.conditional, seed, config.hflip)
    return ToyStream(dataset, config.batch_size, config.conditional, seed)


def dataset_prompts(dataset: Dataset, config: TextConfig) -> Prompts | None:
    """How the prompts of ``dataset`` become conditions for a new run (None: the data has no prompts):
    the small encoder's vocabulary is the shapes world's words or the captions' words (captioned latents:
    also the embeddings ``dumo encode --text-encoder`` stored with them)."""
    if isinstance(dataset, CaptionLatentDataset):
        return caption_latent_prompts(dataset, config)
    if isinstance(dataset, ShapesWorld):
        return Prompts(text_spec(config, words=vocabulary()), config)
    if isinstance(dataset, CaptionDataset):
        return Prompts(text_spec(config, sentences=dataset.captions), config)
    return None


def config_text_spec(data: DataConfig, text: TextConfig) -> TextSpec | None:
    """How the prompts of the data of a config are encoded (None: the data has no prompts); reads the
    captions (and loads a frozen encoder) where the data's words are needed."""
    if not data.is_text:
        return None
    prompts = dataset_prompts(build_dataset(data), text)
    return None if prompts is None else prompts.spec


def conditioning_classes(dataset: Dataset, config: DataConfig) -> int:
    """Classes the model is conditioned on (0 = unconditional)."""
    return dataset.num_classes if config.conditional else 0


__all__ = [
    "Batch",
    "CaptionDataset",
    "CaptionLatentDataset",
    "PromptStream",
    "Prompts",
    "ShapesWorld",
    "TextConfig",
    "TextSpec",
    "dataset_prompts",
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
    "config_text_spec",
    "conditioning_classes",
    "data_fingerprint",
    "data_summary",
]

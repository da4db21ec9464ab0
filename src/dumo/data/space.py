"""What sampling needs to know about a dataset, recorded in every checkpoint and export.

A trained model draws points in its own (standardised) space; turning them back into data needs
the shape, the classes, the standardisation (2-D toys) or the autoencoder (latents). These are
stored as JSON in the weights' metadata, so that an export samples with nothing but itself: no
image folder, no scikit-learn, no latent file. A fingerprint of the data lets a resumed run check
that it still trains on what its checkpoints were trained on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dumo.data.images import DataError, ImageDataset
from dumo.data.latents import LatentCodec, LatentDataset, RandomLatentDataset, load_autoencoder
from dumo.data.prompts import TextSpec
from dumo.data.shapes import CATEGORIES, ShapesWorld
from dumo.data.toy import TOY_DATASETS, ToyDataset

#: images hashed for the fingerprint, evenly spaced (all of them would take minutes for ImageNet latents)
FINGERPRINT_IMAGES = 1024


def data_fingerprint(dataset: ToyDataset | ImageDataset | ShapesWorld) -> str:
    """A short hash of the data: its size, shape, classes, every label (caption) and an evenly spaced
    subset of the images (the standardisation for 2-D toys, the held-out pairs and prompt mix of the
    shapes world: data that is generated, not read)."""
    digest = hashlib.sha256()
    if isinstance(dataset, ToyDataset):
        mean, std = dataset.standardisation
        digest.update(f"{dataset.name}|{mean.tolist()}|{std.tolist()}".encode())
        return digest.hexdigest()[:16]
    if isinstance(dataset, ShapesWorld):
        digest.update(f"{dataset.name}|{sorted(dataset.held_out)}|{dataset.mix}".encode())
        return digest.hexdigest()[:16]
    digest.update(f"{dataset.name}|{len(dataset)}|{dataset.shape}|{dataset.num_classes}".encode())
    digest.update(dataset.labels.numpy().tobytes())
    for caption in getattr(dataset, "captions", ()):
        digest.update(f"{caption}\0".encode())
    stride = max(1, len(dataset) // FINGERPRINT_IMAGES)
    digest.update(dataset.images[::stride].contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def data_summary(dataset: ToyDataset | ImageDataset | ShapesWorld) -> str:
    """One human line about the data, e.g. ``image_folder: 40 images 3x32x32, 2 classes``."""
    if isinstance(dataset, ToyDataset):
        return f"{dataset.name} (2-D, generated)"
    shape = "x".join(map(str, dataset.shape))
    if isinstance(dataset, ShapesWorld):
        held = ", ".join(f"{c} {s}" for c, s in sorted(dataset.held_out)) or "none"
        mix = "" if dataset.mix is None else f", prompt mix {dict(zip(CATEGORIES, dataset.mix))}"
        return f"shapes: generated captioned images {shape}, held-out pairs {held}{mix}"
    if hasattr(dataset, "captions"):
        return f"{dataset.name}: {len(dataset)} captioned images {shape}"
    return f"{dataset.name}: {len(dataset)} items {shape}, {dataset.num_classes} classes"


@dataclass
class SampleSpace:
    """Shape, classes and the map from model space back to data, without the data itself."""

    kind: str  # "toy", "images" or "latents"
    name: str  # the dataset's name (moons, digits, image_folder, latents, ...)
    shape: tuple[int, ...]
    num_classes: int  # classes of the data (the model is conditioned on them only if data.conditional)
    class_names: list[str] | None = None
    mean: list[float] | None = None  # toy: standardisation
    std: list[float] | None = None
    autoencoder: dict[str, Any] | None = None  # latents: kind, path, scaling_factor, shift_factor
    fingerprint: str = ""
    summary: str = ""
    text: dict[str, Any] | None = None  # text-conditioned runs: the TextSpec of their prompts' encoder
    _codec: LatentCodec | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, dataset: ToyDataset | ImageDataset | ShapesWorld, text: TextSpec | None = None) -> SampleSpace:
        fingerprint, summary = data_fingerprint(dataset), data_summary(dataset)
        pixels_with_captions = hasattr(dataset, "captions") and not isinstance(dataset, LatentDataset)
        if isinstance(dataset, ShapesWorld) or pixels_with_captions:
            record = None if text is None else text.to_dict()
            shape = tuple(dataset.shape)
            autoencoder = getattr(dataset, "autoencoder", None)  # captioned latents: the VAE that made them
            kind = "images" if autoencoder is None else "latents"
            return cls(
                kind, dataset.name, shape, 0, autoencoder=autoencoder, fingerprint=fingerprint, summary=summary,
                text=record,
            )  # fmt: skip
        names = getattr(dataset, "class_names", None)
        if isinstance(dataset, ToyDataset):
            mean, std = dataset.standardisation
            return cls(
                "toy",
                dataset.name,
                tuple(dataset.shape),
                dataset.num_classes,
                names,
                mean.tolist(),
                std.tolist(),
                fingerprint=fingerprint,
                summary=summary,
            )
        if isinstance(dataset, LatentDataset):
            autoencoder = None
            if not isinstance(dataset, RandomLatentDataset):
                meta = dataset.metadata
                autoencoder = {
                    "kind": meta["autoencoder_kind"],
                    "path": str(dataset.autoencoder_path),
                    "scaling_factor": float(meta["scaling_factor"]),
                    "shift_factor": float(meta["shift_factor"]),
                }
            return cls(
                "latents",
                dataset.name,
                tuple(dataset.shape),
                dataset.num_classes,
                names,
                autoencoder=autoencoder,
                fingerprint=fingerprint,
                summary=summary,
                text=None if text is None else text.to_dict(),  # captioned latents
            )
        return cls(
            "images",
            dataset.name,
            tuple(dataset.shape),
            dataset.num_classes,
            names,
            fingerprint=fingerprint,
            summary=summary,
        )

    def to_json(self) -> str:
        record = asdict(self)
        record.pop("_codec")
        record["shape"] = list(self.shape)
        return json.dumps(record)

    @classmethod
    def from_json(cls, text: str) -> SampleSpace:
        try:
            record = json.loads(text)
            record["shape"] = tuple(record["shape"])
            space = cls(**record)
        except (ValueError, TypeError, KeyError) as error:
            raise DataError(f"the data record in the weights is unreadable: {error}") from None
        if space.kind == "toy" and space.name not in TOY_DATASETS:
            raise DataError(f"the weights name an unknown 2-D dataset {space.name!r}")
        return space

    @property
    def text_spec(self) -> TextSpec | None:
        """How this run's prompts are encoded (None: the model reads no prompts)."""
        return None if self.text is None else TextSpec.from_dict(self.text)

    @property
    def is_images(self) -> bool:
        return self.kind in ("images", "latents")

    def unstandardise(self, x: Tensor) -> Tensor:
        """Model space back to data: 2-D points in the dataset's coordinates, images in [0, 1]."""
        if self.kind == "toy":
            return x * torch.tensor(self.std).to(x) + torch.tensor(self.mean).to(x)
        if self.kind == "images":
            return ((x + 1) / 2).clamp(0, 1)
        return self.codec().decode(x.to(next(self.codec().autoencoder.parameters()).device)).cpu()

    def codec(self, autoencoder_path: str | None = None) -> LatentCodec:
        if self.autoencoder is None:
            raise DataError("random_latents have no decoder: they are data for timing runs, not for samples")
        if self._codec is None:
            kind = self.autoencoder["kind"]
            path = autoencoder_path or self.autoencoder["path"]
            codec = LatentCodec(load_autoencoder(kind, Path(path)), kind)
            # the factors the latents were made with, whatever the folder's config says now
            codec.scale, codec.shift = self.autoencoder["scaling_factor"], self.autoencoder["shift_factor"]
            self._codec = codec
        return self._codec

    def reference_points(self, num: int) -> Tensor:
        """2-D toys: ``num`` points of the true distribution, in its own coordinates (for pictures)."""
        points, _ = TOY_DATASETS[self.name]().sample(num)
        return points

    def class_label(self, text: str) -> int:
        """A class given by index or by name (``--class 3``, ``--class cat``)."""
        names = self.class_names or []
        if text in names:
            return names.index(text)
        try:
            return int(text)
        except ValueError:
            shown = f" (classes: {', '.join(names[:20])}{', ...' if len(names) > 20 else ''})" if names else ""
            raise DataError(f"--class {text!r} is neither a class index nor a class name{shown}") from None

    def class_name(self, label: int) -> str:
        if self.class_names and 0 <= label < len(self.class_names):
            return self.class_names[label]
        return str(label)

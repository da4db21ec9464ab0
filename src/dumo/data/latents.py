"""Latent datasets: images encoded once by a pretrained autoencoder, trained on in latent space.

``dumo encode`` writes a safetensors file with ``latents`` (N, C, h, w), already multiplied by
the autoencoder's scaling factor (after subtracting its shift factor, where it has one), and
``labels`` (N,); horizontally flipped copies are included by default, as is standard. The
metadata records the autoencoder (kind and local folder) so samples can be decoded back to
images: ``x = decode(z / scale + shift)``. Weights are only ever read from a local folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from dumo.data.images import DataError, ImageDataset
from dumo.errors import CheckpointError

LATENTS_FORMAT = "dumo-latents"
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


def encode_dataset(
    dataset: ImageDataset, codec: LatentCodec, out: Path, autoencoder_path: str, flip: bool = True, batch_size: int = 64
) -> int:
    """Encode every image (and its mirror image) and write the latents file; returns its length."""
    latents, labels = [], []
    for start in range(0, len(dataset), batch_size):
        images = dataset.images[start : start + batch_size]
        batch_labels = dataset.labels[start : start + batch_size]
        views = [images, images.flip(-1)] if flip else [images]
        for view in views:
            latents.append(codec.encode(view).float().cpu())
            labels.append(batch_labels)
    tensors = {"latents": torch.cat(latents), "labels": torch.cat(labels)}
    metadata = {
        "autoencoder_kind": codec.kind,
        "autoencoder_path": str(Path(autoencoder_path).resolve()),
        "scaling_factor": repr(codec.scale),
        "shift_factor": repr(codec.shift),
        "image_shape": json.dumps(list(dataset.shape)),
        "source": dataset.name,
        "num_classes": str(dataset.num_classes),
        "flipped_copies": str(flip).lower(),
    }
    from dumo.training.checkpoint import save_checkpoint  # the same atomic safetensors writer

    save_checkpoint(out, tensors, metadata, kind=LATENTS_FORMAT)
    return len(tensors["latents"])


class LatentDataset(ImageDataset):
    """Scaled latents as training data; ``unstandardise`` decodes them to images in [0, 1]."""

    def __init__(self, path: str | Path, autoencoder_path: str | None = None):
        from dumo.training.checkpoint import load_checkpoint

        path = Path(path).expanduser()
        try:
            tensors, metadata = load_checkpoint(path, kind=LATENTS_FORMAT)
        except CheckpointError as error:
            raise DataError(str(error)) from None
        # NaN or inf in the data would make every step that draws it non-finite and be skipped
        # silently, step after step: refuse the file instead.
        bad = int((~torch.isfinite(tensors["latents"])).sum())
        if bad:
            raise DataError(
                f"{path} holds {bad} non-finite latent values (NaN or inf); re-encode it with 'dumo encode'"
            )
        self.path = path
        self.metadata = metadata
        self.autoencoder_path = autoencoder_path or metadata["autoencoder_path"]
        self._codec: LatentCodec | None = None
        super().__init__("latents", tensors["latents"], tensors["labels"], int(metadata["num_classes"]))
        self.images = tensors["latents"].float()  # latents are not images: no clamp to [0, 1]

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
        self.path = None
        self.metadata = {}
        self.autoencoder_path = None
        self._codec = None

    def unstandardise(self, x: Tensor) -> Tensor:
        raise DataError("random_latents have no decoder: they are data for timing runs, not for samples")

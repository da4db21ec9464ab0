"""Captioned images encoded once, in memory, by a diffusers pipeline's own VAE.

A diffusers transformer learns on the latents of its pipeline's VAE, scaled as the pipeline scales
them (``(z - shift) * scale``; :class:`~dumo.data.latents.LatentCodec`). A small caption set is
encoded here when a run starts; the latents keep the captions, and the run records the VAE so that
samples decode without the data.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dumo.data.captions import CaptionDataset, CaptionedImages
from dumo.data.latents import LatentCodec, load_autoencoder


class CaptionLatents(CaptionDataset):
    """Latents (N, C, h, w) of captioned images; ``autoencoder`` is the record of the VAE that made them."""

    def __init__(self, latents: Tensor, captions: list[str], autoencoder: dict):
        super().__init__(CaptionedImages(latents, list(captions), []))
        self.images = latents  # latents are not images: no clamp, no standardisation
        self.autoencoder = dict(autoencoder)

    def standardise(self, latents: Tensor) -> Tensor:
        return latents


def encode_caption_latents(
    dataset: CaptionDataset, autoencoder: dict, device: torch.device | str = "cpu", batch_size: int = 16
) -> CaptionLatents:
    """The images of ``dataset`` encoded by the autoencoder ``autoencoder`` records (kind, path,
    scaling_factor, shift_factor), with their captions."""
    codec = LatentCodec(load_autoencoder(autoencoder["kind"], autoencoder["path"], device), autoencoder["kind"])
    codec.scale, codec.shift = autoencoder["scaling_factor"], autoencoder["shift_factor"]
    pieces = [
        codec.encode(dataset.images[start : start + batch_size].to(device)).float().cpu()
        for start in range(0, len(dataset), batch_size)
    ]
    return CaptionLatents(torch.cat(pieces), dataset.captions, autoencoder)


__all__ = ["CaptionLatents", "encode_caption_latents"]

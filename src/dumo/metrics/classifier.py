"""A domain feature space for small image datasets (digits, MNIST, Fashion-MNIST, ...).

A small CNN is trained once per dataset (seeded) and cached; its penultimate features give a
Fréchet distance between generated and real images, and its predictions give the class
fidelity of class-conditional samples (accuracy of the classifier on the requested labels).
Inception-based FID is the standard for natural images; this is its cheap stand-in where
Inception features mean little (8x8 or 28x28 grey digits).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dumo.metrics.checks import check_samples

FEATURE_DIM = 128


class SmallClassifier(nn.Module):
    """Three conv stages and a 128-d penultimate layer; works for 8x8 up to 32x32 inputs."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.GroupNorm(8, 32),
            nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2),
            nn.GroupNorm(8, 64),
            nn.SiLU(),
            nn.Conv2d(64, 128, 3, padding=1, stride=2),
            nn.GroupNorm(8, 128),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(128, FEATURE_DIM),
            nn.SiLU(),
        )
        self.classify = nn.Linear(FEATURE_DIM, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        """Logits for images in [0, 1]."""
        return self.classify(self.features(images * 2 - 1))

    @torch.no_grad()
    def embed(self, images: Tensor, batch_size: int = 500) -> tuple[Tensor, Tensor]:
        """(penultimate features, logits) for images in [0, 1], in batches."""
        self.eval()
        features, logits = [], []
        for chunk in images.split(batch_size):
            h = self.features(chunk * 2 - 1)
            features.append(h)
            logits.append(self.classify(h))
        return torch.cat(features), torch.cat(logits)


def cache_dir() -> Path:
    return Path(os.environ.get("DUMO_CACHE", Path.home() / ".cache" / "dumo")) / "classifiers"


def dataset_key(images: Tensor, labels: Tensor, seed: int) -> str:
    digest = hashlib.sha256()
    digest.update(str((tuple(images.shape), seed)).encode())
    digest.update(images[:: max(1, len(images) // 256)].numpy().tobytes())
    digest.update(labels.numpy().tobytes())
    return digest.hexdigest()[:16]


def train_classifier(
    images: Tensor, labels: Tensor, num_classes: int, seed: int = 0, epochs: int = 10, batch_size: int = 128
) -> SmallClassifier:
    """Train (or load from the cache) the classifier for this exact data and seed."""
    path = cache_dir() / f"{dataset_key(images, labels, seed)}-{epochs}.safetensors"
    model = SmallClassifier(images.shape[1], num_classes)
    if path.is_file():
        try:
            model.load_state_dict(load_file(str(path)))
            return model.eval()
        except Exception:  # a truncated or foreign cache file: train again and replace it
            pass
    generator = torch.Generator().manual_seed(seed)
    torch_state = torch.get_rng_state()
    torch.manual_seed(seed)
    model = SmallClassifier(images.shape[1], num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(images), generator=generator).split(batch_size):
            loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.set_rng_state(torch_state)  # training the metric must not change the caller's randomness
    from dumo.files import atomic_output

    with atomic_output(path) as tmp:  # a kill mid-write must not leave a cache that breaks every later eval
        save_file(model.state_dict(), str(tmp))
    return model.eval()


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D): the domain FD of samples'
    features ``a`` against reference features ``b``."""
    from scipy import linalg

    # a covariance needs two rows; a NaN row (from a non-finite sample) would end inside sqrtm
    check_samples(a, "domain FD", minimum=2)
    check_samples(b, "domain FD", minimum=2, what="reference images")

    a, b = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # nearly singular product: regularise as the standard FID code does
        offset = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    root = root.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))

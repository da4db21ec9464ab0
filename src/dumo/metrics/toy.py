"""Distances between two point clouds: MMD (multi-bandwidth RBF) and sliced Wasserstein.

dumo reports both on standardised coordinates, so one set of bandwidths suits every toy set.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dumo.metrics.checks import check_samples

DEFAULT_BANDWIDTHS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def mmd(samples: Tensor, reference: Tensor, bandwidths: tuple[float, ...] = DEFAULT_BANDWIDTHS) -> float:
    """Maximum mean discrepancy with the kernel sum_s exp(-|a - b|^2 / (2 s^2)).

    Uses the unbiased estimate of MMD^2 (no self-pairs), clamped at 0 before the square
    root, so two samples of one distribution give a value near 0 whatever their size.
    """
    # the unbiased estimate averages over distinct pairs: each set needs two points
    check_samples(samples, "MMD", minimum=2)
    check_samples(reference, "MMD", minimum=2, what="reference points")
    x, y = samples.double(), reference.double()

    def kernel_mean(a: Tensor, b: Tensor, same: bool) -> Tensor:
        squared = torch.cdist(a, b).square()
        k = sum(torch.exp(-squared / (2 * s * s)) for s in bandwidths)
        if same:
            n = a.shape[0]
            return (k.sum() - k.diagonal().sum()) / (n * (n - 1))
        return k.mean()

    value = kernel_mean(x, x, True) + kernel_mean(y, y, True) - 2 * kernel_mean(x, y, False)
    return float(value.clamp(min=0).sqrt())


def sliced_wasserstein(samples: Tensor, reference: Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance over random directions (fixed seed, so repeatable).

    Sets of different sizes are compared through their quantile functions.
    """
    check_samples(samples, "SW")
    check_samples(reference, "SW", what="reference points")
    x, y = samples.double(), reference.double()
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(x.shape[1], projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ directions, dim=0)
    py, _ = torch.sort(y @ directions, dim=0)
    if px.shape[0] != py.shape[0]:
        levels = torch.linspace(0, 1, max(px.shape[0], py.shape[0]), dtype=torch.float64)
        px, py = torch.quantile(px, levels, dim=0), torch.quantile(py, levels, dim=0)
    return float((px - py).square().mean().sqrt())

"""2-D toy distributions, generated on the fly from a torch.Generator (so a run resumes exactly).

Points are produced in each dataset's own coordinates (moons: those of scikit-learn's
``make_moons(noise=0.05)``); training sees them after a fixed standardisation, computed once
per dataset from a large sample with a fixed seed, so it never depends on the run's seed.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from functools import cached_property

import torch
from torch import Tensor

from dumo.data.batch import Batch

STANDARDISATION_SAMPLES = 200_000
STANDARDISATION_SEED = 0


class ToyDataset(ABC):
    """A 2-D distribution with optional class labels (the moon, the mixture component)."""

    name: str = ""
    shape: tuple[int, ...] = (2,)
    num_classes: int = 0

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """``n`` points (n, 2) in the dataset's coordinates and their labels (n,) or None."""

    @cached_property
    def standardisation(self) -> tuple[Tensor, Tensor]:
        """Per-coordinate (mean, std), fixed for the dataset."""
        points, _ = self.sample(STANDARDISATION_SAMPLES, torch.Generator().manual_seed(STANDARDISATION_SEED))
        return points.mean(dim=0), points.std(dim=0)

    def standardise(self, points: Tensor) -> Tensor:
        mean, std = self.standardisation
        return (points - mean.to(points)) / std.to(points)

    def unstandardise(self, points: Tensor) -> Tensor:
        mean, std = self.standardisation
        return points * std.to(points) + mean.to(points)


class Moons(ToyDataset):
    """Two interleaved half circles, as scikit-learn's ``make_moons`` draws them (label: which moon)."""

    name = "moons"
    num_classes = 2

    def __init__(self, noise: float = 0.05):
        self.noise = noise

    def sample(self, n, generator=None):
        labels = torch.randint(0, 2, (n,), generator=generator)
        angle = math.pi * torch.rand(n, generator=generator)
        outer = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        inner = torch.stack([1 - torch.cos(angle), 0.5 - torch.sin(angle)], dim=1)
        points = torch.where(labels[:, None] == 0, outer, inner)
        return points + self.noise * torch.randn(n, 2, generator=generator), labels


class EightGaussians(ToyDataset):
    """Eight Gaussians on a circle of radius 4 (label: the component)."""

    name = "8gaussians"
    num_classes = 8

    def __init__(self, radius: float = 4.0, std: float = 0.5):
        self.radius = radius
        self.std = std

    def sample(self, n, generator=None):
        labels = torch.randint(0, 8, (n,), generator=generator)
        angle = labels.float() * (2 * math.pi / 8)
        centres = self.radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        return centres + self.std * torch.randn(n, 2, generator=generator), labels


class Checkerboard(ToyDataset):
    """Uniform density on the dark squares of a 4x4 checkerboard over [-4, 4]^2 (no labels)."""

    name = "checkerboard"
    num_classes = 0

    def sample(self, n, generator=None):
        column = torch.randint(0, 4, (n,), generator=generator)
        row = 2 * torch.randint(0, 2, (n,), generator=generator) + (column % 2)
        cell = torch.stack([column, row], dim=1).float()
        return 2 * (cell + torch.rand(n, 2, generator=generator)) - 4, None


TOY_DATASETS: dict[str, type[ToyDataset]] = {"moons": Moons, "8gaussians": EightGaussians, "checkerboard": Checkerboard}


class ToyStream:
    """An endless stream of standardised batches; its position is the generator's state."""

    def __init__(self, dataset: ToyDataset, batch_size: int, conditional: bool, seed: int):
        self.dataset = dataset
        self.batch_size = batch_size
        self.conditional = conditional
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self, device: torch.device | str = "cpu") -> Batch:
        points, labels = self.dataset.sample(self.batch_size, self.generator)
        x = self.dataset.standardise(points).to(device)
        return Batch(x=x, cond=labels.to(device) if self.conditional else None)

    def state(self) -> Tensor:
        return self.generator.get_state()

    def load_state(self, state: Tensor) -> None:
        self.generator.set_state(state)

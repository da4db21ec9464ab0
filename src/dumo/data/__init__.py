"""Datasets and the configs that select them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dumo.data.batch import Batch
from dumo.data.toy import TOY_DATASETS, ToyDataset, ToyStream
from dumo.schema import require


@dataclass
class DataConfig:
    name: Literal["moons", "8gaussians", "checkerboard"] = "moons"
    batch_size: int = 256
    conditional: bool = False  # train with class labels (needed for guidance, zeta > 0)

    def validate(self, prefix: str) -> None:
        require(self.batch_size > 0, f"{prefix}.batch_size must be > 0; got {self.batch_size}")
        if self.conditional:
            require(
                build_dataset(self).num_classes > 0,
                f"{prefix}.conditional: dataset '{self.name}' has no class labels",
            )


def build_dataset(config: DataConfig) -> ToyDataset:
    return TOY_DATASETS[config.name]()


def num_classes(config: DataConfig) -> int:
    """Classes the model is conditioned on (0 = unconditional)."""
    return build_dataset(config).num_classes if config.conditional else 0


__all__ = ["Batch", "DataConfig", "ToyDataset", "ToyStream", "build_dataset", "num_classes"]

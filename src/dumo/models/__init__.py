"""Networks: backbones plus one or two output heads (v, u)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from dumo.models.heads import FlowModel, OutputHead
from dumo.models.mlp import MLPBackbone
from dumo.models.output import ModelOutput
from dumo.schema import require


@dataclass
class ModelConfig:
    name: Literal["mlp"] = "mlp"
    hidden_dim: int = 256
    depth: int = 4

    def validate(self, prefix: str) -> None:
        require(self.hidden_dim > 0, f"{prefix}.hidden_dim must be > 0; got {self.hidden_dim}")
        require(self.depth >= 0, f"{prefix}.depth must be >= 0; got {self.depth}")


def build_model(
    config: ModelConfig, data_dim: int, heads: tuple[str, ...], num_classes: int = 0, time_inputs: int = 1
) -> FlowModel:
    """The network for ``config`` with the heads (and time inputs) an objective needs."""
    backbone = MLPBackbone(
        data_dim, hidden_dim=config.hidden_dim, depth=config.depth, num_classes=num_classes, time_inputs=time_inputs
    )
    return FlowModel(backbone, OutputHead, heads, hidden_dim=config.hidden_dim, out_dim=data_dim)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["FlowModel", "ModelConfig", "ModelOutput", "build_model", "count_parameters"]

"""Conditioning embeddings shared by the networks."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from dumo.conditioning import ClassLabels, Condition


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of t (computed in fp32, also under autocast) followed by an MLP.

    Frequencies run geometrically from ``scale / max_period`` to ``scale``. The highest one
    bounds how fast the features change with t: a central difference of half-width e is exact
    to a relative (scale * e)^2 / 6 on them, 4% for scale 100 and e = 0.005 (at the usual
    scale 1000 it would be wrong by 5x). fp32 keeps small time differences from rounding away.
    ``model.time_embedding_scale`` changes the scale, e.g. to match imported DiT (1000) or SiT (1) weights.
    """

    def __init__(self, dim: int, frequency_dim: int = 256, scale: float = 100.0, max_period: float = 10000.0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.scale = scale
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def frequencies(self, device: torch.device | None = None) -> Tensor:
        """The fp32 frequencies f_k (before ``scale``): features are [cos(scale f t), sin(scale f t)]."""
        half = self.frequency_dim // 2
        exponent = -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=device) / half
        return torch.exp(exponent)

    def sinusoidal(self, t: Tensor) -> Tensor:
        angles = self.scale * t.float()[:, None] * self.frequencies(t.device)[None]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)

    def forward(self, t: Tensor) -> Tensor:
        with torch.autocast(device_type=t.device.type, enabled=False):
            features = self.sinusoidal(t)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedding(nn.Module, ClassLabels):
    """The class conditioner: an embedding table with one extra row for the null class (index
    ``num_classes``)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor | None, batch_size: int, device: torch.device) -> Tensor:
        if labels is None:  # unconditional call on a class-conditional model
            labels = torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)
        return self.table(labels)


#: ``factory(dim) -> conditioner``: a module that is a :class:`~dumo.conditioning.Conditioner` and maps
#: ``(cond, batch_size, device)`` to a (B, dim) vector added to the time embedding (cond None: all null)
ConditionerFactory = Callable[[int], nn.Module]


class Conditioning(nn.Module):
    """The vector every block is modulated by: embeddings of t, of MeanFlow's interval t - r
    (when the network takes a second time) and of the condition (when conditional), summed.

    The condition's embedding is the class table when ``num_classes`` > 0, or the module that
    ``conditioner`` builds for another kind of condition.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int = 0,
        time_inputs: int = 1,
        frequency_dim: int = 256,
        time_scale: float = 100.0,
        conditioner: ConditionerFactory | None = None,
    ):
        super().__init__()
        if conditioner is not None and num_classes > 0:
            raise ValueError("a network has one conditioner: give num_classes or conditioner, not both")
        self.time = TimestepEmbedding(dim, frequency_dim, scale=time_scale)
        # the interval t - r is a time too: the same features, so one key sets both
        self.interval = TimestepEmbedding(dim, frequency_dim, scale=time_scale) if time_inputs == 2 else None
        # Named "label" whatever its kind: the checkpoint key of the class table.
        self.label = LabelEmbedding(num_classes, dim) if num_classes > 0 else None
        if conditioner is not None:
            self.label = conditioner(dim)

    def forward(self, t: Tensor, r: Tensor | None, cond: Condition, batch_size: int) -> Tensor:
        vector = self.time(t)
        if self.interval is not None:
            vector = vector + self.interval(t - (t if r is None else r))
        if self.label is not None:
            vector = vector + self.label(cond, batch_size, t.device)
        return vector


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: normalised features shifted and scaled by the conditioning."""
    return x * (1 + scale) + shift

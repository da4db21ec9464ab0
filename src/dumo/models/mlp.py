"""A residual MLP for low-dimensional (2-D toy) data, with adaLN-zero conditioning.

The backbone maps (x, t[, r][, cond]) to features and a conditioning vector; the heads
(:class:`~dumo.models.heads.OutputHead`) turn them into v and/or u.
"""

from __future__ import annotations

from torch import Tensor, nn

from dumo.conditioning import Condition
from dumo.models.embeddings import ConditionerFactory, Conditioning, modulate


class ResidualBlock(nn.Module):
    """h + gate * MLP(adaLN(h)); the gate starts at zero so each block starts as the identity."""

    def __init__(self, hidden_dim: int, expansion: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_dim, expansion * hidden_dim), nn.SiLU(), nn.Linear(expansion * hidden_dim, hidden_dim)
        )
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, 3 * hidden_dim))
        nn.init.zeros_(self.modulation[-1].weight)
        nn.init.zeros_(self.modulation[-1].bias)

    def forward(self, h: Tensor, cond: Tensor) -> Tensor:
        shift, scale, gate = self.modulation(cond).chunk(3, dim=-1)
        return h + gate * self.mlp(modulate(self.norm(h), shift, scale))


class MLPBackbone(nn.Module):
    def __init__(
        self,
        data_dim: int,
        hidden_dim: int = 256,
        depth: int = 4,
        num_classes: int = 0,
        time_inputs: int = 1,
        time_scale: float = 100.0,
        conditioner: ConditionerFactory | None = None,
    ):
        super().__init__()
        self.data_dim = data_dim
        self.hidden_dim = hidden_dim
        self.input = nn.Linear(data_dim, hidden_dim)
        self.conditioning = Conditioning(
            hidden_dim, num_classes, time_inputs, frequency_dim=64, time_scale=time_scale, conditioner=conditioner
        )
        self.blocks = nn.ModuleList(ResidualBlock(hidden_dim) for _ in range(depth))

    def forward(self, x: Tensor, t: Tensor, r: Tensor | None = None, cond: Condition = None) -> tuple[Tensor, Tensor]:
        vector = self.conditioning(t, r, cond, x.shape[0])
        h = self.input(x)
        for block in self.blocks:
            h = block(h, vector)
        return h, vector

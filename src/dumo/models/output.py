"""What every dumo network returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ModelOutput:
    """Head outputs: velocity ``v`` and/or flow map ``u`` (None where the model has no such head)."""

    v: Tensor | None = None
    u: Tensor | None = None

    def split(self, sizes: list[int]) -> list[ModelOutput]:
        """Undo a batched call: split every head's output along the batch dimension."""
        v_parts = torch.split(self.v, sizes) if self.v is not None else [None] * len(sizes)
        u_parts = torch.split(self.u, sizes) if self.u is not None else [None] * len(sizes)
        return [ModelOutput(v=v, u=u) for v, u in zip(v_parts, u_parts)]

"""The unit of data that objectives consume."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dumo.conditioning import Condition, map_condition, slice_condition


@dataclass
class Batch:
    """Training data: ``x`` (B, ...) in the model's (standardised) space and what each row is
    conditioned on (:data:`~dumo.conditioning.Condition`: class labels (B,), prompts, or None)."""

    x: Tensor
    cond: Condition = None

    def slice(self, start: int, stop: int) -> Batch:
        """Rows ``start:stop`` (a shard of a global batch)."""
        return Batch(self.x[start:stop], slice_condition(self.cond, start, stop))

    def to(self, device: torch.device | str) -> Batch:
        """The batch on ``device``; to a GPU through pinned memory, without waiting for the copy."""
        device = torch.device(device)
        if device.type != "cuda":
            return Batch(self.x.to(device), map_condition(self.cond, lambda tensor: tensor.to(device)))

        def copy(tensor: Tensor) -> Tensor:
            return tensor.pin_memory().to(device, non_blocking=True)

        return Batch(copy(self.x), map_condition(self.cond, copy))

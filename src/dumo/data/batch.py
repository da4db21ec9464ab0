"""The unit of data that objectives consume."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Batch:
    """Training data: ``x`` (B, ...) in the model's (standardised) space, optional class labels (B,)."""

    x: Tensor
    labels: Tensor | None = None

    def slice(self, start: int, stop: int) -> Batch:
        """Rows ``start:stop`` (a shard of a global batch)."""
        return Batch(self.x[start:stop], None if self.labels is None else self.labels[start:stop])

    def to(self, device: torch.device | str) -> Batch:
        """The batch on ``device``; to a GPU through pinned memory, without waiting for the copy."""
        device = torch.device(device)
        if device.type != "cuda":
            return Batch(self.x.to(device), None if self.labels is None else self.labels.to(device))

        def copy(tensor: Tensor) -> Tensor:
            return tensor.pin_memory().to(device, non_blocking=True)

        return Batch(copy(self.x), None if self.labels is None else copy(self.labels))

"""The unit of data that objectives consume."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Batch:
    """Training data: ``x`` (B, ...) in the model's (standardised) space, optional class labels (B,)."""

    x: Tensor
    labels: Tensor | None = None

    def slice(self, start: int, stop: int) -> Batch:
        """Rows ``start:stop`` (a shard of a global batch)."""
        return Batch(self.x[start:stop], None if self.labels is None else self.labels[start:stop])

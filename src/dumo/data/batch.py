"""The unit of data that objectives consume."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Batch:
    """Training data: ``x`` (B, ...) in the model's (standardised) space, optional class labels (B,)."""

    x: Tensor
    labels: Tensor | None = None

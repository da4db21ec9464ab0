"""What every dumo network returns: one tensor per named head."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import Tensor


@dataclasses.dataclass(init=False)
class ModelOutput:
    """Head outputs by head name: ``out.v`` (velocity), ``out.u`` (flow map), or any head an
    objective declares. A head the model does not have reads as None (``out.u`` of a v-only model).

    A dataclass with one dict field, so that DDP and FSDP find (and hook) the tensors inside it.
    """

    outputs: dict[str, Tensor]

    def __init__(self, outputs: Mapping[str, Tensor | None] | None = None, **heads: Tensor | None):
        merged = {**(outputs or {}), **heads}
        self.outputs = {name: value for name, value in merged.items() if value is not None}

    def __getattr__(self, name: str) -> Tensor | None:
        # Only called for names that are not ordinary attributes: those are the heads.
        if name.startswith("_") or name == "outputs":
            raise AttributeError(name)
        return self.outputs.get(name)

    @property
    def head_names(self) -> tuple[str, ...]:
        return tuple(self.outputs)

    def split(self, sizes: list[int]) -> list[ModelOutput]:
        """Undo a batched call: split every head's output along the batch dimension."""
        parts = {name: torch.split(value, sizes) for name, value in self.outputs.items()}
        return [ModelOutput({name: chunks[i] for name, chunks in parts.items()}) for i in range(len(sizes))]

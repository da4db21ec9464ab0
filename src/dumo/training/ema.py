"""Exponential moving average of the weights, used for sampling (and optionally as theta^-)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor


class EMA:
    """``ema = d * ema + (1 - d) * weights`` after every optimiser step.

    With ``warmup`` the decay is ``min(decay, (1 + step) / (10 + step))``, so the average
    forgets the random initialisation quickly in short runs and reaches ``decay`` later.

    Frozen weights (a LoRA run's base) are shared with the model, not copied: their average is themselves.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        frozen = {id(parameter): parameter for parameter in model.parameters() if not parameter.requires_grad}
        self.model = copy.deepcopy(model, memo=dict(frozen)).eval().requires_grad_(False)
        self.averaged = [parameter.requires_grad for parameter in model.parameters()]

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        weight = 1.0 - self.decay_at(step)
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                # A no-grad forward of the EMA as theta^- (objective.target_network=ema) leaves the
                # FSDP root's parameters unsharded (no backward reshards them): shard them again.
                module.reshard()
        pairs = [
            (a, c.detach()) for a, c, kept in zip(self.model.parameters(), model.parameters(), self.averaged) if kept
        ]
        averages, currents = [a for a, _ in pairs], [c for _, c in pairs]
        if not averages:
            pass
        elif any(isinstance(p, DTensor) for p in averages):
            for average, current in zip(averages, currents):  # sharded: local shards, one op each
                average.lerp_(current, weight)
        else:  # one fused kernel launch per group of tensors instead of one per parameter
            torch._foreach_lerp_(averages, currents, weight)
        for average, current in zip(self.model.buffers(), model.buffers()):
            average.copy_(current)

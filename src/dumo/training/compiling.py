"""How the training step's networks are compiled (``train.compile``) and checkpointed
(``train.activation_checkpointing``).

``train.compile: true`` compiles the whole network once for the step: the gradient pass and the
no-grad target passes (a second graph: another grad mode and batch) both run compiled, with no
graph break in the finite-difference path. The objective around the network stays eager: its
random draws match an eager run's, and its elementwise glue is a small share of the step. The
exact JVP (``objective.derivative=jvp``) runs eagerly inside ``torch.func.jvp`` either way.

``train.compile: blocks`` compiles each transformer block in place instead (regional
compilation): every block runs the same code, so one block's graph serves the whole depth and a
deep DiT builds in a fraction of the whole network's time, for most of the speed.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from dumo.errors import ConfigError
from dumo.models import transformer_blocks

#: torch.compile's backend; the tests swap in "aot_eager" (same graphs, no code generation)
BACKEND = "inductor"

CompileMode = bool | Literal["blocks"]


def check_compile_fits(model: nn.Module, mode: CompileMode, checkpointing: bool) -> None:
    """Refuse, in one line, settings the network cannot take: regional compilation or activation
    checkpointing of a network without transformer blocks (mlp, unet)."""
    if transformer_blocks(model) or (hasattr(model, "set_activation_checkpointing") and mode != "blocks"):
        return  # (a network that checkpoints its own blocks, e.g. a diffusers transformer)
    if mode == "blocks":
        raise ConfigError(
            "train.compile=blocks compiles the transformer blocks, and this network has none: use train.compile=true"
        )
    if checkpointing:
        raise ConfigError("train.activation_checkpointing recomputes transformer blocks, and this network has none")


def compile_network(module: nn.Module, mode: CompileMode) -> nn.Module:
    """The module to call for ``mode``: ``module`` itself (eager, or with its blocks compiled in
    place), or a compiled wrapper sharing its parameters (its state dict keeps the plain names
    only on ``module``: checkpoints save the plain module, never the wrapper)."""
    if mode is False:
        return module
    if mode == "blocks":
        for block in transformer_blocks(module):
            block.compile(backend=BACKEND, fullgraph=True)
        return module
    return torch.compile(module, backend=BACKEND)

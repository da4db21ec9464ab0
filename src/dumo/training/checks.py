"""What a config asks that this machine or this launch cannot give, found before a run builds anything."""

from __future__ import annotations

import math
import os

from dumo.config import Config
from dumo.errors import ConfigError


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_batch_fits(config: Config, shape: tuple[int, ...], shards: int = 1) -> None:
    """Refuse a batch whose tensors alone exceed this machine's memory, before anything is allocated
    (a batch of 10**9 would otherwise be killed by the kernel, or end in an allocator traceback).

    The estimate is a lower bound: the data-sized tensors of one step (x, noise, x_t, targets,
    passes: 16 of them) plus one activation per block of the network (mlp, DiT; width x tokens).
    """
    total = physical_memory()
    if total is None:
        return
    rows = config.data.batch_size // max(shards, 1)  # what one accumulated shard of one process runs
    need = config.data.batch_size * 16 * math.prod(shape) * 4  # the stream draws the global batch at once
    network, activation = config.model.network(), 0
    if network.data == "vectors" and network.hidden_dim is not None and network.depth is not None:
        activation = 4 * network.hidden_dim * network.depth * 4
    elif network.patch is not None and network.hidden_dim is not None and network.depth is not None and len(shape) == 3:
        tokens = (shape[1] // network.patch) * (shape[2] // network.patch)
        activation = 4 * tokens * network.hidden_dim * network.depth * 4
    need += rows * activation
    if need > total:
        raise ConfigError(
            f"data.batch_size={config.data.batch_size} needs at least {need / 1e9:.1f} GB for one step, more than "
            f"this machine's {total / 1e9:.1f} GB of memory: lower data.batch_size (or use train.grad_accumulation)"
        )


def ineffective_settings(config: Config, conditional: bool | int, distributed: bool) -> list[str]:
    """Settings of ``config`` that cannot take effect in this run (``conditional``: whether the model is
    conditioned, on class labels or prompts), each with what happens instead."""
    found = []
    zeta = getattr(config.objective, "zeta", 0.0)
    if zeta > 0 and not conditional:
        found.append(
            f"objective.zeta={zeta:g} is training-time guidance, which needs class labels or prompts; this run is "
            "unconditional (data.conditional is false or the data has no classes), so it trains without guidance"
        )
    if config.train.parallel == "fsdp" and not distributed:
        found.append(
            "train.parallel=fsdp shards the model over torchrun's processes; in this single process the model "
            "trains whole and unsharded"
        )
    if config.train.fsdp_param_dtype == "bf16" and not (distributed and config.train.parallel == "fsdp"):
        found.append(
            "train.fsdp_param_dtype=bf16 applies to train.parallel=fsdp under torchrun only; the blocks keep "
            "their fp32 parameters here (train.precision decides the compute)"
        )
    return found

"""How the training step's module is spread over ranks: DDP (replicated) or FSDP2 (sharded).

Checkpoints are written in one format whichever is used: full (unsharded) tensors keyed like
the plain module's ``state_dict()``, and the optimiser state keyed by parameter index as
``optimizer.state_dict()`` has it. So a run can be resumed with either strategy, or in a single
process, and ``dumo sample`` reads it without a process group.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from dumo.distributed import Distributed, is_sharded

Strategy = Literal["ddp", "fsdp"]


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: each residual or transformer block of the backbone.

    Parameters outside them (embeddings, heads) form the root unit. One unit per block keeps
    only one block's full weights in memory at a time during the forward pass. A network that
    names its own blocks (a diffusers transformer's, :meth:`DualHeadTransformer.shard_units`) is asked.
    """
    own = getattr(model, "shard_units", None)
    if callable(own):
        return list(own())
    blocks = getattr(getattr(model, "backbone", model), "blocks", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else []


def shard(model: nn.Module, param_dtype: torch.dtype | None = None) -> None:
    """Apply FSDP2's ``fully_shard`` in place: every block, then the root.

    With ``param_dtype`` (bf16) the blocks gather and compute with parameters of that dtype and
    reduce gradients in fp32; they hand fp32 activations on, so the root (embeddings, heads) keeps
    computing in fp32 as it does under autocast.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, output_dtype=torch.float32)
    for unit in shard_units(model):
        fully_shard(unit, mp_policy=policy if param_dtype is not None else MixedPrecisionPolicy())
    fully_shard(model)


def wrap_for_training(
    model: nn.Module,
    dist: Distributed,
    strategy: Strategy,
    device: torch.device,
    param_dtype: torch.dtype | None = None,
) -> nn.Module:
    """The module the objective calls. A single process uses the model itself.

    FSDP shards ``model`` in place (its parameters become DTensors; ``param_dtype`` as in
    :func:`shard`); DDP wraps it.
    """
    if not dist.enabled:
        return model
    if strategy == "fsdp":
        shard(model, param_dtype)
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def set_gradient_sync(step_model: nn.Module, enabled: bool):
    """Turn the gradient all-reduce (DDP) or reduce-scatter (FSDP) of the next backward on or off."""
    if isinstance(step_model, DistributedDataParallel):
        return contextlib.nullcontext() if enabled else step_model.no_sync()
    if hasattr(step_model, "set_requires_gradient_sync"):  # an FSDP2 module
        step_model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def full_tensor(value: Tensor) -> Tensor:
    """A DTensor gathered into one plain tensor (collective); a plain tensor as it is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The unsharded ``state_dict`` on CPU. Collective for a sharded model: every rank must call it."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimised_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimiser's parameters in its own order, the order ``optimizer.state_dict()``
    numbers them in (with frozen weights, a LoRA run's base, not every parameter of the model)."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` as a single process would have it. Collective when sharded."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    by_name = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not by_name:  # ranks other than 0 receive nothing with cpu_offload
        return {"state": {}, "param_groups": []}
    index = {name: i for i, name in enumerate(optimised_names(model, optimizer))}
    return {
        "state": {index[name]: entries for name, entries in by_name["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]],
    }


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a single-process ``optimizer.state_dict()``; under FSDP each rank keeps its shard."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = optimised_names(model, optimizer)
    by_name = {
        "state": {names[i]: entries for i, entries in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))

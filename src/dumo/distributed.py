"""Data-parallel training under ``torchrun`` (DDP); a single process needs no process group.

Every rank draws the same global batch from an identically seeded stream and keeps its slice;
each slice ("shard") gets its own noise and times from a seed of (run seed, step, shard index).
So 2 ranks x 1 shard, 1 rank x 2 accumulated shards and 2 ranks x 2 shards at half the size all
compute the same global step, and tests can compare them directly.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dumo.errors import ConfigError


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, values: list[float], device: torch.device) -> list[float]:
        """The average over ranks of each value (identity in a single process)."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return (tensor / self.world_size).tolist()

    def gather_all(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (same shape on all), stacked in rank order on every rank."""
        if not self.enabled:
            return tensor.unsqueeze(0)
        gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.stack(gathered)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks of ``tensor`` (same shape on all), on its device (a copy
        of it in a single process). NCCL reduces only GPU tensors: a CPU tensor goes through this
        rank's GPU there."""
        if not self.enabled:
            return tensor.clone()
        work = tensor.detach().clone()
        if dist.get_backend() == "nccl" and work.device.type != "cuda":
            work = work.to(torch.device("cuda", self.local_rank))
        dist.all_reduce(work)
        return work.to(tensor.device)

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on at least one."""
        if not self.enabled:
            return flag
        tensor = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def broadcast_int(self, value: int, device: torch.device, source: int = 0) -> int:
        """Rank ``source``'s ``value`` on every rank (the others pass anything; identity in a single process)."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=device)
        dist.broadcast(tensor, src=source)
        return int(tensor.item())

    def flags(self, flag: bool, device: torch.device) -> list[bool]:
        """Every rank's ``flag`` in rank order, on every rank: a collective that all ranks reach, so
        that they can agree on success (and name the ranks that failed) before going on together."""
        if not self.enabled:
            return [flag]
        return [bool(f) for f in self.gather_all(torch.tensor([int(flag)], device=device)).flatten().tolist()]


def from_environment() -> Distributed:
    """Join the process group that torchrun describes in the environment, if there is one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            # Each rank's own GPU before anything touches CUDA: FSDP2 puts its shards, and NCCL its
            # communicator, on the current device, which is cuda:0 on every rank unless set here.
            torch.cuda.set_device(local_rank)
            dist.init_process_group(backend="nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group(backend="gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank)


def shard_seed(seed: int, step: int, shard: int) -> int:
    """A seed for one shard of one step, the same whichever rank computes it."""
    return (seed * 1_000_003 + step) * 4_099 + shard


@contextlib.contextmanager
def shard_randomness(seed: int, device: torch.device):
    """Run the block with the global RNGs seeded to ``seed``, restoring them afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def shutdown() -> None:
    """Leave the process group: free what still uses it, wait for every rank, then destroy it.

    A DDP wrapper that is unreachable but not yet collected (autograd and ``torch.func`` graphs
    form reference cycles) keeps the C++ process group, and its worker threads, alive until
    interpreter exit; a gloo thread that wakes during finalisation then aborts the process.
    Collecting first lets ``destroy_process_group`` actually stop those threads.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def resolve_device(name: str, local_rank: int = 0, option: str = "train.device") -> torch.device:
    """The device ``name`` (auto: this rank's GPU, else cpu); ``option`` is what the user set, for errors."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{option}: unknown device {name!r} (auto, cpu, cuda, cuda:0, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option} is {name!r} but CUDA is not available on this machine; use cpu or auto")
    return device


# -- modules sharded with FSDP ---------------------------------------------------------------------


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor  # imported when needed: it takes a second or two

    return any(isinstance(p, DTensor) for p in model.parameters())


def load_full_model_state(model: nn.Module, state: dict[str, Tensor], strict: bool = True) -> None:
    """Load an unsharded ``state_dict`` (every rank passes the same one); each rank keeps its shard.
    ``strict=False``: ``state`` may hold only part of the model (a diffusers model's trained weights)."""
    if not is_sharded(model):
        model.load_state_dict(state, strict=strict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))

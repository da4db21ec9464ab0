"""Drawing samples from a trained model: the sampler that fits each head, guidance, seeds and chunks.

The one entry point for drawing (``dumo sample``, evaluation, ``dumo.load(...).generate``): given a
model and its objective, which samplers it supports and :func:`generate` / :func:`generate_many`.
The sampler algorithms themselves and their registry are :mod:`dumo.samplers`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dumo.conditioning import Condition, slice_condition
from dumo.config import SampleConfig
from dumo.data import SampleSpace
from dumo.distributed import Distributed
from dumo.errors import SamplingError
from dumo.models.heads import VELOCITY_HEAD
from dumo.objectives import objective_class
from dumo.objectives.base import methods_by_head
from dumo.samplers import VELOCITY_SAMPLER, GuidedModel, HeadView, check_times, cost_label, sample, sampler_named


def sampler_for(objective_name: str, method: str = "auto") -> str:
    """``method``, or with ``auto`` the sampler the objective's model is meant for (its ``default_sampler``)."""
    return objective_class(objective_name).default_sampler if method == "auto" else method


def head_methods(model: nn.Module, objective_name: str) -> dict[str, tuple[str, ...]]:
    """The samplers each head of ``model`` may be drawn with, as its objective declares them (recorded
    in ``model.head_methods`` by :func:`dumo.network.build_network`; else the objective class's own)."""
    return getattr(model, "head_methods", None) or methods_by_head(objective_class(objective_name).supported_samplers())


def unfit_sampler(method: str, objective_name: str, methods: dict[str, tuple[str, ...]], head: str | None = None):
    """The one-line error for a sampler that the objective's model cannot be drawn with."""
    if head is None:
        known = ", ".join(dict.fromkeys(m for ms in methods.values() for m in ms))
        return SamplingError(
            f"sampler {method!r} does not fit this model (objective {objective_name}); it samples with {known}"
        )
    known = ", ".join(methods.get(head, ())) or "none"
    return SamplingError(
        f"sampler {method!r} does not fit head {head!r} of this model (objective {objective_name}); that head "
        f"samples with {known}"
    )


def head_for_sampler(model: nn.Module, objective_name: str, method: str) -> str:
    """The head a named sampler draws when no head is named: the head it reads, or on a multi-head
    model the head of that kind under another name (a MeanFlow head ``m``); refused if none fits."""
    reads = sampler_named(method).head  # an unknown name is told apart from an unfit one
    methods = head_methods(model, objective_name)
    fitting = [name for name, allowed in methods.items() if method in allowed]
    if methods and not fitting:
        raise unfit_sampler(method, objective_name, methods)
    return reads if not fitting or reads in fitting else fitting[0]


def head_sampling(model: nn.Module, objective_name: str, head: str | None, method: str) -> tuple[nn.Module, str]:
    """(the network to sample, the sampler) for drawing ``head`` of ``model`` with ``method``.

    ``head`` None keeps the objective's own sampler (``method`` auto) or the head that a named
    sampler fits; a model whose objective has no single sampler (multi-head) draws its first head.
    A head's sampler for ``method`` auto is the one :func:`dumo.network.build_network` recorded in
    ``model.head_samplers``; a sampler that reads another name sees the head under that name. A
    sampler the objective does not declare for the head (``sampling_methods``) is refused by name.
    """
    samplers = getattr(model, "head_samplers", None) or {}
    methods = head_methods(model, objective_name)
    if head is None:
        if method == "auto" and (objective_class(objective_name).default_sampler or not samplers):
            return model, sampler_for(objective_name, method)
        if method == "auto":
            head = next(iter(samplers))
        else:
            head = head_for_sampler(model, objective_name, method)
            if head == sampler_named(method).head:
                return model, method
    names = tuple(getattr(model, "head_names", ()))
    if head not in names:
        raise SamplingError(f"this model has no head {head!r}; its heads are {', '.join(names)}")
    if method == "auto":
        if head not in samplers:
            raise SamplingError(f"no sampler is known for head {head!r}; name one with --method / sample.method")
        method = samplers[head]
    if methods and method not in methods.get(head, ()):
        raise unfit_sampler(method, objective_name, methods, head)
    reads = sampler_named(method).head
    return (model if reads == head else HeadView(model, head, reads)), method


def check_head(model: nn.Module, head: str, option: str = "head") -> None:
    """A one-line error unless ``model`` has ``head`` (``option`` names it as the caller spells it)."""
    names = tuple(getattr(model, "head_names", ()))
    if head not in names:
        raise SamplingError(f"{option} {head}: this model has no such head (its heads: {', '.join(names)})")


def choose_sampling(
    config: SampleConfig,
    model: nn.Module,
    conditional: bool,
    head: str | None = None,
    guidance: float | None = None,
    head_option: str = "head",
    guidance_option: str = "guidance",
) -> SampleConfig:
    """``config`` with the head and the guidance scale a caller asks for (None: the config's own),
    refused by name where the model cannot take them: a head it lacks, guidance without a condition
    (class labels or prompts) to guide towards. The ``*_option`` names are how the caller spells them
    in its messages."""
    changes: dict[str, object] = {}
    if head is not None:
        check_head(model, head, head_option)
        changes["head"] = head
    if guidance is not None:
        if not (math.isfinite(guidance) and guidance >= 0):
            raise SamplingError(f"{guidance_option} must be a finite number >= 0; got {guidance}")
        if not conditional and guidance != 1:
            raise SamplingError(f"{guidance_option} needs a conditional model (class labels or prompts)")
        changes["guidance_scale"] = guidance
    return dataclasses.replace(config, **changes)


@dataclass(frozen=True)
class HeadDraw:
    """One head drawn with one sampler, and how it is shown (``"u-head"``, ``"v-head Euler"``)."""

    head: str
    method: str
    label: str


def head_draws(
    model: nn.Module,
    objective_name: str,
    head: str | None = None,
    method: str = "auto",
    head_option: str = "head",
    method_option: str = "method",
) -> list[HeadDraw]:
    """The draws that show each head of ``model``: with ``method`` auto every head with its own sampler
    (the objective's own head first: DuMo's u-head, then Euler on its v-head); with ``head`` that head
    only (its own sampler, or ``method``); a named sampler alone draws the head it fits."""
    head_samplers = getattr(model, "head_samplers", None) or {}
    names = tuple(getattr(model, "head_names", ()))
    if head is not None:
        check_head(model, head, head_option)
        if method == "auto" and head not in head_samplers:
            raise SamplingError(f"{head_option} {head}: no sampler is known for it; name one with {method_option}")
        draws = [(head, head_samplers[head] if method == "auto" else method)]
    elif method == "auto":
        own = sampler_for(objective_name)
        draws = list(head_samplers.items()) or [(sampler_named(own).head, own)]
    else:  # the head the sampler fits (refused by name if none does)
        draws = [(head_for_sampler(model, objective_name, method), method)]
    result = []
    for name, sampler in draws:
        if name not in names:
            raise SamplingError(
                f"{method_option} {sampler} needs a {name}-head, which this model lacks (it has {', '.join(names)})"
            )
        label = f"{name}-head"
        if sampler_named(sampler).head == VELOCITY_HEAD:  # velocity samplers are told apart by their integrator
            label += " Euler" if method == "auto" and sampler == VELOCITY_SAMPLER else f" {sampler}"
        result.append(HeadDraw(name, sampler, label))
    return result


def drawing_sampler(model: nn.Module, objective_name: str, config: SampleConfig, method: str = "auto") -> str:
    """The sampler :func:`generate` draws with for ``method`` and ``config`` (refusing one unfit for the model)."""
    return head_sampling(model, objective_name, config.head, method if method != "auto" else config.method)[1]


def is_guided(config: SampleConfig, conditional: bool) -> bool:
    """Whether :func:`generate` guides: a scale other than 1, and class labels to guide towards."""
    return conditional and config.guidance_scale != 1.0


def sampling_cost(
    model: nn.Module,
    objective_name: str,
    nfe: int,
    config: SampleConfig,
    method: str = "auto",
    conditional: bool = False,
) -> str:
    """How drawing with ``nfe`` as :func:`generate` would is shown to people: ``"1 NFE"``, or with
    guidance its steps and network passes, ``"1 step (2 passes with guidance)"``."""
    return cost_label(nfe, drawing_sampler(model, objective_name, config, method), is_guided(config, conditional))


def schedule(nfe: int, config: SampleConfig) -> list[float]:
    """k-step times ``t_start * (1 - i/k)^power`` for i = 0..k-1."""
    return check_times([config.t_start * (1 - i / nfe) ** config.schedule_power for i in range(nfe)])


def balanced_labels(num: int, num_classes: int, device: torch.device | str = "cpu") -> Tensor | None:
    """Labels 0, 1, ..., C-1, 0, 1, ... (None for an unconditional model)."""
    if num_classes == 0:
        return None
    return torch.arange(num, device=device) % num_classes


def generate(
    model: nn.Module,
    objective_name: str,
    shape: Sequence[int],
    nfe: int,
    config: SampleConfig,
    seed: int = 0,
    labels: Condition = None,  # class labels (B,) or prompts (a TextCondition), one per sample
    method: str = "auto",
    times: Sequence[float] | None = None,
    device: torch.device | str = "cpu",
    path: list[Tensor] | None = None,
) -> Tensor:
    """Samples (in the model's standardised space) from noise drawn with ``seed``, conditioned on
    ``labels`` (class labels or prompts; guided towards them when ``config.guidance_scale`` is not 1).

    ``path``, if given, receives the sampler's states in order, from the noise to the samples.
    """
    config.validate("sample")  # a config built in Python skips the checks of a config file
    if nfe < 1:
        raise SamplingError(f"nfe must be >= 1; got {nfe}")
    model, method = head_sampling(model, objective_name, config.head, method if method != "auto" else config.method)
    if is_guided(config, labels is not None):
        model = GuidedModel(model, config.guidance_scale)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(tuple(shape), generator=generator).to(device)
    if times is None and sampler_named(method).scheduled:
        times = schedule(nfe, config)
    return sample(
        model,
        noise,
        nfe,
        method,
        cond=labels,
        times=times,
        t_start=config.t_start,
        stochasticity=config.stochasticity,
        generator=generator,
        path=path,
    )


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of samples [chunk * B, (chunk + 1) * B): a hash of (seed, chunk).

    Any arithmetic mix of the two meets itself somewhere (seed 3 chunk 0 was seed 0 chunk 3, so
    the samples of --seed 3 repeated part of --seed 0's); distinct pairs give distinct hashes.
    """
    digest = hashlib.sha256(f"dumo-samples:{seed}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: torch.Generator takes it as is


@dataclass(frozen=True)
class Chunk:
    """Samples ``start`` to ``stop - 1`` of a draw: chunk ``index`` of ``chunk_seed(seed, index)``."""

    index: int
    start: int
    stop: int
    samples: Tensor  # in the model's space, on the sampling device
    labels: Condition  # the chunk's class labels or prompts


def rank_chunks(num: int, batch_size: int | None, dist: Distributed) -> tuple[int, list[int]]:
    """The chunk size and the chunks rank ``dist.rank`` draws: r, r + W, r + 2W, ..."""
    if num < 1:
        raise SamplingError(f"the number of samples must be >= 1; got {num}")
    batch = min(batch_size or num, num)  # the buffer holds at most the samples asked for
    return batch, list(range(dist.rank, math.ceil(num / batch), dist.world_size))


def sample_chunks(
    model: nn.Module,
    objective_name: str,
    shape: Sequence[int],
    nfe: int,
    config: SampleConfig,
    seed: int = 0,
    labels: Condition = None,  # class labels (B,) or prompts (a TextCondition), one per sample
    method: str = "auto",
    times: Sequence[float] | None = None,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    dist: Distributed | None = None,
) -> Iterator[Chunk]:
    """This rank's chunks of ``shape[0]`` samples, drawn one at a time when asked for.

    Chunk c (samples c*B to c*B + B - 1) always gets the noise of ``chunk_seed(seed, c)``, and
    rank r draws chunks r, r + W, r + 2W, ...; so the samples depend on the seed and batch size,
    not on the number of processes. With no batch size all samples are one chunk. Sampling that
    takes long reports its progress on stderr (rank 0).
    """
    num, *sample_shape = shape
    dist = dist or Distributed()
    batch, mine = rank_chunks(num, batch_size, dist)
    report = SamplingProgress(len(mine), enabled=dist.is_main)
    for count, chunk in enumerate(mine, start=1):
        start, stop = chunk * batch, min((chunk + 1) * batch, num)
        part = slice_condition(labels, start, stop)  # class labels or prompts
        x = generate(
            model,
            objective_name,
            (stop - start, *sample_shape),
            nfe,
            config,
            chunk_seed(seed, chunk),
            part,
            method,
            times,
            device,
        )
        yield Chunk(chunk, start, stop, x, part)
        report.done(count)


class ChunkGather:
    """Keeps this rank's chunks and puts all ranks' chunks together, in order, on every rank."""

    def __init__(
        self,
        num: int,
        sample_shape: Sequence[int],
        batch_size: int | None,
        dist: Distributed,
        device: torch.device | str = "cpu",
    ):
        self.num, self.sample_shape, self.dist = num, tuple(sample_shape), dist
        self.batch, _ = rank_chunks(num, batch_size, dist)
        per_rank = math.ceil(math.ceil(num / self.batch) / dist.world_size)
        self.local = torch.zeros((per_rank, self.batch, *self.sample_shape), device=device)

    def add(self, chunk: Chunk) -> None:
        self.local[chunk.index // self.dist.world_size, : chunk.stop - chunk.start] = chunk.samples

    def result(self) -> Tensor:
        """All ``num`` samples in order (every rank must call this)."""
        gathered = self.dist.gather_all(self.local)  # (world, per_rank, batch, ...): rank r's slot s is chunk s*W + r
        return gathered.transpose(0, 1).reshape(-1, *self.sample_shape)[: self.num]


def generate_many(
    model: nn.Module,
    objective_name: str,
    shape: Sequence[int],
    nfe: int,
    config: SampleConfig,
    seed: int = 0,
    labels: Condition = None,  # class labels (B,) or prompts (a TextCondition), one per sample
    method: str = "auto",
    times: Sequence[float] | None = None,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    dist: Distributed | None = None,
) -> Tensor:
    """``shape[0]`` samples drawn ``batch_size`` at a time, split over the ranks of ``dist`` as
    :func:`sample_chunks` draws them, and gathered on every rank in order."""
    num, *sample_shape = shape
    dist = dist or Distributed()
    gather = ChunkGather(num, sample_shape, batch_size, dist, device)
    for chunk in sample_chunks(
        model, objective_name, shape, nfe, config, seed, labels, method, times, device, batch_size, dist
    ):
        gather.add(chunk)
    return gather.result()


def decoded_batches(space: SampleSpace, chunk: Chunk, decode_batch: int) -> Iterator[tuple[int, Tensor]]:
    """The chunk's samples as images in [0, 1], ``decode_batch`` at a time, each with the global index
    of its first sample; decoded on the chunk's device (a latent model's autoencoder moves there)."""
    for first in range(0, chunk.stop - chunk.start, decode_batch):
        x = chunk.samples[first : first + decode_batch]
        if space.kind == "latents":
            codec = space.codec()
            if next(codec.autoencoder.parameters()).device != x.device:
                codec.autoencoder.to(x.device)
            images = codec.decode(x)
        else:
            images = space.unstandardise(x)
        yield chunk.start + first, images


class SamplingProgress:
    """A line on stderr every ``every`` seconds while chunks are drawn (silent for quick jobs)."""

    def __init__(self, total: int, enabled: bool = True, every: float = 10.0):
        self.total, self.enabled, self.every = total, enabled, every
        self.started = self.last = time.perf_counter()

    def done(self, count: int) -> None:
        now = time.perf_counter()
        if self.enabled and count < self.total and now - self.last >= self.every:
            self.last = now
            left = (now - self.started) / count * (self.total - count)
            print(f"sampling: {count}/{self.total} batches, about {left:.0f} s left", file=sys.stderr, flush=True)

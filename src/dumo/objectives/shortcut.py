"""Shortcut models (Frans et al. 2024): one head s(x_t, t, d), the step of size d from time t.

In dumo's convention (data at t = 0, noise at t = 1, x_t = t z + (1 - t) x) the head is ``u``, the
average velocity over [t - d, t], and one step of size d is ``x_{t-d} = x_t - d u``. The network
is called with ``r = t - d``, so its second time input (the interval embedding of t - r) sees d.

Each batch mixes two kinds of rows, as the public code (kvfrans/shortcut-models) does:

- flow-matching rows: t on the finest grid {1/M, 2/M, ..., 1}, the smallest step d = 1/M (the
  paper's "d = 0"), target z - x;
- self-consistency rows (a fraction ``bootstrap_fraction``, first in the batch): a level k in
  0 .. log2(M) - 1, d = 2^-k, t on that level's grid {d, 2d, ..., 1}, and the target two half
  steps of the stop-gradient network theta^- (:func:`shortcut_target`)::

      v1 = s(x_t, t, d/2),   x' = x_t - (d/2) v1,   v2 = s(x', t - d/2, d/2),   target = (v1 + v2) / 2

  with x' and the target clipped to +-``target_clip`` as in the public code.

The levels are laid out as the public code lays them out: of the B_s self-consistency rows, each
level gets B_s // log2(M) consecutive rows, the smallest step (d = 2/M) first and d = 1 last, and
the remaining B_s mod log2(M) rows take d = 1 too. With ``bootstrap_cfg`` w the rows of the
smallest level (d = 2/M, whose half steps are flow-matching steps 1/M) get a guided target: each
half-step velocity is ``s(., null) + w (s(., c) - s(., null))``, as the public code's
``bootstrap_cfg`` (its ImageNet recipe: w = 1.5). The guidance reaches the larger steps through
self-consistency: their half steps read the conditional network at the guided smaller levels.

Conditions are dropped (``label_dropout``) on flow-matching rows only; the loss is plain MSE over the
whole batch. Sampling is MeanFlow's sampler with uniform times: k Euler steps of size 1/k, each
conditioned on d = 1/k (k NFE).

Deviations from the public code:

- The step size: the original embeds the integer level k (d = 2^-k) through its own timestep
  embedder (sinusoidal features of k and an MLP, next to the one of t); dumo embeds d itself
  through its sinusoidal interval embedding (features of ``time_embedding_scale * d``). Any k may
  be sampled; the step sizes trained are 1/M and the powers 2^-k, k < log2(M), so other k rely on
  the embedding interpolating between them.
- Fewer self-consistency rows than levels: the original gives every such row d = 1 (the smaller
  steps are never trained); dumo spreads them round robin over the levels from a random first
  level, so every level is trained over the steps. The number of such rows is
  ``round(B * bootstrap_fraction)`` of the batch each process runs (B: per rank and accumulation
  shard), at least one when the fraction is positive (the original: ``B // bootstrap_every`` of
  the global batch); it depends on the batch size only, so every rank under FSDP runs the same
  target passes.
- Paths and targets are exactly linear (the original's 1e-5 offset of the noise is left out).
- theta^- (``target_network: ema``) is dumo's EMA of the run, which is also the sampled model and
  follows ``train.ema_warmup`` (decay min(ema_decay, (1 + step) / (10 + step)) by default); the
  original's target EMA has a constant rate (target_update_rate 0.999) from step 1, and it samples
  with the online weights (use_ema 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dumo.conditioning import Condition, Conditioner, cat_conditions, index_condition
from dumo.data.batch import Batch
from dumo.objectives.base import (
    Objective,
    ObjectiveConfig,
    ObjectiveOutput,
    TimeSampler,
    at_least_fp32,
    derivative_precision,
    squared_error,
)
from dumo.objectives.terms import HeadInit, HeadTerm, TargetContext, rows_where
from dumo.paths import expand_time
from dumo.schema import require


@dataclass
class ShortcutConfig(ObjectiveConfig):
    """Keys of the Shortcut objective (``objective.time`` is not used: times lie on the d-grids)."""

    name: Literal["shortcut"] = "shortcut"
    max_steps: int = 128  # M: the finest grid and the smallest step 1/M (a power of two)
    bootstrap_fraction: float = 0.125  # rows with the self-consistency target (the original's 1 / bootstrap_every)
    # theta^- of the self-consistency target: the EMA weights (the original's bootstrap_ema = 1) or
    # the stop-gradient online weights.
    target_network: Literal["online", "ema"] = "ema"
    target_clip: float | None = 4.0  # clip the half-step point and the target to +-this; null = off
    # Guidance scale w of the self-consistency target on the rows of the smallest level (d = 2/M): the
    # original's bootstrap_cfg 1 with cfg_scale w (its ImageNet recipe: 1.5). null = off (the original's
    # default); needs conditions (data.conditional), else it has no effect.
    bootstrap_cfg: float | None = None
    # Precision of the two no-grad target passes (see dumo.objectives.base.derivative_precision).
    # bf16 by default: nothing is differenced, so the passes round no worse than the trained pass
    # (the original runs every pass in bf16).
    target_precision: Literal["fp32", "tf32", "bf16"] = "bf16"

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        m = self.max_steps
        require(
            m >= 2 and m & (m - 1) == 0, f"{prefix}.max_steps must be a power of two >= 2 (2, 4, ..., 128); got {m}"
        )
        require(
            0.0 <= self.bootstrap_fraction < 1.0,
            f"{prefix}.bootstrap_fraction must be in [0, 1); got {self.bootstrap_fraction}",
        )
        require(
            self.target_clip is None or self.target_clip > 0,
            f"{prefix}.target_clip must be > 0 or null; got {self.target_clip}",
        )
        require(
            self.bootstrap_cfg is None or self.bootstrap_cfg >= 0,
            f"{prefix}.bootstrap_cfg must be >= 0 or null; got {self.bootstrap_cfg}",
        )


def _clip(value: Tensor, limit: float | None) -> Tensor:
    return value if limit is None else value.clamp(-limit, limit)


@dataclass(frozen=True)
class Guidance:
    """Which rows of a self-consistency batch get a guided target: the candidate ``rows`` (indices)
    where ``mask`` holds, with scale ``scale`` and the null condition of ``conditioner``."""

    rows: Tensor
    mask: Tensor
    scale: float
    conditioner: Conditioner


def half_step_velocity(
    target_model: nn.Module,
    x: Tensor,
    t: Tensor,
    step: Tensor,
    cond: Condition,
    head: str,
    guidance: Guidance | None,
) -> Tensor:
    """``s(x, t, step)`` in (at least) fp32; on the rows ``guidance`` marks, its guided value
    ``s(., null) + w (s(., c) - s(., null))``. The unconditional passes of the guided rows join the
    conditional pass in one call, as in the original."""
    if guidance is None or cond is None:
        return at_least_fp32(getattr(target_model(x, t, r=t - step, cond=cond), head))
    rows = guidance.rows
    null = guidance.conditioner.null_like(index_condition(cond, rows))
    both = target_model(
        torch.cat([x, x[rows]]),
        torch.cat([t, t[rows]]),
        r=torch.cat([t - step, (t - step)[rows]]),
        cond=cat_conditions([cond, null]),
    )
    velocity = at_least_fp32(getattr(both, head))
    conditional, unconditional = velocity[: x.shape[0]], velocity[x.shape[0] :]
    guided = unconditional + guidance.scale * (conditional[rows] - unconditional)
    # candidates at another level (round robin over few rows) keep their conditional velocity
    at_guided_level = guidance.mask.reshape(-1, *([1] * (guided.dim() - 1)))
    return conditional.index_copy(0, rows, torch.where(at_guided_level, guided, conditional[rows]))


@torch.no_grad()
def shortcut_target(
    target_model: nn.Module,
    x_t: Tensor,
    t: Tensor,
    d: Tensor,
    cond: Condition = None,
    clip: float | None = 4.0,
    head: str = "u",
    guidance: Guidance | None = None,
) -> Tensor:
    """The self-consistency target of a step of size d from t: the mean of two steps of size d/2.

    ``v1 = s(x_t, t, d/2)``, ``x' = x_t - (d/2) v1`` (half a step toward the data),
    ``v2 = s(x', t - d/2, d/2)``, target ``(v1 + v2) / 2``; x' and the target are clipped to
    +-``clip`` (None: not clipped). ``s`` is the ``head`` output of ``target_model`` called with
    ``r = t - step``; on the rows ``guidance`` selects, both half-step velocities are guided (see
    :func:`half_step_velocity`), x' included. Returns the target in (at least) fp32, without gradient.
    """
    half = d / 2
    v1 = half_step_velocity(target_model, x_t, t, half, cond, head, guidance)
    x_half = _clip(x_t - expand_time(half, v1) * v1, clip).to(x_t.dtype)
    v2 = half_step_velocity(target_model, x_half, t - half, half, cond, head, guidance)
    return _clip((v1 + v2) / 2, clip)


def bootstrap_rows(batch_size: int, fraction: float) -> int:
    """How many rows of a batch get the self-consistency target: ``round(B * fraction)``, at least
    one when the fraction is positive (so small per-rank batches still train the shortcut)."""
    if fraction <= 0:
        return 0
    return min(batch_size, max(1, round(batch_size * fraction)))


class ShortcutObjective(Objective):
    heads = ("u",)
    time_inputs = 2
    default_sampler = "meanflow"  # with uniform times: k steps x_{t-1/k} = x_t - u(x_t, t, r = t - 1/k) / k
    sampling_methods = ("meanflow",)
    config: ShortcutConfig

    @classmethod
    def head_terms(cls) -> tuple[type[HeadTerm], ...]:
        return (ShortcutTerm,)

    def head_inits(self) -> dict[str, HeadInit]:
        return {"u": ShortcutTerm.init}

    def target_network(self) -> Literal["online", "ema"]:
        return self.config.target_network

    def target_precision(self) -> Literal["fp32", "tf32", "bf16"]:
        return self.config.target_precision

    @property
    def levels(self) -> int:
        """log2(M): the self-consistency levels k = 0 .. levels - 1 (d = 2^-k); level ``levels`` is d = 1/M."""
        return int(math.log2(self.config.max_steps))

    def is_bootstrap(self, d: Tensor) -> Tensor:
        """Self-consistency rows: a step larger than 1/M (they have d >= 2/M)."""
        return d > 1.5 / self.config.max_steps

    def row_levels(self, count: int, device: torch.device | str) -> Tensor:
        """The level k (d = 2^-k) of each of ``count`` self-consistency rows.

        As the original lays them out: ``count // log2(M)`` rows per level, the smallest step first
        (k = log2(M) - 1, ..., 0), then the remainder at k = 0 (d = 1). With fewer rows than levels
        (where the original trains d = 1 only) round robin from a random first level instead.
        """
        levels = self.levels
        if count < levels:
            first = torch.randint(levels, (), device=device)
            return (first + torch.arange(count, device=device)) % levels
        per_level = count // levels
        blocks = torch.arange(levels - 1, -1, -1, device=device).repeat_interleave(per_level)
        return torch.cat([blocks, torch.zeros(count - blocks.numel(), dtype=blocks.dtype, device=device)])

    def sample_times(self, n: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """(t, d): the first ``bootstrap_rows`` rows on the self-consistency levels (:meth:`row_levels`),
        the rest on the finest level (d = 1/M); t uniform on each row's grid {d, 2d, ..., 1}."""
        count = bootstrap_rows(n, self.config.bootstrap_fraction)
        level = torch.full((n,), self.levels, device=device)
        level[:count] = self.row_levels(count, device)
        steps = torch.pow(2.0, level.float())  # grid points of each row's level
        index = (torch.rand(n, device=device) * steps).floor().clamp(max=steps - 1) + 1
        return index / steps, 1.0 / steps

    def guided_candidates(self, count: int) -> int:
        """How many leading rows of ``count`` self-consistency rows laid out by :meth:`row_levels`
        may be at the smallest level d = 2/M: its block, or every row when there are fewer rows than
        levels (round robin). Known from the count alone: no host sync, the same passes on every rank."""
        return count // self.levels if count >= self.levels else count

    def guidance(self, d: Tensor, candidates: int, conditioner: Conditioner) -> Guidance | None:
        """With ``bootstrap_cfg``: the guided rows among the first ``candidates`` self-consistency
        rows (steps ``d``), those at the smallest level d = 2/M; else None."""
        scale = self.config.bootstrap_cfg
        if scale is None or candidates == 0:
            return None
        rows = torch.arange(candidates, device=d.device)
        mask = (d[:candidates] - 2.0 / self.config.max_steps).abs() < 0.5 / self.config.max_steps
        return Guidance(rows, mask, float(scale), conditioner)

    def __call__(
        self,
        model: nn.Module,
        batch: Batch,
        target_model: nn.Module | None = None,
        teacher_model: nn.Module | None = None,
    ) -> ObjectiveOutput:
        x = batch.x
        kept = self.keep_rows(batch.cond)
        t, d = self.sample_times(x.shape[0], x.device)
        z = torch.randn_like(x)
        cond = batch.cond
        if kept is not None:
            # the self-consistency rows keep their real conditions (as in the original)
            cond = self.conditioner(model, cond).drop(cond, ~kept & ~self.is_bootstrap(d))
        count = bootstrap_rows(x.shape[0], self.config.bootstrap_fraction)
        return self.loss(model, x, z, t, d, cond, target_model=target_model, bootstrap=count)

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        z: Tensor,
        t: Tensor,
        d: Tensor,
        cond: Condition = None,
        target_model: nn.Module | None = None,
        bootstrap: int | None = None,
    ) -> ObjectiveOutput:
        """The loss for given data, noise, times t, steps d (d = 1/M: flow-matching rows, larger d:
        self-consistency rows) and conditions (already dropped where they should be).

        ``bootstrap``: the self-consistency rows are the first ``bootstrap`` rows (as drawn by
        ``__call__``), known without reading d: no host sync, and shapes that do not depend on
        values (fake tensors, FSDP ranks that must run the same passes). None: find them from d.
        """
        cfg = self.config
        target_model = model if target_model is None else target_model
        x_t = self.path.sample(x, z, t)
        target = at_least_fp32(self.path.velocity(x, z, t))
        if bootstrap is None:
            rows = self.is_bootstrap(d).nonzero().squeeze(1)
        else:
            rows = torch.arange(bootstrap, device=d.device)
        kind = torch.zeros_like(t).index_fill(0, rows, 1.0)  # 1 on self-consistency rows
        if rows.numel() > 0:
            # rows laid out by sample_times: the guided level's block leads; rows found from d: any row
            candidates = rows.numel() if bootstrap is None else self.guided_candidates(bootstrap)
            with derivative_precision(cfg, x_t):
                consistent = shortcut_target(
                    target_model,
                    x_t[rows],
                    t[rows],
                    d[rows],
                    index_condition(cond, rows),
                    cfg.target_clip,
                    guidance=self.guidance(d[rows], candidates, self.conditioner(model, cond)),
                )
            target = target.index_copy(0, rows, consistent.to(target.dtype))

        u = model(x_t, t, r=t - d, cond=cond).u
        per_sample = squared_error(u, target)
        parts = {
            "loss": per_sample.mean().detach(),
            "loss_flow": (per_sample * (1 - kind)).sum().detach() / (1 - kind).sum().clamp(min=1),
            "loss_bootstrap": (per_sample * kind).sum().detach() / kind.sum().clamp(min=1),
        }
        return ObjectiveOutput(
            loss=per_sample.mean(),
            parts=parts,
            targets={"t": t, "d": d, "x_t": x_t, "u": target, "bootstrap": kind.bool()},
        )


def shortcut_config(config: Any) -> ShortcutConfig:
    """The Shortcut objective's settings inside a multi-head config (its ``max_steps``,
    ``bootstrap_fraction`` and ``target_clip``)."""
    return ShortcutConfig(
        max_steps=config.max_steps, bootstrap_fraction=config.bootstrap_fraction, target_clip=config.target_clip
    )


class ShortcutTerm(HeadTerm):
    """Shortcut's head s(x_t, t, d) with d = t - r in a multi-head model (kind ``shortcut``): Flow
    Matching (z - x) on rows with the finest step 1/M, the two-half-step self-consistency target of
    theta^- (:func:`shortcut_target`) on the others; (t, d) are drawn as the Shortcut objective draws them."""

    kind, sampler, uses_r = "shortcut", ShortcutObjective.default_sampler, True
    methods = ShortcutObjective.sampling_methods
    init = HeadInit(zero_interval=True)  # as MeanFlow's: the teacher's velocity for every step size at step 0

    def __init__(self, head: str, config: Any):
        super().__init__(head, config)
        self.shortcut = ShortcutObjective(shortcut_config(config))

    def draw_times(self, time_sampler: TimeSampler, n: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
        t, d = self.shortcut.sample_times(n, device)
        return t, t - d

    def target(self, context: TargetContext, derivative: Tensor | None) -> Tensor:
        d = context.t - context.r
        # Shortcut draws round(B * bootstrap_fraction) self-consistency rows (the count is what the
        # FLOP count on fake tensors, which cannot see the values, takes)
        count = bootstrap_rows(d.shape[0], self.config.bootstrap_fraction)
        rows = rows_where(self.shortcut.is_bootstrap(d), count)
        target = context.path_velocity  # Shortcut's own Flow Matching target, unguided
        if rows.shape[0] == 0:
            return target
        consistent = shortcut_target(
            context.target_model,
            context.x_t[rows],
            context.t[rows],
            d[rows],
            index_condition(context.cond, rows),
            self.config.target_clip,
            head=self.head,
        )
        return target.index_copy(0, rows, consistent.to(target.dtype))

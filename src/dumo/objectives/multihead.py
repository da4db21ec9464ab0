"""Multi-head ("multiplicity") models: one backbone, any named set of heads, each trained by its own
objective term with its own weight (paper Sec. 4.3).

    objective:
      name: multihead
      heads:                       # head name -> term kind and loss weight
        v: {kind: velocity, weight: 0.5}
        u: {kind: dumo_flow_map, weight: 0.25}
        m: {kind: meanflow, weight: 0.25}

The backbone takes two time inputs (t, r) whenever a term uses r. The term that uses r draws
(t, r) (MeanFlow: its sampler with ``rho``; Shortcut: its (t, d) grids with r = t - d);
otherwise r = t. One pass with gradients at
(x_t, t, r) gives every head's output, and the loss is ``sum_h weight_h * mean(term_h)``:

- ``velocity``:       v_tgt = (z - x) + zeta (sg(v) - v_minus(x_t, t, r, null))   (DuMo's guidance)
- ``dumo_flow_map``:  u_tgt = v_tgt - t du/dt        (DuMo's target; independent of r)
- ``meanflow``:       m_tgt = v_tgt - (t - r) dm/dt  (MeanFlow's target)
- ``shortcut``:       s_tgt = z - x on rows with d = t - r = 1/M, else the two half steps of
                      theta^- (Shortcut's :func:`shortcut_target`, on this head)

The velocity and flow-map targets do not depend on r, so those heads learn to ignore it; their
derivative passes use the same r as the pass with gradients. The derivatives come from theta^-
at the points of a central difference (or a JVP) along each term's tangent. Terms whose tangent
is the same tensor share those passes (``share_derivative_passes``): one batched call at t + e
and t - e gives du/dt and dm/dt together. MeanFlow's stencil stays in [r, 1] and DuMo's in
[0, 1], so on rows with t - e < r the lower points differ; only those rows get an extra pass,
which keeps the loss what separate passes give.

The target formulas are the single-head objectives' own functions (:func:`flow_map_target`,
:func:`average_velocity_target`, :func:`shortcut_target`); a term kind is declared by the objective
it comes from (``head_terms``) and found through :data:`dumo.objectives.OBJECTIVES` (:func:`head_kinds`).
Conditions are dropped once for all heads (``label_dropout``), so Shortcut's self-consistency rows,
which keep their conditions in the Shortcut objective, may be dropped here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from dumo.conditioning import Condition, index_condition
from dumo.data.batch import Batch
from dumo.errors import ConfigError
from dumo.models.heads import check_head_names
from dumo.objectives.base import (
    FewStepConfig,
    FewStepObjective,
    ModelInput,
    ObjectiveOutput,
    adaptive_weighting,
    at_least_fp32,
    central_difference_times,
    derivative_precision,
    difference_quotient,
    forward_many,
    squared_error,
    time_derivative_jvp,
)
from dumo.objectives.shortcut import shortcut_config
from dumo.objectives.terms import DerivativeNeed, HeadInit, HeadTerm, TargetContext, rows_where
from dumo.paths import expand_time
from dumo.schema import require


@dataclass
class HeadConfig:
    """One head of a multi-head model: the objective term that trains it and its loss weight."""

    kind: str = ""
    weight: float = 1.0

    def validate(self, prefix: str) -> None:
        kinds = head_kinds()
        require(self.kind in kinds, f"{prefix}.kind must be one of {', '.join(kinds)}; got {self.kind!r}")
        require(self.weight >= 0.0, f"{prefix}.weight must be >= 0; got {self.weight}")


def tri_head_meanflow() -> dict[str, HeadConfig]:
    """The paper's tri-head variant (a) (Sec. 4.3): velocity, MeanFlow average velocity, DuMo flow map."""
    return {"v": HeadConfig("velocity", 0.5), "u": HeadConfig("dumo_flow_map", 0.25), "m": HeadConfig("meanflow", 0.25)}


@dataclass
class MultiHeadConfig(FewStepConfig):
    name: Literal["multihead"] = "multihead"
    # head name -> term and weight; by default the paper's tri-head (a), velocity + MeanFlow + DuMo
    heads: dict[str, HeadConfig] = field(default_factory=tri_head_meanflow)
    rho: float = 0.75  # meanflow term: fraction of rows with r = t (MeanFlow's velocity ratio)
    # shortcut term (see dumo.objectives.shortcut): the finest grid 1/M, the share of
    # self-consistency rows and the clip of their target
    max_steps: int = 128
    bootstrap_fraction: float = 0.125
    target_clip: float | None = 4.0
    # dumo_flow_map term: the tangent of du/dt (see dumo.objectives.dumo)
    derivative_direction: Literal["conditional", "guided", "v_head"] = "conditional"
    # Terms with the same tangent take their derivatives from the same theta^- passes; false gives
    # each term its own passes (the same loss at a higher cost; kept for checking that).
    share_derivative_passes: bool = True

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        require(bool(self.heads), f"{prefix}.heads must name at least one head, e.g. {{v: {{kind: velocity}}}}")
        try:
            check_head_names(tuple(self.heads))
        except ValueError as error:
            raise ConfigError(f"{prefix}.heads: {error}") from None
        require(sum(h.weight for h in self.heads.values()) > 0, f"{prefix}.heads: the weights must not all be 0")
        require(0.0 <= self.rho <= 1.0, f"{prefix}.rho must be in [0, 1]; got {self.rho}")
        shortcut_config(self).validate(prefix)
        terms = {name: head_kinds()[h.kind] for name, h in self.heads.items()}
        velocity_heads = [name for name, term in terms.items() if term.is_velocity]
        require(
            len(velocity_heads) <= 1,
            f"{prefix}.heads: at most one head of kind velocity; got {', '.join(velocity_heads)}",
        )
        needs_velocity = self.zeta > 0 or (
            self.derivative_direction == "v_head" and any(h.kind == "dumo_flow_map" for h in self.heads.values())
        )
        require(
            not needs_velocity or velocity_heads,
            f"{prefix}: guidance (zeta > 0) and derivative_direction v_head need a head of kind velocity",
        )
        drawing = [name for name, term in terms.items() if term.uses_r]
        require(
            len(drawing) <= 1,
            f"{prefix}.heads: {', '.join(drawing)} each draw their own (t, r); a model can have one such head",
        )


def head_kinds() -> dict[str, type[HeadTerm]]:
    """Every head kind (``objective.heads.<name>.kind``) and its term: those the objectives of
    :data:`dumo.objectives.OBJECTIVES` declare (``head_terms``), so an objective registered there
    brings its kind along."""
    from dumo.objectives import OBJECTIVES  # the registry imports this module

    return {term.kind: term for _, objective in OBJECTIVES.values() for term in objective.head_terms()}


class MultiHeadObjective(FewStepObjective):
    """Any named set of heads on one backbone, each with its term and weight (module docstring).

    ``heads`` and ``time_inputs`` come from the config (instance attributes), so the network built
    for a run has exactly the configured heads.
    """

    config: MultiHeadConfig

    def __init__(self, config: MultiHeadConfig, num_classes: int = 0):
        super().__init__(config, num_classes)
        kinds = head_kinds()
        self.terms = {name: kinds[head.kind](name, config) for name, head in config.heads.items()}
        self.heads = tuple(config.heads)
        self.time_inputs = 2 if any(term.uses_r for term in self.terms.values()) else 1
        self.velocity_head = next((name for name, term in self.terms.items() if term.is_velocity), None)

    def head_samplers(self) -> dict[str, str]:
        return {name: term.sampler for name, term in self.terms.items()}

    def head_methods(self) -> dict[str, tuple[str, ...]]:
        return {name: term.methods or (term.sampler,) for name, term in self.terms.items()}

    def head_inits(self) -> dict[str, HeadInit]:
        return {name: term.init for name, term in self.terms.items() if term.init is not None}

    def __call__(
        self,
        model: nn.Module,
        batch: Batch,
        target_model: nn.Module | None = None,
        teacher_model: nn.Module | None = None,
    ) -> ObjectiveOutput:
        x = batch.x
        z = torch.randn_like(x)
        t, r = self.draw_times(x.shape[0], x.device)
        cond, kept = self.drop_condition(batch.cond, self.conditioner(model, batch.cond))
        return self.loss(model, x, z, t, r, cond, kept, target_model, teacher_model)

    def draw_times(self, n: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """(t, r) as the term that uses r draws them; t and r = t when none does."""
        for term in self.terms.values():
            if term.uses_r:
                return term.draw_times(self.time_sampler, n, device)
        t = self.time_sampler.sample(n, device)
        return t, t

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        z: Tensor,
        t: Tensor,
        r: Tensor,
        cond: Condition = None,
        kept: Tensor | None = None,
        target_model: nn.Module | None = None,
        teacher_model: nn.Module | None = None,
    ) -> ObjectiveOutput:
        """The loss for given data, noise, times r <= t and (already dropped) conditions; ``kept``
        marks the rows whose condition was not dropped."""
        cfg = self.config
        target_model, guidance_model = self.networks(model, target_model, teacher_model)
        x_t = self.path.sample(x, z, t)
        path_velocity = at_least_fp32(self.path.velocity(x, z, t))

        # The one pass with gradients: every head from one backbone evaluation.
        out = model(x_t, t, r=r, cond=cond)

        with torch.no_grad(), derivative_precision(cfg, x):
            guided = cfg.zeta > 0 and cond is not None
            v_target = path_velocity
            unconditional = None
            if guided:
                conditioner = self.conditioner(model, cond)
                kept = ~conditioner.is_null(cond) if kept is None else kept
                velocity = self.velocity_head
                unconditional = guidance_model(x_t, t, r=r, cond=conditioner.null_like(cond)).outputs[velocity]
                v_target = self.guide(v_target, out.outputs[velocity].detach(), unconditional, kept, t)
            tangents = {"path": path_velocity.to(x.dtype), "target": v_target.to(x.dtype)}
            if self.velocity_head is not None:
                v_head = at_least_fp32(out.outputs[self.velocity_head].detach())
                if guided:
                    v_head = self.guide(v_head, v_head, unconditional, kept, t)
                tangents["v_head"] = v_head.to(x.dtype)
            context = TargetContext(x_t, t, r, cond, path_velocity, v_target, out, target_model, guided)
            needs = {name: term.derivative_need(context, tangents) for name, term in self.terms.items()}
            derivatives = self.time_derivatives(context, [need for need in needs.values() if need is not None])
            targets = {
                name: term.target(context, None if needs[name] is None else self.clamp(derivatives[name]))
                for name, term in self.terms.items()
            }

        loss = torch.zeros((), device=x.device)
        parts = {}
        for name, head in cfg.heads.items():
            per_sample = squared_error(out.outputs[name], targets[name])
            loss = loss + head.weight * adaptive_weighting(per_sample, cfg.adaptive_p, cfg.adaptive_c).mean()
            parts[f"loss_{name}"] = per_sample.mean().detach()
        extra = {f"d{name}_dt": derivatives[name] for name in derivatives}
        return ObjectiveOutput(
            loss=loss, parts=parts, targets={"t": t, "r": r, "x_t": x_t, "v": v_target, **targets, **extra}
        )

    def time_derivatives(self, context: TargetContext, needs: list[DerivativeNeed]) -> dict[str, Tensor]:
        """d(head)/dt of theta^- for each need, by head; needs with one tangent share their passes
        when ``share_derivative_passes``."""
        groups: list[list[DerivativeNeed]] = []
        for need in needs:
            group = next((g for g in groups if g[0].tangent_key == need.tangent_key), None)
            if self.config.share_derivative_passes and group is not None:
                group.append(need)
            else:
                groups.append([need])
        derivatives = {}
        for group in groups:
            if self.config.derivative == "jvp":
                derivatives.update(self.jvp_derivatives(context, group))
            else:
                derivatives.update(self.difference_derivatives(context, group))
        return derivatives

    def jvp_derivatives(self, context: TargetContext, group: list[DerivativeNeed]) -> dict[str, Tensor]:
        """One forward-mode pass of theta^- along the group's tangent gives every head's derivative."""
        heads = [need.head for need in group]

        def head_outputs(x_in: Tensor, t_in: Tensor, r_in: Tensor) -> dict[str, Tensor]:
            out = context.target_model(x_in, t_in, r=r_in, cond=context.cond)
            return {name: at_least_fp32(out.outputs[name]) for name in heads}

        _, tangent_out = time_derivative_jvp(head_outputs, context.x_t, context.t, group[0].tangent, context.r)
        return tangent_out

    def difference_derivatives(self, context: TargetContext, group: list[DerivativeNeed]) -> dict[str, Tensor]:
        """Central differences for every need of the group from one batched set of theta^- passes:
        the upper points (the same for all), the lower points of the first need, and the lower points
        of the others only on rows where their stencil's lower end differs and the derivative is used.

        MeanFlow keeps its stencil in [r, 1], DuMo in [0, 1]: they differ where t - e < r, which
        includes every row with r = t, where MeanFlow's derivative is not used; so only rows with
        t - e < r < t get a pass of their own."""
        x_t, t, r, cond = context.x_t, context.t, context.r, context.cond
        tangent, epsilon = group[0].tangent, self.config.epsilon
        group = sorted(group, key=lambda need: need.used is not None)  # a need of every row first
        stencils = [central_difference_times(t, epsilon, need.lower, 1.0) for need in group]
        t_high = stencils[0][1]
        for index, need in enumerate(group[1:], start=1):
            if need.used is not None:  # unused rows take the first need's stencil: no pass of their own
                stencils[index] = (torch.where(need.used, stencils[index][0], stencils[0][0]), t_high)

        def point(t_end: Tensor, rows: Tensor | slice = slice(None)) -> ModelInput:
            x_end = x_t[rows] + expand_time(t_end[rows] - t[rows], x_t[rows]) * tangent[rows]
            return ModelInput(x_end, t_end[rows], r=r[rows], cond=index_condition(cond, rows))

        first_low = stencils[0][0]
        requests = [point(t_high), point(first_low)]
        extra_rows = []
        for t_low, _ in stencils[1:]:
            differs = t_low != first_low
            # At least one row, so that every rank makes the same network calls (FSDP gathers
            # parameters per call); a row whose stencils agree gets the same value back.
            differs[0] = True
            rows = rows_where(differs, 1)  # on fake tensors: the one row every rank runs
            extra_rows.append(rows)
            requests.append(point(t_low, rows))
        outputs = iter(forward_many(context.target_model, requests, batched=self.config.batch_target_passes))
        high, low = next(outputs), next(outputs)
        derivatives = {}
        for index, (need, (t_low, _)) in enumerate(zip(group, stencils)):
            low_values = low.outputs[need.head]
            if index > 0:
                low_values = low_values.index_copy(0, extra_rows[index - 1], next(outputs).outputs[need.head])
            derivatives[need.head] = difference_quotient(high.outputs[need.head], low_values, t_high, t_low)
        return derivatives

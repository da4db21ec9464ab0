"""MeanFlow: one head u(x_t, r, t), the average velocity from time r to time t.

    x_r    = x_t - (t - r) u(x_t, r, t)
    u_tgt  = v_tgt - (t - r) du/dt,   tangent (dx/dt, dr/dt, dt/dt) = (v_tgt, 0, 1)

A fraction ``rho`` of samples has r = t, where u is the instantaneous velocity (the
Flow Matching loss); the rest trains the flow map. One-step sampling: x_0 = z - u(z, 0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from dumo.conditioning import Condition
from dumo.data.batch import Batch
from dumo.objectives.base import (
    FewStepConfig,
    FewStepObjective,
    ModelInput,
    ObjectiveOutput,
    TimeSampler,
    adaptive_weighting,
    at_least_fp32,
    central_difference_times,
    derivative_precision,
    difference_quotient,
    forward_many,
    squared_error,
    time_derivative_jvp,
)
from dumo.objectives.terms import DerivativeNeed, HeadInit, HeadTerm, TargetContext
from dumo.paths import expand_time
from dumo.schema import require


@dataclass
class MeanFlowConfig(FewStepConfig):
    name: Literal["meanflow"] = "meanflow"
    derivative: Literal["finite_difference", "jvp"] = "jvp"  # MeanFlow's own choice
    rho: float = 0.75  # fraction of samples with r = t (the velocity ratio)
    # The velocity of the target (and the tangent of du/dt): the conditional z - x (MeanFlow's own,
    # consistency training) or the frozen teacher's u(x_t, t, t) of a run started with train.init_from
    # (distillation: no per-sample noise in the target). DuMo's key of the same name.
    u_velocity: Literal["conditional", "teacher"] = "conditional"

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        require(0.0 <= self.rho <= 1.0, f"{prefix}.rho must be in [0, 1]; got {self.rho}")
        require(
            self.u_velocity == "conditional" or self.zeta == 0,
            f"{prefix}.zeta must be 0 with u_velocity {self.u_velocity} (guidance is not implemented for it)",
        )


def draw_average_velocity_times(
    time_sampler: TimeSampler, rho: float, n: int, device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """MeanFlow's (t, r) with r <= t: two draws sorted, then r = t on a fraction ``rho`` of rows."""
    pair = time_sampler.sample(2 * n, device).reshape(2, n)
    t, r = pair.max(dim=0).values, pair.min(dim=0).values
    on_diagonal = torch.rand(n, device=device) < rho
    return t, torch.where(on_diagonal, t, r)


def average_velocity_target(v_target: Tensor, t: Tensor, r: Tensor, du_dt: Tensor) -> Tensor:
    """MeanFlow's target ``v_tgt - (t - r) du/dt`` for the average velocity from r to t (shared with
    the multi-head objective)."""
    return v_target - expand_time(t - r, du_dt) * du_dt


class MeanFlowTerm(HeadTerm):
    """MeanFlow's average-velocity head in a multi-head model (kind ``meanflow``): ``v_tgt - (t - r) dm/dt``."""

    kind, sampler, uses_r = "meanflow", "meanflow", True
    methods = ("meanflow",)
    # the teacher's velocity with a zero interval embedding: u(x, r, t) = v(x, t) for every r at step 0
    init = HeadInit(zero_interval=True)

    def draw_times(self, time_sampler: TimeSampler, n: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
        return draw_average_velocity_times(time_sampler, self.config.rho, n, device)

    def derivative_need(self, context: TargetContext, tangents: dict[str, Tensor]) -> DerivativeNeed:
        # MeanFlow's tangent is its velocity target: the conditional path itself when unguided.
        key = "target" if context.guided else "path"
        return DerivativeNeed(self.head, key, tangents[key], context.r, used=context.t != context.r)

    def target(self, context: TargetContext, derivative: Tensor | None) -> Tensor:
        return average_velocity_target(context.v_target, context.t, context.r, derivative)


class MeanFlowObjective(FewStepObjective):
    heads = ("u",)
    time_inputs = 2
    default_sampler = "meanflow"
    sampling_methods = MeanFlowTerm.methods  # its one head is the average velocity u(x_t, r, t): no v to integrate
    config: MeanFlowConfig

    @classmethod
    def head_terms(cls) -> tuple[type[HeadTerm], ...]:
        return (MeanFlowTerm,)

    def head_inits(self) -> dict[str, HeadInit]:
        return {"u": MeanFlowTerm.init}

    def wants_teacher(self) -> bool:
        return super().wants_teacher() or self.config.u_velocity == "teacher"

    def sample_times(self, n: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """(t, r) with r <= t: two draws sorted, then r = t on a fraction rho of rows."""
        return draw_average_velocity_times(self.time_sampler, self.config.rho, n, device)

    def __call__(
        self,
        model: nn.Module,
        batch: Batch,
        target_model: nn.Module | None = None,
        teacher_model: nn.Module | None = None,
    ) -> ObjectiveOutput:
        x = batch.x
        z = torch.randn_like(x)
        t, r = self.sample_times(x.shape[0], x.device)
        cond, kept = self.drop_condition(batch.cond, self.conditioner(model, batch.cond))
        return self.loss(model, x, z, t, r, cond, kept, target_model, teacher_model)

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
        """The loss for given data, noise, times r <= t and (already dropped) conditions."""
        cfg = self.config
        # One forward-mode pass through ``model`` can give u and du/dt together only when theta^- is
        # ``model`` itself; a separate target (EMA, teacher, or the unwrapped module under DDP, whose
        # forward cannot run inside torch.func.jvp) gets its own no-grad derivative pass.
        # Under autocast the backward pass through a forward run inside torch.func.jvp failed on CUDA
        # ("expected input and grad types to match"), so there u comes from a plain pass and du/dt
        # from a separate no-grad JVP, in objective.target_precision: one forward pass more.
        single_pass_jvp = (
            cfg.derivative == "jvp"
            and cfg.target_network == "online"
            and target_model is None
            and not torch.is_autocast_enabled(x.device.type)
        )
        target_model, guidance_model = self.networks(model, target_model, teacher_model)
        x_t = self.path.sample(x, z, t)
        v_target = at_least_fp32(self.path.velocity(x, z, t))

        if cfg.zeta > 0 and cond is not None:
            conditioner = self.conditioner(model, cond)
            kept = ~conditioner.is_null(cond) if kept is None else kept
            # Guidance needs the conditional and unconditional velocity u(x_t, t, t) of theta^-
            # (the unconditional one from the teacher when guidance_network is "teacher").
            with torch.no_grad():
                conditional_request = ModelInput(x_t, t, r=t, cond=cond)
                unconditional_request = ModelInput(x_t, t, r=t, cond=conditioner.null_like(cond))
                if guidance_model is target_model:
                    conditional, unconditional = forward_many(
                        target_model, [conditional_request, unconditional_request], batched=cfg.batch_target_passes
                    )
                else:
                    (conditional,) = forward_many(target_model, [conditional_request], batched=False)
                    (unconditional,) = forward_many(guidance_model, [unconditional_request], batched=False)
                v_target = self.guide(v_target, conditional.u, unconditional.u, kept, t)

        if cfg.u_velocity == "teacher":
            with torch.no_grad():
                v_target = at_least_fp32(teacher_model(x_t, t, r=t, cond=cond).u)

        def average_velocity(x_in: Tensor, t_in: Tensor, r_in: Tensor) -> Tensor:
            return model(x_in, t_in, r=r_in, cond=cond).u

        tangent = v_target.to(x.dtype)
        if single_pass_jvp:
            # One forward-mode pass gives u (with gradients) and du/dt (treated as sg).
            u, du_dt = time_derivative_jvp(average_velocity, x_t, t, tangent, r)
            du_dt = at_least_fp32(du_dt.detach())
        else:
            u = average_velocity(x_t, t, r)
            du_dt = self.target_derivative(target_model, x_t, t, r, tangent, cond)
        du_dt = self.clamp(du_dt)
        u_target = average_velocity_target(v_target, t, r, du_dt)

        per_sample = squared_error(u, u_target)
        loss = adaptive_weighting(per_sample, cfg.adaptive_p, cfg.adaptive_c).mean()
        on_diagonal = (t == r).float()
        parts = {
            "loss": per_sample.mean().detach(),
            "loss_v": (per_sample * on_diagonal).sum().detach() / on_diagonal.sum().clamp(min=1),
            "loss_u": (per_sample * (1 - on_diagonal)).sum().detach() / (1 - on_diagonal).sum().clamp(min=1),
        }
        return ObjectiveOutput(
            loss=loss,
            parts=parts,
            targets={"t": t, "r": r, "x_t": x_t, "v": v_target, "u": u_target, "du_dt": du_dt},
        )

    @torch.no_grad()
    def target_derivative(
        self, target_model: nn.Module, x_t: Tensor, t: Tensor, r: Tensor, tangent: Tensor, cond: Condition
    ) -> Tensor:
        """du_minus/dt along (tangent, 0, 1) from theta^-, by finite difference or JVP."""
        cfg = self.config
        if cfg.derivative == "jvp":

            def average_velocity(x_in: Tensor, t_in: Tensor, r_in: Tensor) -> Tensor:
                return at_least_fp32(target_model(x_in, t_in, r=r_in, cond=cond).u)

            with derivative_precision(cfg, x_t):
                return time_derivative_jvp(average_velocity, x_t, t, tangent, r)[1]
        # The stencil stays in [r, 1]; rows with t = r get width 0 and derivative 0, which the
        # factor (t - r) ignores anyway.
        t_low, t_high = central_difference_times(t, cfg.epsilon, r, 1.0)
        with derivative_precision(cfg, x_t):
            high, low = forward_many(
                target_model,
                [
                    ModelInput(x_t + expand_time(t_high - t, x_t) * tangent, t_high, r=r, cond=cond),
                    ModelInput(x_t + expand_time(t_low - t, x_t) * tangent, t_low, r=r, cond=cond),
                ],
                batched=cfg.batch_target_passes,
            )
        return difference_quotient(high.u, low.u, t_high, t_low)

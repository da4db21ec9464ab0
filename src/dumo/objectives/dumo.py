"""DuMo: one backbone, a velocity head v and a flow-map head u, trained together (paper Alg. 1).

    x_t    = t z + (1 - t) x
    v_tgt  = (z - x) + zeta * (sg(v_theta) - v_minus(x_t, t, null))     rows with a real condition
    u_tgt  = v_tgt - t * du_minus/dt                                     total derivative along a direction
    loss   = beta * |v_theta - sg(v_tgt)|^2 + (1 - beta) * |u_theta - sg(u_tgt)|^2

From t u(x_t, t) = x_t - x_0 with x_0 fixed along the trajectory: u + t du/dt = dx_t/dt.

Along which direction du/dt is taken (``derivative_direction``; the paper's Alg. 1 does not say
once v_tgt is guided):

- ``conditional``: the conditional path, dx/dt = z - x. Its expectation given x_t is the marginal
  velocity, but each sample adds t * (du/dx) (z - x - v), zero-mean noise that grows with the
  roughness of u and feeds back through theta^- (see README "Make your flow model one-step").
- ``guided``: the guided velocity target v_tgt (MeanFlow's tangent), for which u is the flow map
  of the guided field. Without guidance it equals ``conditional``.
- ``v_head``: the network's own velocity sg(v_theta(x_t, t)), guided like v_tgt when zeta > 0:
  the ODE direction itself, as in consistency distillation, with no per-sample noise. It costs
  nothing extra: v_theta comes from the pass with gradients.

Which velocity the flow-map target is built from (``u_velocity``; the v-loss always regresses on
v_tgt):

- ``conditional``: v_tgt, as in the paper's Eq. (8) (consistency training). The target of u then
  carries the per-sample noise (z - x - v) of the conditional velocity.
- ``v_head``: the network's own sg(v_theta(x_t, t)), differentiated along itself: u_tgt is a
  deterministic function of x_t, and u's fixed point is the flow map of the v-head's ODE
  (self-distillation, at no extra cost).
- ``teacher``: the frozen teacher's velocity (train.init_from), differentiated along itself:
  consistency distillation of the teacher's ODE (one more no-grad pass).
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
class DuMoConfig(FewStepConfig):
    name: Literal["dumo"] = "dumo"
    beta: float = 0.7  # weight of the velocity loss; 1 - beta on the flow-map loss
    derivative_direction: Literal["conditional", "guided", "v_head"] = "conditional"  # see the module docstring
    u_velocity: Literal["conditional", "v_head", "teacher"] = "conditional"  # see the module docstring

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        require(0.0 <= self.beta <= 1.0, f"{prefix}.beta must be in [0, 1]; got {self.beta}")
        if self.u_velocity != "conditional":
            # the derivative follows the same velocity, so u is that field's flow map
            require(
                self.derivative_direction == "conditional",
                f"{prefix}.derivative_direction applies to u_velocity conditional only; with u_velocity "
                f"{self.u_velocity} du/dt is taken along that velocity",
            )
            require(
                self.zeta == 0,
                f"{prefix}.zeta must be 0 with u_velocity {self.u_velocity} (guidance is not implemented for it)",
            )


def flow_map_target(v_target: Tensor, t: Tensor, du_dt: Tensor) -> Tensor:
    """DuMo's flow-map target ``v_tgt - t du/dt`` (from ``t u(x_t, t) = x_t - x_0``), shared with
    the multi-head objective."""
    return v_target - expand_time(t, du_dt) * du_dt


class DuMoFlowMapTerm(HeadTerm):
    """DuMo's flow-map head in a multi-head model (kind ``dumo_flow_map``): ``v_tgt - t du/dt``."""

    kind, sampler, methods = "dumo_flow_map", "flow_map", ("flow_map",)
    # the teacher's velocity: one u-step is then its one Euler step at step 0 (or zero, model.u_head_init)
    init = HeadInit(zero_allowed=True)

    def derivative_need(self, context: TargetContext, tangents: dict[str, Tensor]) -> DerivativeNeed:
        # As in DuMoObjective: "guided" is the conditional path when nothing is guided.
        direction = self.config.derivative_direction
        key = "v_head" if direction == "v_head" else "target" if direction == "guided" and context.guided else "path"
        return DerivativeNeed(self.head, key, tangents[key], 0.0)

    def target(self, context: TargetContext, derivative: Tensor | None) -> Tensor:
        return flow_map_target(context.v_target, context.t, derivative)


class DuMoObjective(FewStepObjective):
    heads = ("v", "u")
    time_inputs = 1
    default_sampler = "flow_map"
    sampling_methods = ("flow_map", "euler", "heun")  # the u-head's flow map; the v-head's ODE
    config: DuMoConfig

    @classmethod
    def head_terms(cls) -> tuple[type[HeadTerm], ...]:
        return (DuMoFlowMapTerm,)

    def head_inits(self) -> dict[str, HeadInit]:
        return {"u": DuMoFlowMapTerm.init}

    def wants_teacher(self) -> bool:
        return super().wants_teacher() or self.config.u_velocity == "teacher"

    def __call__(
        self,
        model: nn.Module,
        batch: Batch,
        target_model: nn.Module | None = None,
        teacher_model: nn.Module | None = None,
    ) -> ObjectiveOutput:
        x = batch.x
        z = torch.randn_like(x)
        t = self.time_sampler.sample(x.shape[0], x.device)
        cond, kept = self.drop_condition(batch.cond, self.conditioner(model, batch.cond))
        return self.loss(model, x, z, t, cond, kept, target_model, teacher_model)

    def loss(
        self,
        model: nn.Module,
        x: Tensor,
        z: Tensor,
        t: Tensor,
        cond: Condition = None,
        kept: Tensor | None = None,
        target_model: nn.Module | None = None,
        teacher_model: nn.Module | None = None,
    ) -> ObjectiveOutput:
        """The loss for given data, noise, times and (already dropped) conditions; ``kept`` marks the
        rows whose condition was not dropped."""
        cfg = self.config
        conditioner = self.conditioner(model, cond)
        target_model, guidance_model = self.networks(model, target_model, teacher_model)
        x_t = self.path.sample(x, z, t)
        path_velocity = self.path.velocity(x, z, t)

        # The one pass with gradients: both heads from one backbone evaluation.
        out = model(x_t, t, cond=cond)

        with torch.no_grad(), derivative_precision(cfg, x):
            guided = cfg.zeta > 0 and cond is not None
            if guided and kept is None:
                kept = ~conditioner.is_null(cond)
            # Without guidance the "guided" direction is the conditional path itself.
            along_target = (
                cfg.u_velocity != "conditional"
                or cfg.derivative_direction == "v_head"
                or (guided and cfg.derivative_direction == "guided")
            )
            # The no-grad passes are independent of each other unless the stencil follows a guided
            # velocity (it needs the unconditional pass first) or guidance uses another network:
            # otherwise u at t +- e and the unconditional v at t run as one batched call.
            separate_guidance = guided and (along_target or guidance_model is not target_model)
            v_target = at_least_fp32(path_velocity)
            unconditional = None
            if separate_guidance:
                unconditional = guidance_model(x_t, t, cond=conditioner.null_like(cond)).v
                v_target = self.guide(v_target, out.v.detach(), unconditional, kept, t)
            map_velocity = None  # the velocity of u's target where it is not v_target (u_velocity)
            if cfg.u_velocity == "v_head":
                map_velocity = at_least_fp32(out.v.detach())
            elif cfg.u_velocity == "teacher":
                map_velocity = at_least_fp32(teacher_model(x_t, t, cond=cond).v)
            if map_velocity is not None:
                direction = map_velocity.to(x.dtype)
            elif cfg.derivative_direction == "v_head":
                direction = at_least_fp32(out.v.detach())
                if guided:
                    direction = self.guide(direction, out.v.detach(), unconditional, kept, t)
                direction = direction.to(x.dtype)
            elif along_target:
                direction = v_target.to(x.dtype)
            else:
                direction = path_velocity

            requests = []
            if cfg.derivative == "finite_difference":
                t_low, t_high = central_difference_times(t, cfg.epsilon, 0.0, 1.0)
                for t_end in (t_high, t_low):
                    if along_target:
                        x_end = x_t + expand_time(t_end - t, x_t) * direction
                    else:
                        x_end = self.path.sample(x, z, t_end)
                    requests.append(ModelInput(x_end, t_end, cond=cond))
            if guided and not separate_guidance:
                requests.append(ModelInput(x_t, t, cond=conditioner.null_like(cond)))
            outputs = forward_many(target_model, requests, batched=cfg.batch_target_passes)
            if guided and not separate_guidance:
                v_target = self.guide(v_target, out.v.detach(), outputs[-1].v, kept, t)

            if cfg.derivative == "finite_difference":
                du_dt = difference_quotient(outputs[0].u, outputs[1].u, t_high, t_low)
            else:

                def flow_map(x_in, t_in):
                    return at_least_fp32(target_model(x_in, t_in, cond=cond).u)

                _, du_dt = time_derivative_jvp(flow_map, x_t, t, direction)
            du_dt = self.clamp(du_dt)
            # v_target is final only here: guidance may come after the batched passes
            u_target = flow_map_target(v_target if map_velocity is None else map_velocity, t, du_dt)

        loss_v = squared_error(out.v, v_target)
        loss_u = squared_error(out.u, u_target)
        loss = (
            cfg.beta * adaptive_weighting(loss_v, cfg.adaptive_p, cfg.adaptive_c)
            + (1.0 - cfg.beta) * adaptive_weighting(loss_u, cfg.adaptive_p, cfg.adaptive_c)
        ).mean()
        return ObjectiveOutput(
            loss=loss,
            parts={"loss_v": loss_v.mean().detach(), "loss_u": loss_u.mean().detach()},
            targets={"t": t, "x_t": x_t, "v": v_target, "u": u_target, "du_dt": du_dt},
        )

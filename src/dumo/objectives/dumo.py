"""DuMo: one backbone, a velocity head v and a flow-map head u, trained together (paper Alg. 1).

    x_t    = t z + (1 - t) x
    v_tgt  = (z - x) + zeta * (sg(v_theta) - v_minus(x_t, t, null))     rows with a real label
    u_tgt  = v_tgt - t * du_minus/dt                                     total derivative along the path
    loss   = beta * |v_theta - sg(v_tgt)|^2 + (1 - beta) * |u_theta - sg(u_tgt)|^2

From t u(x_t, t) = x_t - x_0 with x_0 fixed along the trajectory: u + t du/dt = dx_t/dt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from dumo.data.batch import Batch
from dumo.objectives.base import (
    FewStepConfig,
    ModelInput,
    Objective,
    ObjectiveOutput,
    adaptive_weighting,
    at_least_fp32,
    central_difference_times,
    derivative_precision,
    difference_quotient,
    forward_many,
    guidance_weight,
    squared_error,
    time_derivative_jvp,
)
from dumo.paths import expand_time
from dumo.schema import require


@dataclass
class DuMoConfig(FewStepConfig):
    name: Literal["dumo"] = "dumo"
    beta: float = 0.7  # weight of the velocity loss; 1 - beta on the flow-map loss

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        require(0.0 <= self.beta <= 1.0, f"{prefix}.beta must be in [0, 1]; got {self.beta}")


class DuMoObjective(Objective):
    heads = ("v", "u")
    time_inputs = 1
    config: DuMoConfig

    def __call__(self, model: nn.Module, batch: Batch, target_model: nn.Module | None = None) -> ObjectiveOutput:
        cfg = self.config
        target_model = model if target_model is None else target_model
        x = batch.x
        z = torch.randn_like(x)
        t = self.time_sampler.sample(x.shape[0], x.device)
        labels, kept = self.drop_labels(batch.labels)
        x_t = self.path.sample(x, z, t)
        path_velocity = self.path.velocity(x, z, t)

        # The one pass with gradients: both heads from one backbone evaluation.
        out = model(x_t, t, labels=labels)

        with torch.no_grad():
            guided = cfg.zeta > 0 and labels is not None
            # The no-grad passes are independent of each other: u at t +- e and the
            # unconditional v at t can run as one batched call.
            requests = []
            if cfg.derivative == "finite_difference":
                t_low, t_high = central_difference_times(t, cfg.epsilon, 0.0, 1.0)
                requests.append(ModelInput(self.path.sample(x, z, t_high), t_high, labels=labels))
                requests.append(ModelInput(self.path.sample(x, z, t_low), t_low, labels=labels))
            if guided:
                requests.append(ModelInput(x_t, t, labels=self.null_labels(labels)))
            with derivative_precision(cfg, x):
                outputs = forward_many(target_model, requests, batched=cfg.batch_target_passes)

            v_target = at_least_fp32(path_velocity)
            if guided:
                weight = expand_time(guidance_weight(kept, t, cfg.guidance_t_min, cfg.guidance_t_max), x)
                v_target = v_target + cfg.zeta * weight * (at_least_fp32(out.v.detach()) - at_least_fp32(outputs[-1].v))

            if cfg.derivative == "finite_difference":
                du_dt = difference_quotient(outputs[0].u, outputs[1].u, t_high, t_low)
            else:
                # Exact derivative along the same path direction the difference uses (z - x).
                def flow_map(x_in, t_in):
                    return at_least_fp32(target_model(x_in, t_in, labels=labels).u)

                _, du_dt = time_derivative_jvp(flow_map, x_t, t, path_velocity)
            if cfg.dudt_clamp is not None:
                du_dt = du_dt.clamp(-cfg.dudt_clamp, cfg.dudt_clamp)
            u_target = v_target - expand_time(t, du_dt) * du_dt

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

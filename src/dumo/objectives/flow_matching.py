"""Flow Matching: regress the velocity head on the conditional velocity z - x."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from dumo.data.batch import Batch
from dumo.models.heads import VELOCITY_HEAD
from dumo.objectives.base import Objective, ObjectiveConfig, ObjectiveOutput, squared_error
from dumo.objectives.terms import HeadInit, HeadTerm, TargetContext


@dataclass
class FlowMatchingConfig(ObjectiveConfig):
    name: Literal["fm"] = "fm"


class FlowMatchingObjective(Objective):
    heads = ("v",)
    time_inputs = 1
    default_sampler = "euler"
    sampling_methods = ("euler", "heun")  # a velocity only: no flow map to jump with

    @classmethod
    def head_terms(cls) -> tuple[type[HeadTerm], ...]:
        return (VelocityTerm,)

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
        cond, _ = self.drop_condition(batch.cond, self.conditioner(model, batch.cond))  # trains the null for guidance
        x_t = self.path.sample(x, z, t)
        v_target = self.path.velocity(x, z, t)
        loss_v = squared_error(model(x_t, t, cond=cond).v, v_target)
        return ObjectiveOutput(
            loss=loss_v.mean(),
            parts={"loss_v": loss_v.mean().detach()},
            targets={"t": t, "x_t": x_t, "v": v_target},
        )


class VelocityTerm(HeadTerm):
    """The velocity head of a multi-head model (kind ``velocity``): the (guided) velocity target."""

    kind, sampler, is_velocity = "velocity", "euler", True
    methods = FlowMatchingObjective.sampling_methods
    init = HeadInit(VELOCITY_HEAD)  # a velocity head under another name starts as the teacher's v

    def target(self, context: TargetContext, derivative: Tensor | None) -> Tensor:
        return context.v_target

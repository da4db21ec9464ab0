"""Flow Matching: regress the velocity head on the conditional velocity z - x."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from dumo.data.batch import Batch
from dumo.objectives.base import Objective, ObjectiveConfig, ObjectiveOutput, squared_error


@dataclass
class FlowMatchingConfig(ObjectiveConfig):
    name: Literal["fm"] = "fm"


class FlowMatchingObjective(Objective):
    heads = ("v",)
    time_inputs = 1
    default_sampler = "euler"
    sampling_methods = ("euler", "heun")  # a velocity only: no flow map to jump with

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

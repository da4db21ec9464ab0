"""Objectives declare their heads: how each starts from a teacher (train.init_from reads the
declaration) and the term that trains a head of their kind in a multi-head model (found through the
one objectives registry)."""

from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from conftest import small_model

from dumo.errors import CheckpointError, ConfigError
from dumo.objectives import (
    OBJECTIVES,
    MultiHeadConfig,
    MultiHeadObjective,
    Objective,
    ObjectiveConfig,
    ObjectiveOutput,
    build_objective,
    head_kinds,
)
from dumo.objectives.base import squared_error
from dumo.objectives.terms import HeadInit, HeadTerm, TargetContext
from dumo.schema import build
from dumo.training.initialise import fit_weights


@dataclass
class TwoVelocitiesConfig(ObjectiveConfig):
    name: Literal["two_velocities"] = "two_velocities"


class HalfVelocityTerm(HeadTerm):
    """A head of kind ``half_velocity`` in a multi-head model: half the velocity target."""

    kind, sampler = "half_velocity", "euler"
    init = HeadInit("v")

    def target(self, context: TargetContext, derivative: torch.Tensor | None) -> torch.Tensor:
        return 0.5 * context.v_target


class TwoVelocitiesObjective(Objective):
    """Flow Matching on v, and on a second head ``w`` that starts as the teacher's velocity."""

    heads = ("v", "w")
    default_sampler = "euler"

    @classmethod
    def head_terms(cls) -> tuple[type[HeadTerm], ...]:
        return (HalfVelocityTerm,)

    def head_inits(self) -> dict[str, HeadInit]:
        return {"w": HeadInit("v")}

    def __call__(self, model, batch, target_model=None, teacher_model=None):
        x, z = batch.x, torch.randn_like(batch.x)
        t = self.time_sampler.sample(x.shape[0], x.device)
        out = model(self.path.sample(x, z, t), t)
        loss = (squared_error(out.v, z - x) + squared_error(out.w, z - x)).mean()
        return ObjectiveOutput(loss=loss, parts={"loss": loss.detach()})


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(OBJECTIVES, "two_velocities", (TwoVelocitiesConfig, TwoVelocitiesObjective))


def test_a_new_objectives_head_starts_as_it_declares(registered):
    teacher = small_model(heads=("v",))
    student = small_model(heads=("v", "w"))
    declared = build_objective(TwoVelocitiesConfig()).head_inits()
    weights = fit_weights(teacher.state_dict(), student, head_inits=declared)
    student.load_state_dict(weights.state)
    x, t = torch.randn(16, 2), torch.rand(16)
    assert torch.equal(student(x, t).w, teacher(x, t).v) and torch.count_nonzero(teacher(x, t).v) > 0
    assert "w-head copied from the v-head" in weights.summary()
    # without a declaration the head must be in the teacher
    with pytest.raises(CheckpointError, match="has no tensor heads.w."):
        fit_weights(teacher.state_dict(), small_model(heads=("v", "w")), head_inits={})


def test_every_head_of_a_three_head_model_starts_from_a_flow_matching_teacher():
    teacher = small_model(heads=("v",))
    heads = {"v": {"kind": "velocity"}, "u": {"kind": "dumo_flow_map"}, "m": {"kind": "meanflow"}}
    objective = MultiHeadObjective(build(MultiHeadConfig, {"heads": heads}, "objective"))
    student = small_model(heads=("v", "u", "m"), time_inputs=2)
    weights = fit_weights(teacher.state_dict(), student, head_inits=objective.head_inits())
    student.load_state_dict(weights.state)
    x, t = torch.randn(16, 2), torch.rand(16)
    expected = teacher(x, t).v
    out = student(x, t, r=t * torch.rand(16))
    for head in ("v", "u", "m"):
        assert torch.allclose(out.outputs[head], expected, atol=1e-6), head
    zero = fit_weights(teacher.state_dict(), student, "zero", head_inits=objective.head_inits())
    assert "u-head left at its zero initialisation" in zero.summary()  # u follows model.u_head_init
    assert "m-head copied from the v-head" in zero.summary()  # MeanFlow's head is always copied


def test_multihead_head_kinds_are_the_registered_objectives_terms(monkeypatch):
    heads = {"v": {"kind": "velocity"}, "h": {"kind": "half_velocity"}}
    with pytest.raises(ConfigError, match="must be one of velocity, dumo_flow_map, meanflow, shortcut; got"):
        build(MultiHeadConfig, {"heads": heads}, "objective")
    monkeypatch.setitem(OBJECTIVES, "two_velocities", (TwoVelocitiesConfig, TwoVelocitiesObjective))
    assert head_kinds()["half_velocity"] is HalfVelocityTerm
    objective = MultiHeadObjective(build(MultiHeadConfig, {"heads": heads}, "objective"))
    model = small_model(heads=("v", "h"))
    x, z, t = torch.randn(32, 2), torch.randn(32, 2), torch.rand(32)
    out = objective.loss(model, x, z, t, t)
    torch.testing.assert_close(out.targets["h"], 0.5 * out.targets["v"])
    assert objective.head_samplers() == {"v": "euler", "h": "euler"}

"""Training objectives, one per module, behind :class:`~dumo.objectives.base.Objective`."""

from __future__ import annotations

from dumo.objectives.base import Objective, ObjectiveConfig, ObjectiveOutput, TimeConfig
from dumo.objectives.dumo import DuMoConfig, DuMoObjective
from dumo.objectives.flow_matching import FlowMatchingConfig, FlowMatchingObjective
from dumo.objectives.meanflow import MeanFlowConfig, MeanFlowObjective

#: objective name -> (config dataclass, objective class)
OBJECTIVES: dict[str, tuple[type[ObjectiveConfig], type[Objective]]] = {
    "dumo": (DuMoConfig, DuMoObjective),
    "meanflow": (MeanFlowConfig, MeanFlowObjective),
    "fm": (FlowMatchingConfig, FlowMatchingObjective),
}


def objective_class(name: str) -> type[Objective]:
    return OBJECTIVES[name][1]


def build_objective(config: ObjectiveConfig, num_classes: int = 0) -> Objective:
    """The objective named by ``config.name``, with the null class at index ``num_classes``."""
    return objective_class(config.name)(config, num_classes=num_classes)


__all__ = [
    "OBJECTIVES",
    "DuMoConfig",
    "DuMoObjective",
    "FlowMatchingConfig",
    "FlowMatchingObjective",
    "MeanFlowConfig",
    "MeanFlowObjective",
    "Objective",
    "ObjectiveConfig",
    "ObjectiveOutput",
    "TimeConfig",
    "build_objective",
    "objective_class",
]

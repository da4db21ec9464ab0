"""Training objectives, one per module, behind :class:`~dumo.objectives.base.Objective`.

:data:`OBJECTIVES` is the one place an objective is registered: config parsing, the trainer,
sampling and the CLI find its config class, network and sampler through it, and multi-head models
their head kinds (each objective's ``head_terms``).
"""

from __future__ import annotations

from dumo.objectives.base import Objective, ObjectiveConfig, ObjectiveOutput, TimeConfig
from dumo.objectives.dumo import DuMoConfig, DuMoObjective
from dumo.objectives.flow_matching import FlowMatchingConfig, FlowMatchingObjective
from dumo.objectives.meanflow import MeanFlowConfig, MeanFlowObjective
from dumo.objectives.multihead import MultiHeadConfig, MultiHeadObjective, head_kinds
from dumo.objectives.shortcut import ShortcutConfig, ShortcutObjective

#: objective name (``objective.name``) -> (config dataclass, objective class). The head kinds of
#: multi-head models are the ``head_terms`` these objectives declare (:func:`head_kinds`), in this order.
OBJECTIVES: dict[str, tuple[type[ObjectiveConfig], type[Objective]]] = {
    "fm": (FlowMatchingConfig, FlowMatchingObjective),
    "dumo": (DuMoConfig, DuMoObjective),
    "meanflow": (MeanFlowConfig, MeanFlowObjective),
    "multihead": (MultiHeadConfig, MultiHeadObjective),
    "shortcut": (ShortcutConfig, ShortcutObjective),
}
#: the objective of a config that names none
DEFAULT_OBJECTIVE = "dumo"


def objective_class(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose from {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name][1]


def objective_config_class(name: str) -> type[ObjectiveConfig]:
    objective_class(name)  # the same one-line error for an unknown name
    return OBJECTIVES[name][0]


def build_objective(config: ObjectiveConfig, num_classes: int = 0) -> Objective:
    """The objective named by ``config.name``, with the null class at index ``num_classes``."""
    return objective_class(config.name)(config, num_classes=num_classes)


__all__ = [
    "DEFAULT_OBJECTIVE",
    "OBJECTIVES",
    "DuMoConfig",
    "DuMoObjective",
    "FlowMatchingConfig",
    "FlowMatchingObjective",
    "MeanFlowConfig",
    "MeanFlowObjective",
    "MultiHeadConfig",
    "MultiHeadObjective",
    "Objective",
    "ObjectiveConfig",
    "ObjectiveOutput",
    "TimeConfig",
    "build_objective",
    "head_kinds",
    "objective_class",
    "objective_config_class",
]

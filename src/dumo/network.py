"""The network of a config: the backbone of ``model`` with the heads and time inputs its objective declares.

The one place a run's network is assembled, so that training, loading a run, importing weights,
``dumo info`` and the throughput estimate all build the same module (and read the same
checkpoints).
"""

from __future__ import annotations

from collections.abc import Sequence

from dumo.config import Config
from dumo.models import FlowModel, build_model
from dumo.objectives import objective_class


def build_network(config: Config, shape: Sequence[int], num_classes: int = 0) -> FlowModel:
    """A freshly initialised network for ``config`` on data of ``shape`` with ``num_classes`` classes
    (0: unconditional), with the heads and time inputs of ``config.objective``."""
    objective = objective_class(config.objective.name)
    return build_model(config.model, shape, objective.heads, num_classes, objective.time_inputs)


__all__ = ["build_network"]

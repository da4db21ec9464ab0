"""The network of a config: the backbone of ``model`` with the heads and time inputs its objective declares.

The one place a run's network is assembled, so that training, loading a run, importing weights,
``dumo info`` and the throughput estimate all build the same module (and read the same
checkpoints).
"""

from __future__ import annotations

from collections.abc import Sequence

from dumo.config import Config
from dumo.models import FlowModel, build_model
from dumo.objectives import build_objective


def build_network(config: Config, shape: Sequence[int], num_classes: int = 0) -> FlowModel:
    """A freshly initialised network for ``config`` on data of ``shape`` with ``num_classes`` classes
    (0: unconditional), with the heads and time inputs of ``config.objective``."""
    objective = build_objective(config.objective, num_classes)  # a multi-head config names its heads
    network = build_model(config.model, shape, objective.heads, num_classes, objective.time_inputs)
    # Which sampler reads each head (sampling picks a head by name: sample.head, dumo sample --head).
    network.head_samplers = objective.head_samplers()
    # The samplers each head may be drawn with (others are refused by name, not met by an AttributeError).
    network.head_methods = objective.head_methods()
    return network


__all__ = ["build_network"]

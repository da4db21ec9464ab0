"""The network of a config: the backbone of ``model`` with the heads and time inputs its objective declares.

The one place a run's network is assembled, so that training, loading a run, importing weights,
``dumo info`` and the throughput estimate all build the same module (and read the same
checkpoints).
"""

from __future__ import annotations

from collections.abc import Sequence

from dumo.conditioning.text import SmallTextEncoder
from dumo.config import Config
from dumo.data import TextSpec
from dumo.errors import ConfigError
from dumo.models import FlowModel, build_model, model_entry
from dumo.objectives import build_objective


def build_network(
    config: Config, shape: Sequence[int], num_classes: int = 0, text: TextSpec | None = None
) -> FlowModel:
    """A freshly initialised network for ``config`` on data of ``shape`` with ``num_classes`` classes
    (0: unconditional) or prompts encoded as ``text`` says (a TextDiT; with the small encoder
    inside it), with the heads and time inputs of ``config.objective``."""
    objective = build_objective(config.objective, num_classes)  # a multi-head config names its heads
    text_inputs = {}
    if model_entry(config.model.name).family == "text_dit":
        if text is None:
            raise ConfigError(f"model.name={config.model.name} reads prompts: the data has none")
        text_inputs = text_network_inputs(config, text)
    network = build_model(config.model, shape, objective.heads, num_classes, objective.time_inputs, **text_inputs)
    # Which sampler reads each head (sampling picks a head by name: sample.head, dumo sample --head).
    network.head_samplers = objective.head_samplers()
    # The samplers each head may be drawn with (others are refused by name, not met by an AttributeError).
    network.head_methods = objective.head_methods()
    return network


def text_network_inputs(config: Config, text: TextSpec) -> dict:
    """The text_dim, pooled_dim and (small encoder) text_encoder that ``build_model`` gives a TextDiT."""
    if text.encoder != "small":
        return {"text_dim": text.text_dim, "pooled_dim": text.pooled_dim}
    small = config.text
    encoder = SmallTextEncoder(text.vocab_size, small.width, small.depth, small.heads, max_length=text.max_tokens)
    return {"text_dim": small.width, "text_encoder": encoder}


__all__ = ["build_network"]

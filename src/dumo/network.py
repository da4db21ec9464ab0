"""The network of a config: the backbone of ``model`` with the heads and time inputs its objective declares.

The one place a run's network is assembled, so that training, loading a run, importing weights,
``dumo info`` and the throughput estimate all build the same module (and read the same
checkpoints).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dumo.conditioning.text import SmallTextEncoder
from dumo.config import Config
from dumo.data import CaptionDataset, Dataset, Prompts, TextSpec
from dumo.errors import ConfigError
from dumo.models import FlowModel, build_model, model_entry
from dumo.objectives import build_objective

#: captions encoded at once when a bridged run fills its prompt cache
PROMPT_BATCH = 64


def build_network(
    config: Config, shape: Sequence[int], num_classes: int = 0, text: TextSpec | None = None
) -> FlowModel:
    """A freshly initialised network for ``config`` on data of ``shape`` with ``num_classes`` classes
    (0: unconditional) or prompts encoded as ``text`` says (a TextDiT; with the small encoder
    inside it), with the heads and time inputs of ``config.objective``."""
    objective = build_objective(config.objective, num_classes)  # a multi-head config names its heads
    text_inputs = {}
    if is_diffusers(config):
        network = diffusers_network(config, objective, text)
    elif model_entry(config.model.name).family == "text_dit":
        if text is None:
            raise ConfigError(f"model.name={config.model.name} reads prompts: the data has none")
        text_inputs = text_network_inputs(config, text)
    if not is_diffusers(config):
        network = build_model(config.model, shape, objective.heads, num_classes, objective.time_inputs, **text_inputs)
    # Which sampler reads each head (sampling picks a head by name: sample.head, dumo sample --head).
    network.head_samplers = objective.head_samplers()
    # The samplers each head may be drawn with (others are refused by name, not met by an AttributeError).
    network.head_methods = objective.head_methods()
    return network


def is_diffusers(config: Config) -> bool:
    """Whether the network is a diffusers pipeline's transformer with DuMo's two heads (dumo.bridge)."""
    return model_entry(config.model.name).family == "diffusers"


def diffusers_network(config: Config, objective, text: TextSpec | None) -> nn.Module:
    """The two-headed transformer of ``model.pretrained``; the objective may use its v- and u-heads
    with one time input."""
    from dumo.bridge.build import build_dual_head

    extra = [head for head in objective.heads if head not in ("v", "u")]
    if extra or objective.time_inputs != 1:
        raise ConfigError(
            f"objective.name={config.objective.name} needs heads {list(objective.heads)} with {objective.time_inputs} "
            "time inputs; a diffusers transformer has a v- and a u-head reading t alone (use dumo or fm)"
        )
    return build_dual_head(config.model, text, config.text)


def network_dataset(config: Config, dataset: Dataset, prompts: Prompts | None, device: torch.device) -> Dataset:
    """The data as the network reads it. A diffusers network reads its pipeline's latents and prompt
    embeddings: captioned images are encoded once by the pipeline's VAE (in memory), and every
    caption's embeddings are cached before training, so the text encoders are freed."""
    if not is_diffusers(config):
        return dataset
    from dumo.bridge.build import autoencoder_record
    from dumo.data.pipeline_latents import CaptionLatents, encode_caption_latents

    if isinstance(dataset, CaptionDataset) and not isinstance(dataset, CaptionLatents):
        dataset = encode_caption_latents(dataset, autoencoder_record(config.model.pretrained), device)
    if prompts is not None and prompts.spec.encoder == "pipeline":
        cache = prompts.cache()
        cache.encoder.to(device)
        unique = list(dict.fromkeys(getattr(dataset, "captions", [])))
        for start in range(0, len(unique), PROMPT_BATCH):
            cache.embed(unique[start : start + PROMPT_BATCH])
        cache.encoder.release()
    return dataset


def text_network_inputs(config: Config, text: TextSpec) -> dict:
    """The text_dim, pooled_dim and (small encoder) text_encoder that ``build_model`` gives a TextDiT."""
    if text.encoder != "small":
        return {"text_dim": text.text_dim, "pooled_dim": text.pooled_dim}
    small = config.text
    encoder = SmallTextEncoder(text.vocab_size, small.width, small.depth, small.heads, max_length=text.max_tokens)
    return {"text_dim": small.width, "text_encoder": encoder}


__all__ = ["build_network", "is_diffusers", "network_dataset"]

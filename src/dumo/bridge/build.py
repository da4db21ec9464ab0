"""A run's two-headed diffusers network, from its config: the pipeline folder's transformer, the
null prompt as the pipeline encodes it, LoRA or full fine-tuning, and what its checkpoints keep.

The frozen weights are never written to a checkpoint: they are read from the pipeline folder at
every start, and the folder's fingerprint (:func:`pipeline_fingerprint`), recorded with every
checkpoint, makes a changed folder fail in one line instead of silently resuming on other weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch._guards import detect_fake_mode

from dumo.bridge.dual_head import DualHeadTransformer
from dumo.bridge.families import family_of
from dumo.bridge.folder import load_transformer, read_pipeline_folder
from dumo.conditioning import TextCondition
from dumo.conditioning.pipeline_text import NULL_PROMPT, folder_fingerprint
from dumo.data.prompts import Prompts, TextConfig, TextSpec
from dumo.errors import CheckpointError, ConfigError
from dumo.models import ModelConfig

#: the components of a pipeline folder whose weights a bridged run depends on beside its checkpoint
FINGERPRINTED = ("transformer", "vae")
#: the classes of diffusers autoencoders, as dumo.data.latents names their kinds
AUTOENCODER_KINDS = {"AutoencoderKL": "sd-vae", "AutoencoderDC": "dc-ae"}


def pipeline_fingerprint(path: str | Path) -> str:
    """The fingerprint of a pipeline folder's transformer and VAE (configs, weight headers and
    sampled weight bytes): another base model gives another fingerprint, a moved folder keeps it."""
    folder = read_pipeline_folder(path)
    return folder_fingerprint([folder.path / name for name in FINGERPRINTED])


def pretrained_record(path: str | Path) -> dict[str, str]:
    """What a checkpoint records of its pipeline folder: where it was and its fingerprint."""
    return {"path": str(Path(path).expanduser().resolve()), "fingerprint": pipeline_fingerprint(path)}


def build_dual_head(model: ModelConfig, text: TextSpec | None, text_config: TextConfig) -> DualHeadTransformer:
    """The two-headed transformer of ``model.pretrained`` with its null prompt (the pipeline's
    encoding of the empty prompt, cached), LoRA (``model.lora``) or every weight trainable, and
    gradient checkpointing if asked; ``saved_keys`` names what its checkpoints hold."""
    if text is None or text.encoder != "pipeline":
        raise ConfigError(
            "model.name=diffusers reads prompts encoded by its pipeline (captioned data, text.encoder=pipeline)"
        )
    if detect_fake_mode() is not None:  # counting FLOPs on fake tensors: the architecture, no weights
        transformer, family = skeleton_transformer(model.pretrained)
        null = TextCondition(
            torch.zeros(1, text.max_tokens, text.text_dim),
            torch.ones(1, text.max_tokens, dtype=torch.bool),
            None if text.pooled_dim is None else torch.zeros(1, text.pooled_dim),
        )
    else:
        transformer, family = load_transformer(model.pretrained)
        null = Prompts(text, text_config).condition([NULL_PROMPT])
    network = DualHeadTransformer(transformer, family)
    network.set_null_prompt(null.tokens, null.mask, null.pooled)
    if model.lora is not None:
        from dumo.bridge.lora import apply_lora

        apply_lora(network, model.lora.rank, model.lora.alpha, model.lora.targets)
    else:
        network.requires_grad_(True)
    network.saved_keys = saved_keys(network)
    if detect_fake_mode() is None:
        network.pretrained_record = pretrained_record(model.pretrained)
    return network


def skeleton_transformer(path: str | Path):
    """The pipeline's transformer built from its config alone (no weights read), and its family."""
    import diffusers

    folder = read_pipeline_folder(path)
    family = family_of(folder.transformer_class)
    transformer_class = getattr(diffusers, family.transformer_class)
    return transformer_class.from_config(transformer_class.load_config(folder.path / "transformer")), family


def saved_keys(network: DualHeadTransformer) -> tuple[str, ...]:
    """The state-dict keys a checkpoint keeps: the trainable weights (adapters and u-head, or every
    weight in full fine-tuning) and the null prompt; the frozen rest comes from the pipeline folder."""
    trainable = [name for name, parameter in network.named_parameters() if parameter.requires_grad]
    null = [name for name, _ in network.named_buffers() if name.startswith("null_")]
    return (*trainable, *null)


def check_pretrained(network, recorded: dict | None, source: str) -> None:
    """Refuse (one line) weights trained on another pipeline folder than the one ``network`` was read from."""
    current = getattr(network, "pretrained_record", None)
    if current is None or recorded is None:
        return
    if recorded.get("fingerprint") != current["fingerprint"]:
        raise CheckpointError(
            f"{current['path']} is not the pipeline {source} was trained on ({recorded.get('path')}): its transformer "
            "or VAE changed; put the original folder back (model.pretrained)"
        )


def autoencoder_record(path: str | Path) -> dict:
    """The pipeline's VAE as dumo.data.latents reads it: kind, folder and the factors its pipeline
    scales latents with (SANA's DC-AE: a scale; SD3's and FLUX's VAE: a scale and a shift)."""
    import json

    folder = read_pipeline_folder(path)
    library, name = folder.components["vae"]
    if name not in AUTOENCODER_KINDS:
        raise CheckpointError(f"{folder.path} has a {name} VAE; dumo encodes with {', '.join(AUTOENCODER_KINDS)}")
    config = json.loads((folder.path / "vae" / "config.json").read_text())
    return {
        "kind": AUTOENCODER_KINDS[name],
        "path": str((folder.path / "vae").resolve()),
        "scaling_factor": float(config.get("scaling_factor") or 1.0),
        "shift_factor": float(config.get("shift_factor") or 0.0),
    }


__all__ = ["autoencoder_record", "build_dual_head", "check_pretrained", "pipeline_fingerprint", "saved_keys"]

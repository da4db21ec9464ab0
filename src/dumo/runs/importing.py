"""Official DiT and SiT weights written as a dumo folder that samples on its own.

Reading and converting the official checkpoints is :mod:`dumo.models.pretrained`'s; here the
converted weights get a config, a network and a folder. The written folder samples with nothing
but itself, like one of ``dumo export``: the weights record the config, the data's shape and
classes and, for latents, the autoencoder (SD-VAE, the official scale 0.18215, its local folder).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dumo.config import Config, save_config
from dumo.data import SampleSpace
from dumo.errors import CheckpointError, ConfigError, RunDirError
from dumo.files import MODEL_FORMAT, save_checkpoint
from dumo.models.pretrained import (
    PREDICTIONS,
    ImportedModel,
    OfficialKind,
    check_training_args,
    convert_official,
    read_official_checkpoint_and_args,
)
from dumo.network import build_network
from dumo.objectives import OBJECTIVES
from dumo.runs.checkpoints import load_weights
from dumo.runs.layout import CONFIG_FILE, EXPORTED_WEIGHTS

# Both official codes train and sample in SD-VAE latents times this factor (their sample.py decodes
# samples / 0.18215) with no shift; their --vae picks stabilityai/sd-vae-ft-ema or -mse (train.py: ema).
OFFICIAL_AUTOENCODER_KIND = "sd-vae"
OFFICIAL_LATENT_SCALE = 0.18215


@dataclass(frozen=True)
class ImportedRun(ImportedModel):
    """An imported official checkpoint: the converted model and what its folder records for sampling."""

    space: SampleSpace | None = None  # what the written folder records for sampling (set by the import)


def autoencoder_folder(config: Config, autoencoder: str | None) -> str | None:
    """The local folder of the SD-VAE that decodes an imported latent model's samples (``--autoencoder``,
    else ``data.autoencoder_path``); None for data that is not decoded. Refused when a latent model has none."""
    if config.data.name != "latents":
        return None  # images need no decoder; random_latents are timing data with none
    folder = autoencoder or config.data.autoencoder_path
    if not folder:
        raise ConfigError(
            "an imported latent model decodes its samples with the SD-VAE the official code used: give its "
            "local diffusers folder with --autoencoder DIR (stabilityai/sd-vae-ft-ema or -mse, downloaded)"
        )
    return str(Path(folder).expanduser().absolute())  # sampling may run from another folder


def sample_space_of(
    config: Config,
    shape: tuple[int, ...],
    classes: int,
    autoencoder: str | None,
    source: str,
    args: Mapping[str, object] | None = None,
) -> SampleSpace:
    """What sampling needs to know about the imported model's data, recorded in its weights so that it
    samples with no data present: shape and classes and, for latents, the official autoencoder (its
    name, from the checkpoint's --vae where recorded, and the local folder that decodes)."""
    data = config.data
    if data.name not in ("latents", "random_latents"):
        return SampleSpace("images", data.name, tuple(shape), classes, summary=f"imported from {source}")
    recorded = None
    folder = autoencoder_folder(config, autoencoder)
    if folder is not None:
        recorded = {
            "kind": OFFICIAL_AUTOENCODER_KIND,
            "name": f"stabilityai/sd-vae-ft-{(args or {}).get('vae', 'ema')}",  # ema and mse share the encoder
            "path": folder,
            "scaling_factor": OFFICIAL_LATENT_SCALE,
            "shift_factor": 0.0,
        }
    summary = f"imported from {source}"
    return SampleSpace("latents", data.name, tuple(shape), classes, autoencoder=recorded, summary=summary)


def import_official_weights(
    kind: OfficialKind,
    checkpoint: str | Path,
    config: Config,
    out_dir: str | Path,
    num_heads: int | None = None,
    autoencoder: str | None = None,
) -> ImportedRun:
    """Write an official DiT/SiT checkpoint as a dumo export folder (config.yaml + model.safetensors).

    ``config`` supplies everything but the model: its ``model`` section is replaced by what the
    checkpoint needs. It must be a Flow Matching config (one v-head) whose data matches the
    checkpoint's shape and classes. The folder is one of ``dumo export``: the weights record the
    config and what sampling needs (shape, classes and, for latents, the SD-VAE at ``autoencoder``
    or ``data.autoencoder_path`` with the official scale 0.18215), so ``dumo sample`` and
    ``dumo eval`` take it with no data present.
    """
    # The imported network is a velocity field of (x, t): only an objective that trains exactly that fits.
    velocity_only = [name for name, (_, cls) in OBJECTIVES.items() if cls.heads == ("v",) and cls.time_inputs == 1]
    if config.objective.name not in velocity_only:
        raise ConfigError(
            "the imported weights make a Flow Matching model (v-head only): the config needs objective.name "
            f"{' or '.join(velocity_only)}, not {config.objective.name}"
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise RunDirError(f"{out_dir} exists and is not empty; choose another output directory")
    shape = config.data.expected_shape()
    classes = config.data.expected_classes() if config.data.conditional else 0
    if shape is None or classes is None:
        raise ConfigError(
            "the data's shape or classes are known only from its files: set data.resolution (image folders) "
            "or data.latent_shape and data.num_classes (latents)"
        )
    autoencoder_folder(config, autoencoder)  # refuse before reading a checkpoint of gigabytes
    state, args = read_official_checkpoint_and_args(checkpoint)
    check_training_args(kind, args, str(checkpoint))
    source = f"{kind}:{Path(checkpoint).name}"
    data_classes = classes if config.data.conditional else (config.data.expected_classes() or 0)
    space = sample_space_of(config, shape, data_classes, autoencoder, source, args)
    imported = convert_official(
        kind,
        state,
        num_heads=num_heads,
        conditional=config.data.conditional,
        source=str(checkpoint),
    )
    if tuple(shape) != imported.data_shape:
        found = "x".join(map(str, imported.data_shape))
        raise CheckpointError(
            f"{checkpoint} is a network for {found} data; the config's data has shape {'x'.join(map(str, shape))}"
        )
    if classes != imported.num_classes:
        raise CheckpointError(
            f"{checkpoint} is a network for {imported.num_classes} classes; the config's data has {classes}"
        )
    config = dataclasses.replace(config, model=imported.config)
    model = build_network(config, shape, classes)
    load_weights(model, imported.state, str(checkpoint))  # the converted dict must fit dumo's model exactly
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / CONFIG_FILE)
    metadata = {
        "step": "0",
        "imported_from": source,
        "prediction": PREDICTIONS[kind],
        "config": json.dumps(config.to_dict()),
        "data": space.to_json(),
    }
    save_checkpoint(out_dir / EXPORTED_WEIGHTS, model.state_dict(), metadata, kind=MODEL_FORMAT)
    return ImportedRun(
        **{field.name: getattr(imported, field.name) for field in dataclasses.fields(imported)}, space=space
    )

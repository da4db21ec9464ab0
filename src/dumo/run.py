"""Reading a finished (or running) run directory back: config, EMA weights, data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dumo.config import Config, load_config, save_config
from dumo.data import Dataset, build_dataset, conditioning_classes
from dumo.errors import RunDirError
from dumo.models import build_model
from dumo.objectives import objective_class
from dumo.training.checkpoint import (
    MODEL_FORMAT,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    unprefixed,
)
from dumo.training.trainer import CONFIG_FILE

EXPORTED_WEIGHTS = "model.safetensors"


@dataclass
class LoadedRun:
    config: Config
    model: nn.Module
    dataset: Dataset
    num_classes: int
    step: int
    checkpoint: Path

    @property
    def objective_name(self) -> str:
        return self.config.objective.name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_run(
    run_dir: str | Path, checkpoint: str | Path | None = None, weights: str = "ema", device: str = "cpu"
) -> LoadedRun:
    """The model of a run directory (EMA or raw weights of its latest checkpoint) or of an
    exported model directory (its EMA weights)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory not found: {run_dir}")
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunDirError(f"{run_dir} is not a dumo run directory (no {CONFIG_FILE})")
    config = load_config(run_dir / CONFIG_FILE)
    if checkpoint is None and (run_dir / EXPORTED_WEIGHTS).is_file():
        checkpoint = run_dir / EXPORTED_WEIGHTS
        tensors, metadata = load_checkpoint(checkpoint, kind=MODEL_FORMAT)
        weights = ""
    else:
        if checkpoint is None:
            found = list_checkpoints(run_dir)
            if not found:
                raise RunDirError(f"{run_dir} has no checkpoints yet; train it first")
            checkpoint = found[-1]
        tensors, metadata = load_checkpoint(Path(checkpoint))
        weights = f"{weights}."
    dataset = build_dataset(config.data)
    classes = conditioning_classes(dataset, config.data)
    objective = objective_class(config.objective.name)
    model = build_model(config.model, dataset.shape, objective.heads, classes, objective.time_inputs)
    load_weights(model, unprefixed(tensors, weights), str(checkpoint))
    model.to(torch.device(device)).eval().requires_grad_(False)
    return LoadedRun(config, model, dataset, classes, int(metadata["step"]), Path(checkpoint))


def export_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the EMA weights of a run's latest checkpoint and its config to ``out_dir``.

    The result is all ``dumo sample`` / ``dumo eval`` need: no optimiser state, no RNG state.
    """
    run = load_run(run_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise RunDirError(f"{out_dir} exists and is not empty; choose another output directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(run.config, out_dir / CONFIG_FILE)
    path = out_dir / EXPORTED_WEIGHTS
    save_checkpoint(path, run.model.state_dict(), {"step": str(run.step)}, kind=MODEL_FORMAT)
    return path

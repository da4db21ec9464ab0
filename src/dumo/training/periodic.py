"""What a run does every so many steps besides training: score the EMA weights, draw a picture of
their samples, write EMA snapshots; and the caveats that go with the scores."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from dumo.data import LatentDataset
from dumo.errors import DiskFullError, DumoError, MetricsError
from dumo.evaluation import evaluate
from dumo.files import atomic_output
from dumo.runs.layout import sample_picture_path, snapshot_path
from dumo.sampling import is_guided, sampling_cost
from dumo.training.logs import small_data_note
from dumo.training.parallel import full_model_state
from dumo.training.snapshots import save_snapshot, snapshot_metadata
from dumo.version import __version__

if TYPE_CHECKING:
    from dumo.training.loop import Trainer


def evaluate_and_log(trainer: Trainer) -> dict[str, float]:
    """Score the EMA weights (pixel and 2-D data), log the scores and save a picture of samples
    (latent runs: decoded through the autoencoder; random latents have none, so no picture)."""
    metrics = {}
    latent = isinstance(trainer.dataset, LatentDataset)
    if latent and trainer.space.autoencoder is None:
        return metrics
    model = sampling_model(trainer)  # collective under FSDP: every rank takes the same branch
    if trainer.dist.is_main:
        if not latent:
            try:
                metrics = evaluate_ema(trainer, model)
            except MetricsError as error:  # samples a metric refuses (NaN) must not end a long run
                print(f"dumo: warning: step {trainer.step}: no scores: {error}", file=sys.stderr, flush=True)
        if metrics:
            trainer.logs.write("eval", trainer.step, metrics)
        save_picture_logged(trainer, model if model is not None else trainer.ema.model)
    trainer.dist.barrier()
    return metrics


def sampling_model(trainer: Trainer) -> nn.Module | None:
    """The EMA weights as a plain module on rank 0, None on the other ranks.

    Under FSDP the EMA copy is sharded, so every rank must call this (gathering is collective).
    """
    if not trainer.sharded:
        return trainer.ema.model if trainer.dist.is_main else None
    state = full_model_state(trainer.ema.model)
    if not trainer.dist.is_main:
        return None
    model = trainer.build_plain_model()
    model.load_state_dict(state)
    return model.to(trainer.device).eval().requires_grad_(False)


def evaluate_ema(trainer: Trainer, model: nn.Module | None = None) -> dict[str, float]:
    """Sample quality of the EMA weights (2-D data: MMD and sliced Wasserstein; images: domain FD).

    Latent runs are not scored in the loop: that needs the decoder and an image metric.
    """
    if isinstance(trainer.dataset, LatentDataset):
        return {}
    return evaluate(
        model if model is not None else trainer.ema.model,
        trainer.config.objective.name,
        trainer.dataset,
        trainer.config.sample,
        num=trainer.config.train.eval_samples,
        num_classes=trainer.num_classes,
        device=trainer.device,
        prompts=trainer.prompts,
    )


def save_picture_logged(trainer: Trainer, model: nn.Module) -> Path | None:
    """:func:`save_picture`, also to TensorBoard; a missing decoder is reported once, not fatal
    (a two-week run should not stop at its first evaluation because a VAE folder moved)."""
    if trainer.picture_error is not None:
        return None
    try:
        path = save_picture(trainer, model)
    except DumoError as error:
        if isinstance(error, DiskFullError):  # the next checkpoint would not fit either: stop now
            raise
        trainer.picture_error = str(error)
        print(f"dumo: warning: no sample pictures for this run: {error}", file=sys.stderr, flush=True)
        return None
    trainer.logs.add_picture(path, trainer.step)
    return path


def save_picture(trainer: Trainer, model: nn.Module) -> Path:
    """RUN/samples/step_XXXXXXXX.png: 1-NFE samples of the EMA weights (a grid of images with their
    classes, decoded by the autoencoder for latent runs, or 2-D points over the data density), to
    watch a run by eye."""
    from dumo.plotting import image_grid, scatter_over_density
    from dumo.sampling import balanced_labels, generate

    num = 40 if trainer.space.is_images else 1000
    labels = balanced_labels(num, trainer.num_classes, trainer.device)
    names = None if labels is None else [trainer.space.class_name(int(c)) for c in labels]
    if trainer.prompts is not None:
        texts = picture_prompts(trainer, num)
        labels = trainer.prompts.condition(texts).to(trainer.device)
        names = [textwrap.fill(text, 18) for text in texts]
    x = generate(
        model,
        trainer.config.objective.name,
        (num, *trainer.dataset.shape),
        1,
        trainer.config.sample,
        0,
        labels,
        device=trainer.device,
    )
    data = _to_data(trainer, x)
    path = sample_picture_path(trainer.run_dir, trainer.step)
    cost = sampling_cost(
        model, trainer.config.objective.name, 1, trainer.config.sample, conditional=trainer.conditional
    )
    title = f"{trainer.config.objective.name}, step {trainer.step}, {cost} (EMA)"
    path.parent.mkdir(exist_ok=True)
    with atomic_output(path) as tmp:
        if trainer.space.is_images:
            image_grid(data.numpy(), names, tmp, title=title, columns=10)
        else:
            reference, _ = trainer.dataset.sample(20_000, torch.Generator().manual_seed(0))
            scatter_over_density([(title, data.numpy())], reference.numpy(), tmp)
    return path


def picture_prompts(trainer: Trainer, num: int) -> list[str]:
    """The prompts of a run's sample picture: evenly spread over the shapes world's evaluation prompts
    (seen, then held-out), or the first captions of the data."""
    from dumo.data import ShapesWorld
    from dumo.data.shapes import evaluation_prompts

    if isinstance(trainer.dataset, ShapesWorld):
        chosen = evaluation_prompts(trainer.dataset.held_out)
        pool = chosen.seen + chosen.held_out
    else:
        pool = list(dict.fromkeys(trainer.dataset.captions))
    return [pool[(i * len(pool)) // num % len(pool)] for i in range(num)]


def _to_data(trainer: Trainer, x: Tensor, chunk: int = 8) -> Tensor:
    """Samples in model space as data on the CPU; latents are decoded on the training device, a few
    at a time, and the autoencoder goes back to the CPU afterwards (training keeps the memory)."""
    if trainer.space.kind != "latents":
        return trainer.space.unstandardise(x.cpu())
    autoencoder = trainer.space.codec().autoencoder
    autoencoder.to(trainer.device)
    try:
        return torch.cat([trainer.space.unstandardise(part) for part in x.split(chunk)])
    finally:
        autoencoder.to("cpu")


def save_ema_snapshot(trainer: Trainer) -> Path | None:
    """RUN/snapshots/ema_step_XXXXXXXX.safetensors: the EMA weights in fp16, kept whatever checkpoint
    rotation deletes (see dumo.training.snapshots). Every rank calls it (FSDP gathers); rank 0 writes."""
    state = full_model_state(trainer.ema.model)
    path = None
    if trainer.dist.is_main:
        metadata = snapshot_metadata(
            trainer.step, json.dumps(trainer.config.to_dict()), trainer.space.to_json(), __version__
        )
        path = save_snapshot(snapshot_path(trainer.run_dir, trainer.step), state, metadata)
    trainer.dist.barrier()
    return path


def metrics_note(trainer: Trainer) -> str | None:
    """Caveats about the metrics for the person reading them: too little data, guided samples."""
    notes = [small_data_note(trainer.dataset)]
    if is_guided(trainer.config.sample, trainer.conditional):
        notes.append(
            f"the scores are of samples drawn with guidance scale {trainer.config.sample.guidance_scale}: "
            "each NFE above is 2 network passes"
        )
    return "; ".join(note for note in notes if note) or None

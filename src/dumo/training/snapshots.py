"""EMA snapshots at chosen steps of a run, kept apart from the rotating checkpoints, and their scores.

``train.snapshot_steps: [50000, 100000, ...]`` and/or ``train.snapshot_every: N`` make the trainer
write ``RUN/snapshots/ema_step_XXXXXXXX.safetensors``: the EMA weights in fp16 (half the size of
an export), in the export's format (``dumo-model``, with the config and the data record), written
atomically and never deleted by checkpoint rotation. ``dumo eval-snapshots RUN`` scores each one,
for a curve of FID (or the domain metrics) against training steps; ``dumo sample RUN --checkpoint
RUN/snapshots/ema_step_...`` and ``dumo.load(RUN, checkpoint=...)`` sample one.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from dumo.files import MODEL_FORMAT, atomic_write, save_checkpoint
from dumo.runs.layout import SCORES_FILE, SNAPSHOT_DIR, list_snapshots


def snapshot_due(step: int, steps: Sequence[int], every: int) -> bool:
    """Whether the trainer writes a snapshot after ``step`` (train.snapshot_steps / snapshot_every)."""
    return step in steps or (every > 0 and step % every == 0)


def half_precision(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Floating-point tensors as fp16 (integer buffers unchanged); loading casts them back into the
    model's own dtype."""
    return {k: v.detach().half() if v.is_floating_point() else v.detach() for k, v in state.items()}


def save_snapshot(path: Path, ema_state: dict[str, Tensor], metadata: dict[str, str]) -> Path:
    """Write ``ema_state`` as fp16 to ``path`` (atomically; see :func:`save_checkpoint`)."""
    save_checkpoint(path, half_precision(ema_state), {**metadata, "precision": "fp16"}, kind=MODEL_FORMAT)
    return path


# -- scoring -------------------------------------------------------------------------------------


def score_snapshots(
    run_dir: str | Path,
    nfes: Sequence[int] = (1,),
    num: int = 2000,
    seed: int = 0,
    batch_size: int = 256,
    device: str = "cpu",
    inception: str | Path | None = None,
    reference: str | Path | None = None,
    report=print,
) -> list[dict[str, float]]:
    """Score every snapshot of ``run_dir`` at each NFE with the same samples' seed; write the rows
    (step, nfe and the metrics) to ``RUN/snapshots/scores.csv`` and return them.

    The metrics are those of ``dumo eval``: MMD and sliced W2 for 2-D data, domain FD (and class
    fidelity) for images, and FID/IS with Inception weights (``inception``; ``reference``
    statistics from ``dumo fid-stats``, or by default ``num`` of the run's own training images).
    Latent runs need ``inception`` and ``reference``. One process; the scorer is built once.
    """
    from dumo.data import ToyDataset
    from dumo.errors import MetricsError, RunDirError
    from dumo.evaluation import image_scorer, reference_images, toy_scorer
    from dumo.runs.loading import load_run
    from dumo.samplers import network_passes
    from dumo.sampling import balanced_labels, drawing_sampler, generate_many, is_guided

    if num < 2:  # every score here needs two samples: a covariance (FD, FID) or MMD's pairs
        raise MetricsError(f"scoring needs at least 2 samples per snapshot; got {num}")
    run_dir = Path(run_dir).expanduser()
    snapshots = list_snapshots(run_dir)
    if not snapshots:
        raise RunDirError(
            f"{run_dir} has no EMA snapshots ({SNAPSHOT_DIR}/ema_step_*.safetensors): train it with "
            "train.snapshot_steps or train.snapshot_every"
        )
    first = load_run(run_dir, snapshots[0][1], device=device)
    latent = first.space.kind == "latents"  # known from the weights: a latent file can be tens of GB
    if latent and (inception is None or reference is None):
        raise MetricsError("a latent-space run is scored with Inception metrics: give --inception and --ref")
    score = None
    if not latent:
        dataset = first.dataset
        score = toy_scorer(dataset, num) if isinstance(dataset, ToyDataset) else image_scorer(dataset, num)
    if latent:  # decode on the sampling device
        first.space.codec().autoencoder.to(first.device)
    network = statistics = None
    if inception is not None:
        from dumo.metrics.inception import InceptionNetwork, Statistics

        network = InceptionNetwork(inception, first.device)
        if reference is not None:
            statistics = Statistics.load(reference)
        else:
            statistics = Statistics.of(network(reference_images(first.dataset, num))[0])
    rows: list[dict[str, float]] = []
    for step, path in snapshots:
        run = first if path == snapshots[0][1] else load_run(run_dir, path, device=device)
        labels = balanced_labels(num, run.num_classes)
        for nfe in nfes:
            points = generate_many(
                run.model,
                run.objective_name,
                (num, *run.space.shape),
                nfe,
                run.config.sample,
                seed,
                None if labels is None else labels.to(run.device),
                device=run.device,
                batch_size=batch_size,
            ).cpu()
            row: dict[str, float] = {"step": step, "nfe": nfe}
            if is_guided(run.config.sample, labels is not None):  # each NFE was two network passes
                method = drawing_sampler(run.model, run.objective_name, run.config.sample)
                row["passes"] = network_passes(nfe, method, guided=True)
            if score is not None:
                row.update(score(points, labels))
            if network is not None:
                from dumo.metrics.inception import score_images

                images = (first.space if latent else run.space).unstandardise(points)
                row.update(score_images(network, images, statistics))
            rows.append(row)
            report("  ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    write_scores(run_dir / SNAPSHOT_DIR / SCORES_FILE, rows)
    return rows


def write_scores(path: Path, rows: list[dict[str, float]]) -> None:
    """The rows as one CSV table (columns: the union of the rows' keys, in order), written atomically."""
    fields = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buffer.getvalue().encode())


def snapshot_metadata(step: int, config_json: str, data_json: str, version: str) -> dict[str, str]:
    """What a snapshot records: the export's keys (step, config, data), plus which weights they are."""
    return {"step": str(step), "config": config_json, "data": data_json, "dumo_version": version, "weights": "ema"}

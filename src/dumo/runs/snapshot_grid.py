"""A picture of a run's progress: fixed prompts (rows) drawn at a few NFE from its EMA snapshots along
training (columns), as the paper's Fig. 5 and 6 show the trajectories of one model at two training steps.

Every column draws the same noise for a row (one seed for the whole grid, the prompts in the same
order), so what changes along a row is only the weights and the NFE.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from dumo.errors import RunDirError, SamplingError
from dumo.runs.layout import SNAPSHOT_DIR, list_snapshots


@dataclass
class SnapshotGrid:
    """``images[row][column]`` (C, H, W) in [0, 1]: prompt ``prompts[row]`` at ``columns[column]``
    ((step, nfe))."""

    prompts: list[str]
    columns: list[tuple[int, int]]
    images: Tensor  # (rows, columns, C, H, W)


def chosen_snapshots(run_dir: Path, steps: Sequence[int] | None) -> list[tuple[int, Path]]:
    """The run's snapshots in step order, or those of ``steps`` (an unknown step is refused, naming the
    ones there are)."""
    snapshots = list_snapshots(run_dir)
    if not snapshots:
        raise RunDirError(
            f"{run_dir} has no EMA snapshots ({SNAPSHOT_DIR}/ema_step_*.safetensors): train it with "
            "train.snapshot_steps or train.snapshot_every"
        )
    if steps is None:
        return snapshots
    known = dict(snapshots)
    missing = [step for step in steps if step not in known]
    if missing:
        raise RunDirError(f"{run_dir} has no snapshot of step {missing[0]} (it has {', '.join(map(str, known))})")
    return [(step, known[step]) for step in dict.fromkeys(steps)]


def draw_snapshot_grid(
    run_dir: str | Path,
    prompts: Sequence[str],
    nfes: Sequence[int] = (1, 2),
    steps: Sequence[int] | None = None,
    seed: int = 0,
    guidance: float | None = None,
    device: str = "cpu",
    report=print,
) -> SnapshotGrid:
    """Draw ``prompts`` from each chosen EMA snapshot of ``run_dir`` at each NFE in ``nfes``, the same
    noise in every column; images decoded (latent runs: by the recorded autoencoder)."""
    from dumo.runs.loading import load_run
    from dumo.sampling import generate

    run_dir = Path(run_dir).expanduser()
    if not prompts:
        raise SamplingError("no prompts given")
    if not nfes or min(nfes) < 1:
        raise SamplingError(f"--nfe must be >= 1; got {list(nfes)}")
    columns, images = [], []
    for step, path in chosen_snapshots(run_dir, steps):
        run = load_run(run_dir, path, device=device)
        if not run.is_text:
            raise SamplingError(f"{path.name} is not conditioned on text: a grid of prompts needs a text-to-image run")
        run.choose_sampling(guidance=guidance, guidance_option="--guidance")
        condition = run.prompt_condition(list(prompts))
        if run.space.kind == "latents":  # decode on the sampling device
            run.space.codec().autoencoder.to(run.device)
        for nfe in nfes:
            points = generate(
                run.model,
                run.objective_name,
                (len(prompts), *run.space.shape),
                nfe,
                run.config.sample,
                seed,
                condition,
                device=run.device,
            )
            images.append(run.space.unstandardise(points).float().cpu())
            columns.append((step, nfe))
            report(f"step {step}, {nfe} NFE: drawn")
    return SnapshotGrid(list(prompts), columns, torch.stack(images, dim=1))


def save_snapshot_grid(grid: SnapshotGrid, path: Path, title: str | None = None) -> None:
    """The grid as one PNG (written atomically): a row per prompt, titled columns."""
    from dumo.files import atomic_output
    from dumo.plotting import image_grid

    rows, count = grid.images.shape[:2]
    flat = grid.images.reshape(rows * count, *grid.images.shape[2:]).numpy()
    column_titles = [f"step {step}\n{nfe} NFE" for step, nfe in grid.columns]
    row_titles = [textwrap.fill(prompt, 24) for prompt in grid.prompts]
    with atomic_output(path) as tmp:
        image_grid(flat, None, tmp, title=title, columns=count, column_titles=column_titles, row_titles=row_titles)


__all__ = ["SnapshotGrid", "draw_snapshot_grid", "save_snapshot_grid"]

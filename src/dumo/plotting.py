"""Pictures: samples over the true density (2-D)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _density(reference: np.ndarray, extra: np.ndarray | None = None):
    """The plotting extent (the data's, widened to hold ``extra`` points) and a 2-D histogram over it."""
    low, high = np.percentile(reference, 0.5, axis=0), np.percentile(reference, 99.5, axis=0)
    margin = 0.25 * (high - low)
    low, high = low - margin, high + margin
    if extra is not None and len(extra):
        low, high = np.minimum(low, extra.min(axis=0)), np.maximum(high, extra.max(axis=0))
    extent = (low[0], high[0], low[1], high[1])
    density, _, _ = np.histogram2d(
        reference[:, 0], reference[:, 1], bins=120, range=[extent[:2], extent[2:]], density=True
    )
    return extent, density


def _panel(ax, label: str, extent, density: np.ndarray) -> None:
    ax.imshow(density.T, origin="lower", extent=extent, cmap="Greys", aspect="auto", vmax=density.max() * 0.8)
    ax.set_xlim(extent[:2])
    ax.set_ylim(extent[2:])
    ax.set_title(label, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(figure, path: str | Path, title: str | None) -> None:
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def scatter_over_density(
    panels: Sequence[tuple[str, np.ndarray]],
    reference: np.ndarray,
    path: str | Path,
    columns: int | None = None,
    title: str | None = None,
    max_points: int = 2000,
) -> None:
    """One panel per (title, points): the data density in grey, the samples as red dots."""
    columns = columns or min(len(panels), 4)
    rows = math.ceil(len(panels) / columns)
    extent, density = _density(reference)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (label, points) in zip(axes.flat, panels):
        _panel(ax, label, extent, density)
        shown = points[:max_points]
        ax.scatter(shown[:, 0], shown[:, 1], s=2, c="tab:red", alpha=0.6, linewidths=0)
    _save(figure, path, title)


def paths_over_density(
    panels: Sequence[tuple[str, np.ndarray]],
    reference: np.ndarray,
    path: str | Path,
    columns: int | None = None,
    title: str | None = None,
) -> None:
    """One panel per (title, states): each sample's path through a sampler over the data density.

    ``states`` has shape (S, N, 2): S states (the noise first, the sample last) of N samples. Each
    sample is a blue line through its states, with a grey dot at the noise, small dots at the
    intermediate states and a red dot at the sample.
    """
    columns = columns or min(len(panels), 4)
    rows = math.ceil(len(panels) / columns)
    extent, density = _density(reference, np.concatenate([states.reshape(-1, 2) for _, states in panels]))
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (label, states) in zip(axes.flat, panels):
        _panel(ax, label, extent, density)
        for i in range(states.shape[1]):
            ax.plot(states[:, i, 0], states[:, i, 1], color="tab:blue", linewidth=0.7, alpha=0.6)
        middle = states[1:-1].reshape(-1, 2)
        ax.scatter(middle[:, 0], middle[:, 1], s=3, c="tab:blue", alpha=0.7, linewidths=0)
        ax.scatter(states[0, :, 0], states[0, :, 1], s=5, c="dimgrey", alpha=0.8, linewidths=0, label="noise")
        ax.scatter(states[-1, :, 0], states[-1, :, 1], s=7, c="tab:red", alpha=0.9, linewidths=0, label="sample")
    axes.flat[0].legend(loc="lower left", fontsize=7, markerscale=2, framealpha=0.7)
    _save(figure, path, title)


def image_grid(
    images: np.ndarray,
    labels: Sequence | np.ndarray | None,
    path: str | Path,
    title: str | None = None,
    columns: int = 10,
    column_titles: Sequence[str] | None = None,
    row_titles: Sequence[str] | None = None,
) -> None:
    """Images (N, C, H, W) in [0, 1] on a grid, each captioned with its class (an index or a name)
    when labels are given; ``column_titles`` and ``row_titles`` label the first row and column."""
    count = len(images)
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.1 * columns, 1.2 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:count]):
        image = np.transpose(images[i], (1, 2, 0))
        if image.shape[2] == 1:
            ax.imshow(image[:, :, 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(np.clip(image, 0, 1), interpolation="nearest")
        if labels is not None:
            ax.set_title(str(labels[i]), fontsize=7, pad=2)
        elif column_titles is not None and i < columns:
            ax.set_title(column_titles[i], fontsize=7, pad=2)
        if row_titles is not None and i % columns == 0:
            ax.text(-0.1, 0.5, row_titles[i // columns], transform=ax.transAxes, ha="right", va="center", fontsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

"""Pictures: samples over the true density (2-D)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def scatter_over_density(
    panels: Sequence[tuple[str, np.ndarray]],
    reference: np.ndarray,
    path: str | Path,
    columns: int | None = None,
    title: str | None = None,
    max_points: int = 2000,
    paths: bool = False,
) -> None:
    """One panel per (title, points): the data density in grey, the samples as red dots.

    ``paths``: the panels are the same noise at growing NFE, one row of panels per head; each point
    gets a thin line from where it landed in the previous panel of its row.
    """
    columns = columns or min(len(panels), 4)
    rows = math.ceil(len(panels) / columns)
    low, high = np.percentile(reference, 0.5, axis=0), np.percentile(reference, 99.5, axis=0)
    margin = 0.25 * (high - low)
    extent = (low[0] - margin[0], high[0] + margin[0], low[1] - margin[1], high[1] + margin[1])
    density, _, _ = np.histogram2d(
        reference[:, 0], reference[:, 1], bins=120, range=[extent[:2], extent[2:]], density=True
    )
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for index, (ax, (label, points)) in enumerate(zip(axes.flat, panels)):
        ax.imshow(density.T, origin="lower", extent=extent, cmap="Greys", aspect="auto", vmax=density.max() * 0.8)
        shown = points[:max_points]
        if paths and index % columns:
            before = panels[index - 1][1][:max_points]
            for a, b in zip(before, shown):
                ax.plot([a[0], b[0]], [a[1], b[1]], color="tab:blue", linewidth=0.6, alpha=0.5)
        ax.scatter(shown[:, 0], shown[:, 1], s=2, c="tab:red", alpha=0.6, linewidths=0)
        ax.set_xlim(extent[:2])
        ax.set_ylim(extent[2:])
        ax.set_title(label, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


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

"""What a run tells the person watching it: the CSV logs, TensorBoard events and progress lines."""

from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from dumo.data import LatentDataset
from dumo.errors import ConfigError
from dumo.files import atomic_write
from dumo.runs.layout import EVAL_LOG, TENSORBOARD_DIR, TRAIN_LOG

#: the CSV log of each group of logged values, in the run folder
LOG_FILES = {"train": TRAIN_LOG, "eval": EVAL_LOG}


class RunLogs:
    """The logs rank 0 writes while a run trains: train_log.csv, eval_log.csv and, with
    train.tensorboard, the same values (and sample pictures) as TensorBoard events."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.tensorboard = None  # the SummaryWriter of a run with train.tensorboard (rank 0, while it runs)

    def open(self, step: int, resumed: bool, tensorboard: bool) -> None:
        """Drop the rows logged after ``step`` (a resumed run redoes those steps) and start TensorBoard."""
        for name in LOG_FILES.values():
            truncate_log(self.run_dir / name, step)
        if tensorboard:
            # a resumed run drops the events logged after its checkpoint, as the CSV logs do
            self.tensorboard = summary_writer_class()(
                str(self.run_dir / TENSORBOARD_DIR), purge_step=step if resumed else None
            )

    def write(self, group: str, step: int, values: dict[str, float | None]) -> None:
        """A row of ``group`` ("train" or "eval") at ``step``: to its CSV log, and to TensorBoard."""
        append_row(self.run_dir / LOG_FILES[group], {"step": step, **values})
        self.add_scalars(group, values, step)

    def add_scalars(self, group: str, row: dict[str, float | None], step: int) -> None:
        """Write a logged row to TensorBoard as ``group/name`` scalars at ``step`` (an empty
        value, such as the MFU of a device without a peak figure, is left out)."""
        if self.tensorboard is None:
            return
        for name, value in row.items():
            if name != "step" and value is not None:
                self.tensorboard.add_scalar(f"{group}/{name}", float(value), step)
        self.tensorboard.flush()

    def add_picture(self, path: Path, step: int) -> None:
        """The picture of samples at ``path``, to TensorBoard."""
        if self.tensorboard is None:
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self.tensorboard.add_image("samples", pixels, step, dataformats="HWC")
        self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or a one-line ConfigError when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ConfigError(
            f"train.tensorboard is true but the tensorboard package is missing ({error}): pip install tensorboard "
            "(or set train.tensorboard=false)"
        ) from None
    return SummaryWriter


SMALL_DATA = 1000  # below this many training images the domain classifier mostly measures memorisation


def small_data_note(dataset) -> str | None:
    if isinstance(dataset, LatentDataset) or not hasattr(dataset, "images") or len(dataset) >= SMALL_DATA:
        return None
    return (
        f"the domain FD and class fidelity use a classifier fit on these same {len(dataset)} training images; "
        "on so few images they measure closeness to them (memorisation) as much as quality"
    )


class Progress:
    """Training progress for a person: a tqdm bar on a terminal, else one plain line per logged step.

    Logs, pipes and batch systems get readable lines instead of tqdm's carriage returns; the
    bar and the lines show the loss parts (under adaptive weighting the total sits near 1).
    """

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total = total
        self.enabled = enabled
        self.started = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=min(initial, total), desc="train", file=sys.stderr)

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(
        self, step: int, logged: dict[str, float], rate: float, throughput: dict[str, float | None] | None = None
    ) -> None:
        """Show a logged step; ``throughput`` adds images/s and, where known, the MFU."""
        parts = {k: v for k, v in logged.items() if k.startswith("loss")}
        throughput = throughput or {}
        images, mfu = throughput.get("images_per_sec"), throughput.get("mfu")
        if self.bar is not None:
            extra = {"rate": f"{rate:.0f}/s"}
            if images is not None:
                extra["img/s"] = f"{images:.0f}"
            if mfu is not None:
                extra["MFU"] = f"{100 * mfu:.0f}%"
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items()} | extra)
        elif self.enabled:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in parts.items())
            elapsed = time.perf_counter() - self.started
            speed = f"{rate:.1f} steps/s" + (f"  {images:.1f} img/s" if images is not None else "")
            speed += f"  MFU {100 * mfu:.1f}%" if mfu is not None else ""
            print(f"step {step}/{self.total}  {shown}  {speed}  {elapsed:.0f} s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def append_row(path: Path, row: dict[str, float]) -> None:
    """Append to a CSV log, writing the header when the file is new (or was left empty).

    A log begun by an older dumo keeps its own columns, so the file stays one table.
    """
    fields = list(row)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as handle:
            header = next(csv.reader(handle), None)
        if header:
            fields = header
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def truncate_log(path: Path, step: int) -> None:
    """Drop rows logged after ``step`` (they belong to steps a resumed run will redo), and a torn
    last row; the file is replaced atomically, so a kill here leaves the old log."""
    if not path.exists():
        return
    text = path.read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    fields = rows[0].keys() if rows else None
    if rows and not text.endswith("\n"):
        rows[-1] = {}  # cut off by a kill mid-append (the next row would be glued to it)

    def kept_step(row: dict) -> bool:
        try:
            return int(row["step"]) <= step and None not in row.values()
        except (KeyError, TypeError, ValueError):
            return False  # a row cut off by a kill mid-append

    kept = [row for row in rows if kept_step(row)]
    if not rows:
        if path.stat().st_size:
            path.unlink()  # a file with no table in it: the next row writes a header again
        return
    if len(kept) != len(rows):
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(kept)
        atomic_write(path, buffer.getvalue().encode())

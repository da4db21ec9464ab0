"""Every name in a run folder, and the paths built from them: the one place dumo spells them.

What ``dumo train --out`` writes in its folder (config, logs, checkpoints, sample pictures,
TensorBoard events, snapshots, its run record, history and lock), and the files of an export.
What the folder's bookkeeping does with these names lives in :mod:`dumo.runs.folder`.
"""

from __future__ import annotations

import re
from pathlib import Path

from dumo.errors import CheckpointError

CONFIG_FILE = "config.yaml"
TRAIN_LOG = "train_log.csv"
EVAL_LOG = "eval_log.csv"
TEACHER_FILE = "teacher.safetensors"  # the frozen initial weights, kept with the run so that it resumes alone
LOCK_FILE = ".dumo.lock"  # held (flock) by the process training the run, for the whole run
HISTORY_FILE = "history.txt"  # one line per start: time, dumo version, command line, starting step
SAMPLES_DIR = "samples"  # a picture of samples at every evaluation
TENSORBOARD_DIR = "tensorboard"  # train.tensorboard: the logged scalars and scores as TensorBoard events
LORA_DIR = "lora"  # a LoRA run on a diffusers model: its EMA adapter in diffusers' format, at the latest checkpoint
#: dumo's mark on a run folder: the names in it that dumo created. Only a folder with this record (or
#: a run written before it existed: see is_legacy_run) is resumed or cleared by --overwrite, and
#: --overwrite deletes only what the record lists.
RUN_RECORD = "dumo-run.json"
EXPORTED_WEIGHTS = "model.safetensors"  # an export's weights (``dumo export``, ``dumo import-weights``)

# -- checkpoints -----------------------------------------------------------------------------------

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_NAME = re.compile(r"^step_(\d{8,})\.safetensors$")
CORRUPT_SUFFIX = ".corrupt"  # a checkpoint that failed verification on resume is renamed aside with this
#: temporary files of :func:`atomic_write` for a checkpoint (``.step_XXXXXXXX.safetensors.<random>.tmp``)
TEMP_NAME = re.compile(r"^\.step_\d{8,}\.safetensors\.[^/]*\.tmp$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}.safetensors"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files of a torn write are ignored)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> int:
    """The step in a checkpoint's file name (``step_00000042.safetensors`` -> 42)."""
    match = CHECKPOINT_NAME.match(Path(path).name)
    if match is None:
        raise CheckpointError(f"{path} is not named like a checkpoint (step_XXXXXXXX.safetensors)")
    return int(match.group(1))


# -- snapshots -------------------------------------------------------------------------------------

SNAPSHOT_DIR = "snapshots"
SNAPSHOT_NAME = re.compile(r"^ema_step_(\d{8,})\.safetensors$")
SCORES_FILE = "scores.csv"  # RUN/snapshots/scores.csv: one row per (snapshot, NFE)


def snapshot_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"ema_step_{step:08d}.safetensors"


def list_snapshots(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every snapshot of a run, oldest first (temporary files are ignored)."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := SNAPSHOT_NAME.match(p.name))]
    return sorted(found)


# -- sample pictures -------------------------------------------------------------------------------


def sample_picture_path(run_dir: Path, step: int) -> Path:
    """RUN/samples/step_XXXXXXXX.png: the picture of samples drawn at the evaluation of ``step``."""
    return Path(run_dir) / SAMPLES_DIR / f"step_{step:08d}.png"


# -- what a run owns -------------------------------------------------------------------------------

#: every top-level name a training run may write in its folder (the lock aside, which is never removed)
RUN_NAMES = (
    CONFIG_FILE,
    HISTORY_FILE,
    TRAIN_LOG,
    EVAL_LOG,
    TEACHER_FILE,
    CHECKPOINT_DIR,
    SAMPLES_DIR,
    TENSORBOARD_DIR,
    SNAPSHOT_DIR,
    LORA_DIR,
)


def own_file_patterns() -> dict[str, re.Pattern[str]]:
    """For each folder a run writes, the names of the files dumo puts in it: its own names, and
    their temporary copies (``.NAME.<random>.tmp[.suffix]``) from an atomic write killed before its rename."""

    def own(name: str) -> re.Pattern[str]:
        return re.compile(rf"^(?:{name}|\.{name}\.[^/]+\.tmp(?:\.[a-z]+)?)$")

    return {
        CHECKPOINT_DIR: own(r"step_\d{8,}\.safetensors(?:\.corrupt)?"),
        SAMPLES_DIR: own(r"step_\d{8,}\.png"),
        TENSORBOARD_DIR: re.compile(r"^events\.out\.tfevents\.[^/]+$"),
        SNAPSHOT_DIR: own(r"(?:ema_step_\d{8,}\.safetensors|scores\.csv)"),
        LORA_DIR: own(r"(?:pytorch_lora_weights\.safetensors|u_head\.safetensors|step\.txt)"),
    }


OWN_FILES_IN = own_file_patterns()

"""The run folder's bookkeeping: its file names, what may be resumed in it, its lock, clearing it.

What ``dumo train --out`` owns in a folder and how it decides that a folder holds this run (or
nothing). Training itself lives in :mod:`dumo.training.trainer`; reading a run back in :mod:`dumo.run`.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

import torch

from dumo import __version__
from dumo.config import Config, config_differences, load_config
from dumo.errors import RunDirError

CONFIG_FILE = "config.yaml"
TRAIN_LOG = "train_log.csv"
EVAL_LOG = "eval_log.csv"
TEACHER_FILE = "teacher.safetensors"  # the frozen initial weights, kept with the run so that it resumes alone
LOCK_FILE = ".dumo.lock"  # held (flock) by the process training the run, for the whole run
HISTORY_FILE = "history.txt"  # one line per start: time, dumo version, command line, starting step
SAMPLES_DIR = "samples"  # a picture of samples at every evaluation
TENSORBOARD_DIR = "tensorboard"  # train.tensorboard: the logged scalars and scores as TensorBoard events

#: keys that may change between a run and its resumption (they do not change the maths).
#: train.grad_accumulation may change, with the number of ranks, as long as the global batch
#: (data.batch_size) stays: see check_global_batch. data.path may change when the data moved; it
#: must hold the same data (the fingerprint stored in the checkpoint is checked on resume).
RESUMABLE_KEYS = (
    "data.path",
    "train.grad_accumulation",
) + tuple(
    f"train.{k}"
    for k in (
        "steps",
        "log_every",
        "eval_every",
        "eval_samples",
        "checkpoint_every",
        "keep_checkpoints",
        "device",
        "progress",
        "tensorboard",
        "snapshot_steps",
        "snapshot_every",
        "max_nonfinite_steps",
        "max_skipped_fraction",
        "max_minutes",
        "compile",
        "parallel",
        "init_from",  # only read before step 0: a resumed run no longer needs it
    )
)


def check_global_batch(then: Config, now: Config, source: Path) -> None:
    """Refuse to resume with another global batch (data.batch_size) in one line.

    The number of ranks and train.grad_accumulation only split the global batch into shards, so
    they may change on resume; the batch itself is part of the maths (and of the data stream).
    """
    if then.data.batch_size != now.data.batch_size:
        raise RunDirError(
            f"{source} was trained with a global batch of data.batch_size={then.data.batch_size} but the config now "
            f"says {now.data.batch_size}: a run resumes only with the same global batch (other numbers of ranks or "
            "train.grad_accumulation are fine); restore data.batch_size or start afresh with --overwrite"
        )


def check_run_dir(config: Config, run_dir: Path, overwrite: bool = False) -> None:
    """Refuse ``run_dir`` if it holds something else than this run, before anything is written there.

    A folder with a config.yaml but no checkpoint holds nothing to resume (a start that failed
    before its first save); it is taken over, so that a corrected rerun is not refused.
    """
    from dumo.training.checkpoint import list_checkpoints

    config_file = run_dir / CONFIG_FILE
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} exists and is not a directory; choose another --out")
    if overwrite or not run_dir.exists():
        return
    if config_file.is_file():
        if not list_checkpoints(run_dir):
            return
        previous = load_config(config_file)
        differences = config_differences(previous, config, ignore=RESUMABLE_KEYS)
        if differences == ["data.batch_size"]:  # the same run on another number of ranks, say
            check_global_batch(previous, config, config_file)
        if differences:
            shown = ", ".join(differences[:4]) + (", ..." if len(differences) > 4 else "")
            raise RunDirError(
                f"{run_dir} holds a different run (config differs in {shown}): choose another --out, continue "
                "it with 'dumo train --resume --out' (its own config), or replace it with --overwrite (deletes "
                "its checkpoints and logs)"
            )
    elif any(not p.name.startswith(".") for p in run_dir.iterdir()):
        raise RunDirError(f"{run_dir} exists and is not an empty directory or a dumo run; choose another --out")


class RunLock:
    """An exclusive ``flock`` on ``run_dir/.dumo.lock``, held while a process trains the run.

    Two processes training one folder would interleave logs, delete each other's checkpoint
    writes or resume one config over another's checkpoints; the second one is refused instead.
    The kernel releases the lock when the process ends, however it ends.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunDirError(
                f"{self.run_dir} is in use: another dumo process is training it now; wait for it to end "
                "(or stop it) or choose another --out"
            ) from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def prepare_run_dir(config: Config, run_dir: Path, overwrite: bool = False) -> None:
    """Check that ``run_dir`` holds this same run (or nothing); with ``overwrite`` delete the files
    dumo wrote there first. Call it holding the run's lock."""
    check_run_dir(config, run_dir, overwrite)
    if overwrite:
        clear_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def remove_torn_writes(run_dir: Path) -> None:
    """Delete temporary files left by a checkpoint write that was killed before its rename
    (only dumo's own temporary names; call it holding the run's lock, or a live write is lost)."""
    from dumo.training.checkpoint import CHECKPOINT_DIR, TEMP_NAME

    folder = run_dir / CHECKPOINT_DIR
    if folder.is_dir():
        for path in folder.iterdir():
            if TEMP_NAME.match(path.name):
                path.unlink()


def clear_run(run_dir: Path) -> None:
    """Delete the files dumo wrote in ``run_dir`` (config, logs, checkpoints); leave anything else.

    Nothing outside the run folder is touched: a ``checkpoints`` that is a symbolic link (or
    resolves elsewhere) is refused rather than emptied, a link in place of a log is removed as a
    link, and in the checkpoints folder only dumo's checkpoint and temporary names are deleted.
    """
    from dumo.training.checkpoint import CHECKPOINT_DIR, CHECKPOINT_NAME, CORRUPT_SUFFIX, TEMP_NAME
    from dumo.training.snapshots import SNAPSHOT_DIR, list_snapshots

    run_dir = Path(run_dir)
    folder = run_dir / CHECKPOINT_DIR
    if folder.is_symlink() or (folder.exists() and folder.resolve().parent != run_dir.resolve()):
        raise RunDirError(
            f"--overwrite: {folder} is a link to {folder.resolve()}; dumo only deletes inside the run folder: "
            "remove the link yourself or choose another --out"
        )
    for name in (CONFIG_FILE, TRAIN_LOG, EVAL_LOG, TEACHER_FILE):
        (run_dir / name).unlink(missing_ok=True)  # a symbolic link is removed, not followed
    if folder.is_dir():
        for path in folder.iterdir():
            if CHECKPOINT_NAME.match(path.name) or TEMP_NAME.match(path.name) or path.name.endswith(CORRUPT_SUFFIX):
                path.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()
    if (run_dir / SNAPSHOT_DIR).is_dir() and not (run_dir / SNAPSHOT_DIR).is_symlink():
        for _, path in list_snapshots(run_dir):  # the old run's EMA snapshots would be scored as this one's
            path.unlink()


def record_start(run_dir: Path, step: int) -> None:
    """Append the command line, dumo's and torch's versions and the starting step to history.txt."""
    line = (
        f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}  dumo {__version__}  torch {torch.__version__}  "
        f"step {step}  {shlex.join(sys.argv)}\n"
    )
    with (run_dir / HISTORY_FILE).open("a") as handle:
        handle.write(line)

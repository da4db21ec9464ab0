"""The run folder's bookkeeping: what may be resumed in it, its record, its lock, clearing it.

What ``dumo train --out`` owns in a folder and how it decides that a folder holds this run (or
nothing). The names in the folder are :mod:`dumo.runs.layout`'s; training itself lives in
:mod:`dumo.training`; reading a run back in :mod:`dumo.runs.loading`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from dumo.config import Config, config_differences, load_config
from dumo.errors import RunDirError
from dumo.files import atomic_write
from dumo.runs.layout import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    CORRUPT_SUFFIX,
    EVAL_LOG,
    HISTORY_FILE,
    LOCK_FILE,
    LORA_DIR,
    OWN_FILES_IN,
    RUN_NAMES,
    RUN_RECORD,
    SAMPLES_DIR,
    SNAPSHOT_DIR,
    TEACHER_FILE,
    TEMP_NAME,
    TENSORBOARD_DIR,
    TRAIN_LOG,
    list_checkpoints,
)
from dumo.version import __version__

RECORD_FORMAT = "dumo-run"  # the format tag inside the run record (RUN_RECORD)
KEPT_ON_OVERWRITE = (HISTORY_FILE,)  # every start of the folder, the overwriting one included

#: keys that may change between a run and its resumption (they do not change the maths).
#: train.grad_accumulation may change, with the number of ranks, as long as the global batch
#: (data.batch_size) stays: see check_global_batch. data.path may change when the data moved; it
#: must hold the same data (the fingerprint stored in the checkpoint is checked on resume).
RESUMABLE_KEYS = (
    "data.path",
    "data.train_images",  # read by plans only
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
        "activation_checkpointing",
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

    Only a folder dumo marked as a run (its run record, or a run from before the record: see
    :func:`is_legacy_run`) is continued; any other non-empty folder needs ``overwrite``, and even
    then none of its files may carry a name the run writes. A marked run with no checkpoint (a
    start that failed before its first save) is taken over, unless it holds what a start at step 0
    would destroy: training logs or a checkpoint set aside as corrupt.
    """
    config_file = run_dir / CONFIG_FILE
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} exists and is not a directory; choose another --out")
    if not run_dir.exists():
        return
    if not is_dumo_run(run_dir):
        check_unmarked_folder(run_dir, overwrite)
        return
    if overwrite:
        return
    if not list_checkpoints(run_dir):
        check_nothing_to_lose(run_dir)
        return
    if config_file.is_file():
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


def check_unmarked_folder(run_dir: Path, overwrite: bool) -> None:
    """A folder dumo did not mark as a run: empty (hidden files aside), or with ``overwrite`` one
    where the run can write beside the user's files without replacing any of them."""
    visible = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))
    if not visible:
        return
    if not overwrite:
        shown = ", ".join(visible[:3]) + (", ..." if len(visible) > 3 else "")
        raise RunDirError(
            f"{run_dir} holds files dumo did not write (no {RUN_RECORD}: {shown}); choose another --out, or "
            "pass --overwrite to train beside them (dumo deletes none of them)"
        )
    taken = [name for name in sorted(RUN_NAMES) if (run_dir / name).exists() or (run_dir / name).is_symlink()]
    if taken:
        raise RunDirError(
            f"--overwrite: {run_dir} was not made by dumo (no {RUN_RECORD}) and holds {', '.join(taken)}, which "
            "the run would write over; move them away or choose another --out"
        )


def check_nothing_to_lose(run_dir: Path) -> None:
    """Refuse to start a marked run without checkpoints at step 0 over its logs or a corrupt checkpoint."""
    folder = run_dir / CHECKPOINT_DIR
    corrupt = sorted(p.name for p in folder.iterdir() if p.name.endswith(CORRUPT_SUFFIX)) if folder.is_dir() else []
    logs = [name for name in (TRAIN_LOG, EVAL_LOG) if log_has_rows(run_dir / name)]
    if corrupt or logs:
        held = [f"{CHECKPOINT_DIR}/{corrupt[0]}"] if corrupt else []
        raise RunDirError(
            f"{run_dir} has no readable checkpoint but holds {', '.join(held + logs)}: starting again at step 0 "
            "would replace them; pass --overwrite to start afresh, or choose another --out"
        )


def log_has_rows(path: Path) -> bool:
    """Whether a CSV log holds a row after its header."""
    if not path.is_file():
        return False
    with path.open() as handle:
        return sum(1 for line in handle if line.strip()) > 1


# -- the run record --------------------------------------------------------------------------------


def read_run_record(run_dir: Path) -> list[str] | None:
    """The names the run record of ``run_dir`` lists (only dumo's own names); None without a record."""
    path = run_dir / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        names = record["written"] if record.get("format") == RECORD_FORMAT else None
    except (ValueError, TypeError, AttributeError, KeyError, UnicodeDecodeError):
        names = None
    if not isinstance(names, list):
        raise RunDirError(f"{path} is not a dumo run record; remove it if it is yours, or choose another --out")
    return [name for name in RUN_NAMES if name in names]  # an edited record never names another file


def is_legacy_run(run_dir: Path) -> bool:
    """A run written before the run record: dumo's config.yaml with checkpoints, dumo's history.txt or
    a training log."""
    if (run_dir / RUN_RECORD).exists() or not (run_dir / CONFIG_FILE).is_file():
        return False
    return (
        bool(list_checkpoints(run_dir)) or written_by_dumo(run_dir / HISTORY_FILE) or log_has_rows(run_dir / TRAIN_LOG)
    )


def written_by_dumo(history: Path) -> bool:
    """Whether ``history`` starts like the history.txt of :func:`record_start`."""
    if not history.is_file():
        return False
    with history.open(errors="replace") as handle:
        first = handle.readline()
    return re.match(r"^\S+  dumo \S+  torch \S+  step \d+  ", first) is not None


def is_dumo_run(run_dir: Path) -> bool:
    """Whether dumo marked ``run_dir`` as a run (its record), or it is a run from before the record."""
    return read_run_record(run_dir) is not None or is_legacy_run(run_dir)


def owned_names(run_dir: Path) -> list[str]:
    """What dumo wrote in ``run_dir``: its record's names; for a run from before the record, dumo's
    names found there; nothing in a folder dumo did not mark."""
    recorded = read_run_record(run_dir)
    if recorded is not None:
        return recorded
    if is_legacy_run(run_dir):
        return [name for name in RUN_NAMES if (run_dir / name).exists() or (run_dir / name).is_symlink()]
    return []


def names_written_by(config: Config) -> list[str]:
    """The top-level names a run of ``config`` writes in its folder."""
    cfg = config.train
    wanted = {
        CONFIG_FILE: True,
        HISTORY_FILE: True,
        TRAIN_LOG: cfg.log_every > 0,
        EVAL_LOG: True,
        TEACHER_FILE: cfg.init_from is not None,
        CHECKPOINT_DIR: True,
        SAMPLES_DIR: True,
        TENSORBOARD_DIR: cfg.tensorboard,
        SNAPSHOT_DIR: bool(cfg.snapshot_steps) or cfg.snapshot_every > 0,
        LORA_DIR: config.model.lora is not None,
    }
    return [name for name in RUN_NAMES if wanted[name]]


def write_run_record(run_dir: Path, owned: list[str], config: Config) -> None:
    """Mark ``run_dir`` as a dumo run: the record lists ``owned`` and what this run will create there
    (its names that do not exist yet; one that exists and is not owned belongs to someone else)."""
    created = [name for name in names_written_by(config) if not (run_dir / name).exists()]
    names = [name for name in RUN_NAMES if name in owned or name in created]
    record = {
        "format": RECORD_FORMAT,
        "version": 1,
        "about": "written by 'dumo train': the names below are what dumo created in this folder; "
        "'dumo train --overwrite' removes dumo's files in them (history.txt is kept)",
        "written": names,
    }
    text = json.dumps(record, indent=2) + "\n"
    path = run_dir / RUN_RECORD
    if not (path.is_file() and path.read_text() == text):
        atomic_write(path, text.encode())


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


def prepare_run_dir(config: Config, run_dir: Path, overwrite: bool = False) -> list[str]:
    """Check that ``run_dir`` holds this same run (or nothing); with ``overwrite`` delete the files
    dumo wrote there first (the returned list says what). Then mark it as this run's folder. Call it
    holding the run's lock."""
    check_run_dir(config, run_dir, overwrite)
    owned = owned_names(run_dir) if run_dir.is_dir() else []
    removed = clear_run(run_dir) if overwrite else []
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_record(run_dir, owned, config)
    return removed


def remove_torn_writes(run_dir: Path) -> None:
    """Delete temporary files left by a checkpoint write that was killed before its rename
    (only dumo's own temporary names; call it holding the run's lock, or a live write is lost)."""
    folder = run_dir / CHECKPOINT_DIR
    if folder.is_dir():
        for path in folder.iterdir():
            if TEMP_NAME.match(path.name):
                path.unlink()


def clear_run(run_dir: Path) -> list[str]:
    """Delete what dumo wrote in ``run_dir``, as its run record lists it; leave anything else. Returns
    what was removed ("config.yaml", "samples/ (3 files)", ...).

    Only dumo's own names are deleted: the files the record names (history.txt aside: it keeps every
    start), and inside the folders it names only dumo's file names (checkpoints, their temporary and
    corrupt copies, sample pictures, TensorBoard events, snapshots and their scores); a folder left
    empty is removed. A folder without a record (not a run) loses nothing. Nothing outside the run
    folder is touched: a named folder that is a symbolic link (or resolves elsewhere) is refused
    before anything is deleted, and a link in place of a file is removed as a link.
    """
    run_dir = Path(run_dir)
    owned = [name for name in owned_names(run_dir) if name not in KEPT_ON_OVERWRITE]
    folders = [name for name in owned if name in OWN_FILES_IN]
    for name in folders:
        folder = run_dir / name
        if folder.is_symlink() or (folder.exists() and folder.resolve().parent != run_dir.resolve()):
            raise RunDirError(
                f"--overwrite: {folder} is a link to {folder.resolve()}; dumo only deletes inside the run folder: "
                "remove the link yourself or choose another --out"
            )
    removed = []
    for name in owned:
        path = run_dir / name
        if name in OWN_FILES_IN:
            if path.is_dir():
                count = clear_folder(path, OWN_FILES_IN[name])
                if count:
                    removed.append(f"{name}/ ({count} file{'s' * (count != 1)})")
        elif path.is_symlink() or path.is_file():
            path.unlink()  # a symbolic link is removed, not followed
            removed.append(name)
    return removed


def clear_folder(folder: Path, own_files: re.Pattern[str]) -> int:
    """Delete the files of ``folder`` named like ``own_files`` (no subfolder is entered); remove the
    folder if that empties it. Returns how many files were deleted."""
    count = 0
    for path in folder.iterdir():
        if own_files.match(path.name) and (path.is_symlink() or path.is_file()):
            path.unlink()
            count += 1
    if not any(folder.iterdir()):
        folder.rmdir()
    return count


def record_start(run_dir: Path, step: int) -> None:
    """Append the command line, dumo's and torch's versions and the starting step to history.txt."""
    line = (
        f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}  dumo {__version__}  torch {torch.__version__}  "
        f"step {step}  {shlex.join(sys.argv)}\n"
    )
    with (run_dir / HISTORY_FILE).open("a") as handle:
        handle.write(line)

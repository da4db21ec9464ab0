"""What the experiment scripts share: a run's step, its scores and samples, and the tables' numbers.

Imported as ``common`` by the scripts of this folder (``python experiments/X.py`` puts the folder
on the path). Each script keeps its own cache of scores; this module only computes them.
"""

from __future__ import annotations

import csv
import dataclasses
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def last_step(run_dir: Path, checkpoint: int = -1) -> int:
    """The step of a run's checkpoint (by position, the latest by default), or of an export's weights."""
    from safetensors import safe_open

    from dumo.runs.layout import CHECKPOINT_DIR, EXPORTED_WEIGHTS, checkpoint_step, list_checkpoints

    if not (run_dir / CHECKPOINT_DIR).is_dir():  # an export (dumo export): the step is in its metadata
        with safe_open(str(run_dir / EXPORTED_WEIGHTS), "pt") as weights:
            return int(weights.metadata()["step"])
    return checkpoint_step(list_checkpoints(run_dir)[checkpoint])


def training_time(run_dir: Path) -> dict[str, float]:
    """The step and training seconds (over every invocation, without start-up and evaluation) that
    the run's last checkpoint records."""
    from safetensors import safe_open

    from dumo.runs.layout import list_checkpoints

    last = list_checkpoints(run_dir)[-1]
    with safe_open(str(last), "pt") as handle:
        metadata = handle.metadata() or {}
    return {"step": last_step(run_dir), "seconds": float(metadata.get("wall_seconds", "nan"))}


def read_log(run_dir: Path, column: str) -> dict[int, float]:
    """One column of the run's training log by step (the steps that logged it)."""
    from dumo.runs.layout import TRAIN_LOG

    with (run_dir / TRAIN_LOG).open() as handle:
        return {int(row["step"]): float(row[column]) for row in csv.DictReader(handle) if row.get(column)}


def metric(dataset: str) -> str:
    """The quality figure of a dataset: MMD for 2-D data, domain FD for images."""
    return "mmd" if dataset == "moons" else "fd"


def mean_std(values: Sequence[float], digits: str = ".4g", std_digits: str | None = None) -> str:
    """``mean ± std`` of ``values`` (the value alone for one) in the format spec ``digits``
    (``std_digits`` for the std, by default the same)."""
    if len(values) == 1:
        return f"{values[0]:{digits}}"
    return f"{statistics.mean(values):{digits}} ± {statistics.stdev(values):{std_digits or digits}}"


def evaluate_run(run: Any, evaluations: dict[str, dict], num: int, device: str = "cpu") -> dict[str, float]:
    """Scores of a loaded run (dumo.runs.loading.load_run) for each named evaluation, a dict of
    ``nfe``, optionally ``method`` (default auto) and ``guidance`` (default the run's sampling
    config's), keyed like ``"1 NFE/fd"``: the evaluation's name and the metric."""
    from dumo.evaluation import evaluate

    dataset = run.dataset
    if dataset is None:  # weights that do not record their data: build it from the config
        from dumo.data import build_dataset

        dataset = build_dataset(run.config.data)
    scores = {}
    for name, spec in evaluations.items():
        sample = run.config.sample
        if "guidance" in spec:
            sample = dataclasses.replace(sample, guidance_scale=spec["guidance"])
        result = evaluate(
            run.model,
            run.objective_name,
            dataset,
            sample,
            nfes=(spec["nfe"],),
            num=num,
            num_classes=run.num_classes,
            method=spec.get("method", "auto"),
            device=device,
        )
        for key, value in result.items():  # fd_1nfe -> "1 NFE/fd"
            scores[f"{name}/{key.rsplit('_', 1)[0]}"] = value
    return scores


def samples(run_dir: Path, num: int, nfe: int = 1) -> np.ndarray:
    """``num`` samples of the run's EMA weights in data space (seed 0), cached in the run folder."""
    import torch

    from dumo.runs.loading import load_run
    from dumo.sampling import balanced_labels, generate

    path = run_dir / f"samples-{nfe}nfe-{num}.npy"
    if not path.is_file():
        torch.set_num_threads(1)
        run = load_run(run_dir)
        labels = balanced_labels(num, run.num_classes)
        x = generate(run.model, run.objective_name, (num, *run.space.shape), nfe, run.config.sample, 0, labels)
        np.save(path, run.space.unstandardise(x).numpy())
    return np.load(path)


def run_training(config: Path, run_dir: Path, overrides: list[str]) -> Path:
    """``dumo train CONFIG --out RUN_DIR --set ...`` in its own process with one CPU thread (several
    run side by side), its output appended to RUN_DIR.log beside the run; a failure raises."""
    import os
    import subprocess
    import sys

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "dumo", "train", str(config), "--out", str(run_dir)]
    for item in [*overrides, "train.progress=false"]:
        command += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log_path = run_dir.parent / f"{run_dir.name}.log"
    with log_path.open("a") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"training failed: {' '.join(command)} (see {log_path})")
    return run_dir

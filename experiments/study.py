"""The paper's study, one command per figure or table (in miniature on CPU, full size on GPUs).

    .venv/bin/python experiments/study.py rho-beta        # Fig. 3 + 4a: MeanFlow rho vs DuMo beta vs Shortcut
    .venv/bin/python experiments/study.py throughput      # Fig. 4b: training throughput, DuMo / MeanFlow / FM
    .venv/bin/python experiments/study.py beta-grid       # Fig. 4c: t ~ Beta(theta1, theta2), log domain FD
    .venv/bin/python experiments/study.py multiplicity    # Sec. 4.3: DuMo's two heads vs three heads
    .venv/bin/python experiments/study.py table1          # Table 1: FM, Shortcut, MeanFlow, DuMo by NFE
    .venv/bin/python experiments/study.py sweep           # fairness: lr x each method's key, best of each
    .venv/bin/python experiments/study.py trajectories    # Fig. 5/6: NFE 1..16 at two training stages

Each writes ``table.md`` (command, machine and wall time in its header) and ``figure.png`` to
--out (default docs/study/NAME). Without options a command runs the full study (the configs'
step budget, 3 seeds, mean ± std); ``--quick`` runs it in seconds (a few steps, 1 seed, few
samples, the smallest settings). Every run is a ``dumo train`` process with ``--set`` overrides
in its own folder under --runs (default experiments/results/study/NAME): a finished run is not
trained again, an interrupted one resumes, and its scores are kept in its folder (scores.json).
The full-size version runs on GPUs by pointing the same command at other configs: ``--config-dir``
(the same layout as configs/: toy/moons-*.yaml, digits/*.yaml, fashion_mnist/*.yaml) and ``--set
KEY=VALUE`` for every run (e.g. ``--set train.device=cuda``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

# experiments/common.py, found as the script's folder comes first on the path (python experiments/X.py;
# the tests' load_script puts it there too)
import common
import numpy as np
from common import evaluate_run, last_step, metric, samples, training_time

ROOT = Path(__file__).resolve().parents[1]
DUMO = [sys.executable, "-m", "dumo"]
QUICK_STEPS = 20
QUICK_SAMPLES = 128
FULL_SAMPLES = {"moons": 2000}  # images: 1000
MEANFLOW_RHO = (0.0, 0.25, 0.5, 0.75, 0.8, 1.0)
DUMO_BETA = (0.0, 0.3, 0.5, 0.7, 0.9, 1.0)
THETAS = (0.5, 1.0, 2.0, 3.0)
TRAJECTORY_NFE = (1, 2, 4, 8, 16)


# -- runs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One training run of the study: a config of a dataset, its overrides and a seed."""

    dataset: str
    config: str  # name inside the dataset's config folder: dumo, meanflow, three-heads-shortcut, ...
    setting: str  # the label of its row, e.g. "rho = 0.75"
    overrides: tuple[str, ...] = ()
    seed: int = 0

    @property
    def slug(self) -> str:
        extra = self.setting.replace(" = ", "-").replace(", ", "_").replace(" ", "_")
        extra = "".join(ch for ch in extra if ch.isalnum() or ch in ".-_") if self.setting != "-" else "default"
        return f"{self.dataset}-{self.config}-{extra}-s{self.seed}"


@dataclass
class Study:
    """The options every experiment shares, and running and scoring its runs."""

    name: str
    quick: bool
    out: Path
    runs: Path
    seeds: int
    steps: int | None
    samples: int | None
    jobs: int
    config_dir: Path
    sets: list[str]
    datasets: list[str]
    started: float = field(default_factory=time.perf_counter)
    used: set[Path] = field(default_factory=set)  # the run folders behind the tables, trained now or before
    # throughput only: step_cost.py's settings
    device: str = "cpu"
    networks: list[str] | None = None
    batch: int | None = None
    bf16: bool = False
    # table1 only: dataset -> method -> {"setting", "overrides"} (the sweep's best.json)
    tuned: dict | None = None

    def config_path(self, dataset: str, name: str) -> Path:
        path = (
            self.config_dir / "toy" / f"moons-{name}.yaml"
            if dataset == "moons"
            else self.config_dir / dataset / f"{name}.yaml"
        )
        if not path.is_file():
            raise SystemExit(f"study.py: error: no config {path} (--config-dir {self.config_dir})")
        return path

    def num_samples(self, dataset: str) -> int:
        return self.samples or (QUICK_SAMPLES if self.quick else FULL_SAMPLES.get(dataset, 1000))

    def budget(self) -> list[str]:
        """Step overrides: --steps, the quick budget, or none (the configs' own)."""
        steps = self.steps or (QUICK_STEPS if self.quick else None)
        return [f"train.steps={steps}"] if steps else []

    def folder(self, run: Run) -> Path:
        return self.runs / run.slug

    def train(self, run: Run, extra: Sequence[str] = ()) -> Path:
        """``dumo train`` in its own process (one thread); a finished run is left as it is."""
        folder = self.folder(run)
        self.used.add(folder)
        if (folder / "study.json").is_file():
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        overrides = [
            f"train.seed={run.seed}",
            *self.budget(),
            *run.overrides,
            *extra,
            f"train.eval_samples={self.num_samples(run.dataset)}",
            "train.progress=false",
            *self.sets,  # last: the user's overrides win
        ]
        command = [*DUMO, "train", str(self.config_path(run.dataset, run.config)), "--out", str(folder)]
        for item in overrides:
            command += ["--set", item]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        log_path = folder.parent / f"{folder.name}.log"
        started = time.perf_counter()
        with log_path.open("a") as log:
            result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        if result.returncode != 0:
            raise SystemExit(f"study.py: error: training failed: {shlex.join(command)} (see {log_path})")
        record = {"process_seconds": time.perf_counter() - started, **training_time(folder)}
        (folder / "study.json").write_text(json.dumps(record))
        return folder

    def train_all(self, runs: Sequence[Run], extra: Sequence[str] = ()) -> list[Path]:
        """Train ``runs``, ``jobs`` at a time. After a failed run no new run starts (the pool would
        otherwise go through the whole queue, hours of training, before the error is reported); runs
        already under way finish and are reused by the next invocation."""
        print(f"{self.name}: {len(runs)} runs, {self.jobs} at once, in {self.runs}", flush=True)
        failed = threading.Event()

        def train_unless_failed(run: Run) -> Path | None:
            if failed.is_set():
                return None  # never returned: a run starts after the failed one, so its error comes first
            try:
                return self.train(run, extra)
            except BaseException:
                failed.set()
                raise

        with ThreadPoolExecutor(self.jobs) as pool:
            return list(pool.map(train_unless_failed, runs))

    def seed_list(self) -> range:
        return range(1 if self.quick else self.seeds)

    def process_seconds(self) -> float:
        """The training processes' seconds of every run behind the tables, including runs trained by
        an earlier invocation (a resumed study's wall time leaves those out)."""
        return sum(json.loads((folder / "study.json").read_text())["process_seconds"] for folder in self.used)

    def write(self, lines: list[str]) -> None:
        """table.md with the command, the machine and the wall time above ``lines``."""
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        header = [
            f"# {self.name}",
            "",
            f"Command: `{shlex.join(['python', 'experiments/study.py', *sys.argv[1:]])}`  ",
            f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, {device}, torch {torch.__version__}  ",
            f"Wall time: {time.perf_counter() - self.started:.0f} s this invocation"
            + (
                f"; its {len(self.used)} runs' training processes took {self.process_seconds():.0f} s"
                if self.used
                else ""
            )
            + (" (quick form: a smoke test, not a result)" if self.quick else ""),
            "",
        ]
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "table.md").write_text("\n".join(header + lines) + "\n")
        print("\n".join(lines))
        print(f"wrote {self.out / 'table.md'} and {self.out / 'figure.png'}")


#: named evaluations: sampler settings of dumo.evaluation.evaluate
FEW_STEP = {"1 NFE": {"nfe": 1}, "2 NFE": {"nfe": 2}}


def score(folder: Path, evaluations: dict[str, dict], num: int, checkpoint: int = -1) -> dict[str, float]:
    """Scores (``"1 NFE/fd"``, ...) of the run's EMA weights at one of its checkpoints, cached in
    scores.json by checkpoint step and sample count."""
    import torch

    from dumo.runs.layout import list_checkpoints
    from dumo.runs.loading import load_run

    step = last_step(folder, checkpoint)
    path = folder / "scores.json"
    cache = json.loads(path.read_text()) if path.is_file() else {}
    scores = cache.setdefault(f"step {step}, {num} samples", {})
    missing = {name: spec for name, spec in evaluations.items() if not any(k.startswith(f"{name}/") for k in scores)}
    if missing:
        torch.set_num_threads(1)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        run = load_run(folder, list_checkpoints(folder)[checkpoint], device=device)
        scores.update(evaluate_run(run, missing, num, device))
        path.write_text(json.dumps(cache, indent=1))
    return scores


def mean_std(values: Sequence[float]) -> str:
    """4 significant digits, 2 for the std."""
    return common.mean_std(values, ".4g", ".2g")


@dataclass
class Row:
    """One row of a table: a setting's runs over seeds and their scores."""

    dataset: str
    method: str
    setting: str
    folders: list[Path]
    scores: list[dict[str, float]]
    run: Run  # the setting (seed 0's run)

    def cell(self, key: str) -> str:
        values = [s[key] for s in self.scores if key in s]
        return mean_std(values) if values else "-"

    def seconds(self) -> str:
        return mean_std([json.loads((f / "study.json").read_text())["seconds"] for f in self.folders])

    def steps(self) -> int:
        return json.loads((self.folders[0] / "study.json").read_text())["step"]


def run_rows(study: Study, settings: list[tuple[str, Run]], evaluations: Callable[[Run], dict[str, dict]]) -> list[Row]:
    """Train every (method, run) setting over the study's seeds, score each, group by setting."""
    runs = [
        (method, Run(r.dataset, r.config, r.setting, r.overrides, seed))
        for method, r in settings
        for seed in study.seed_list()
    ]
    folders = study.train_all([run for _, run in runs])
    rows: dict[tuple, Row] = {}
    for (method, run), folder in zip(runs, folders):
        found = score(folder, evaluations(run), study.num_samples(run.dataset))
        row = rows.setdefault((run.dataset, method, run.setting), Row(run.dataset, method, run.setting, [], [], run))
        row.folders.append(folder)
        row.scores.append(found)
    return list(rows.values())


def quality_table(rows: list[Row], evaluation_names: Sequence[str], intro: str) -> list[str]:
    """Rows of dataset, method, setting, one column per evaluation (MMD or domain FD), seeds, steps, wall."""
    lines = [
        intro,
        "",
        "| dataset | method | setting | " + " | ".join(evaluation_names) + " | seeds | steps | train s / run |",
        "|---|---|---|" + "---|" * len(evaluation_names) + "---|---|---|",
    ]
    for row in rows:
        key = metric(row.dataset)
        cells = " | ".join(row.cell(f"{name}/{key}") for name in evaluation_names)
        lines.append(
            f"| {row.dataset} | {row.method} | {row.setting} | {cells} | {len(row.scores)} | {row.steps()} "
            f"| {row.seconds()} |"
        )
    return lines


METRIC_TEXT = (
    "Scores of the EMA weights: MMD for moons (standardised coordinates), domain FD for images (Fréchet "
    "distance in a small classifier's features); lower is better; mean ± std over seeds."
)


# -- figures -------------------------------------------------------------------------------------


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mosaic(images: np.ndarray, columns: int) -> np.ndarray:
    """(N, C, H, W) images in [0, 1] as one picture of full rows (grey when C = 1); N < columns: one row."""
    columns = min(columns, len(images))
    rows = len(images) // columns
    n, c, h, w = images[: rows * columns].shape
    grid = np.clip(images[:n], 0, 1).reshape(rows, columns, c, h, w).transpose(0, 3, 1, 4, 2)
    grid = grid.reshape(rows * h, columns * w, c)
    return grid[..., 0] if c == 1 else grid


def heat_map(figure, axis, grid: np.ndarray, rows: Sequence, columns: Sequence) -> None:
    """``grid`` (log scores, lower is better) as a blue heat map with its values written in."""
    image = axis.imshow(grid, cmap="Blues_r")
    middle = (np.nanmin(grid) + np.nanmax(grid)) / 2
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            colour = "white" if value < middle else "black"  # readable on the deep-blue (better) cells
            axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color=colour)
    axis.set_xticks(range(len(columns)), [str(v) for v in columns])
    axis.set_yticks(range(len(rows)), [str(v) for v in rows])
    figure.colorbar(image, ax=axis)


def sample_panels(rows: list[Row], path: Path, title: str, num: int = 16) -> None:
    """One panel per row (seed 0): moons samples as points, images as a 4-wide mosaic."""
    plt = pyplot()
    datasets = list(dict.fromkeys(row.dataset for row in rows))
    columns = max(sum(row.dataset == d for row in rows) for d in datasets)
    figure, axes = plt.subplots(len(datasets), columns, figsize=(2.2 * columns, 2.4 * len(datasets)), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    if "moons" in datasets:
        import torch

        from dumo.data.toy import Moons

        reference = Moons().sample(5000, torch.Generator().manual_seed(0))[0].numpy()
    for i, dataset in enumerate(datasets):
        for j, row in enumerate(r for r in rows if r.dataset == dataset):
            axis = axes[i, j]
            if dataset == "moons":
                points = samples(row.folders[0], 1000)
                axis.scatter(reference[:, 0], reference[:, 1], s=1, color="0.85")
                axis.scatter(points[:, 0], points[:, 1], s=1, alpha=0.5)
                axis.set_xlim(-2, 3)
                axis.set_ylim(-1.5, 2)
            else:
                axis.imshow(mosaic(samples(row.folders[0], num), 4), cmap="gray")
            key = metric(dataset)
            label = row.method if row.setting == "-" else f"{row.method}, {row.setting}"
            axis.set_title(
                f"{row.dataset}: {label}\n1 NFE {key} {row.scores[0].get(f'1 NFE/{key}', 0):.3g}", fontsize=7
            )
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# -- experiments ---------------------------------------------------------------------------------


def rho_beta(study: Study) -> None:
    """Fig. 3 + 4a: MeanFlow's rho sweep, DuMo's beta sweep and Shortcut, same network and budget."""
    rhos = (0.75,) if study.quick else MEANFLOW_RHO
    betas = (0.7,) if study.quick else DUMO_BETA
    settings = []
    for dataset in study.datasets:
        settings += [("MeanFlow", Run(dataset, "meanflow", f"rho = {v}", (f"objective.rho={v}",))) for v in rhos]
        settings += [("DuMo", Run(dataset, "dumo", f"beta = {v}", (f"objective.beta={v}",))) for v in betas]
        settings.append(("Shortcut", Run(dataset, "shortcut", "-")))
    rows = run_rows(study, settings, lambda run: FEW_STEP)
    study.out.mkdir(parents=True, exist_ok=True)
    sample_panels(rows, study.out / "figure.png", "1-NFE samples (seed 0)")
    study.write(quality_table(rows, list(FEW_STEP), METRIC_TEXT))


def beta_grid(study: Study) -> None:
    """Fig. 4c: DuMo with t ~ Beta(theta1, theta2) over a grid; heat map of log domain FD at 1 NFE."""
    thetas1, thetas2 = ((1.0, 2.0), (2.0,)) if study.quick else (THETAS, THETAS)
    dataset = study.datasets[0]
    settings = [
        (
            "DuMo",
            Run(
                dataset,
                "dumo",
                f"theta1 = {a}, theta2 = {b}",
                (
                    "objective.time.distribution=beta",
                    f"objective.time.theta1={a}",
                    f"objective.time.theta2={b}",
                ),
            ),
        )
        for a in thetas1
        for b in thetas2
    ]
    rows = run_rows(study, settings, lambda run: {"1 NFE": {"nfe": 1}})
    key = metric(dataset)
    logs = [np.log(statistics.mean(s[f"1 NFE/{key}"] for s in row.scores)) for row in rows]
    grid = np.array(logs).reshape(len(thetas1), len(thetas2))
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(1.2 * len(thetas2) + 2.5, 1.0 * len(thetas1) + 1.5))
    heat_map(figure, axis, grid, thetas1, thetas2)
    axis.set_xlabel("theta2")
    axis.set_ylabel("theta1")
    axis.set_title(f"DuMo, {dataset}: log {key} at 1 NFE", fontsize=9)
    figure.tight_layout()
    study.out.mkdir(parents=True, exist_ok=True)
    figure.savefig(study.out / "figure.png", dpi=110)
    plt.close(figure)
    lines = [
        f"DuMo on {dataset}, t ~ Beta(theta1, theta2), 1 NFE. {METRIC_TEXT}",
        "",
        f"| theta1 | theta2 | {key} | log {key} (of the mean) | seeds | steps | train s / run |",
        "|---|---|---|---|---|---|---|",
    ]
    for (a, b), row, log in zip(((a, b) for a in thetas1 for b in thetas2), rows, logs):
        lines.append(
            f"| {a} | {b} | {row.cell(f'1 NFE/{key}')} | {log:.3f} | {len(row.scores)} | {row.steps()} "
            f"| {row.seconds()} |"
        )
    study.write(lines)


def multiplicity(study: Study) -> None:
    """Sec. 4.3: DuMo's two heads against the two three-head variants (scored on their u-head)."""
    settings = []
    for dataset in study.datasets:
        settings.append(("DuMo (v, u)", Run(dataset, "dumo", "two heads")))
        for variant, heads in (("meanflow", "v, m, u"), ("shortcut", "v, s, u")):
            settings.append((f"three heads ({heads})", Run(dataset, f"three-heads-{variant}", f"variant {variant}")))
    rows = run_rows(study, settings, lambda run: FEW_STEP)
    study.out.mkdir(parents=True, exist_ok=True)
    sample_panels(rows, study.out / "figure.png", "1-NFE samples of the u-head (seed 0)")
    intro = f"The u-head (DuMo's flow map) of each model, sampled with DuMo's sampler. {METRIC_TEXT}"
    study.write(quality_table(rows, list(FEW_STEP), intro))


#: Table 1: method -> (config name, evaluations)
TABLE1 = {
    "Flow Matching": ("fm", {"1 NFE": {"nfe": 1, "method": "euler"}, "50 NFE": {"nfe": 50, "method": "euler"}}),
    "Shortcut": ("shortcut", {"1 NFE": {"nfe": 1}, "2 NFE": {"nfe": 2}, "4 NFE": {"nfe": 4}}),
    "MeanFlow": ("meanflow", FEW_STEP),
    "DuMo": ("dumo", FEW_STEP),
}


def table1_evaluations(run: Run) -> dict[str, dict]:
    """The evaluations TABLE1 lists for the method of ``run``'s config."""
    return next(evaluations for config, evaluations in TABLE1.values() if config == run.config)


#: table1 keeps a checkpoint at each third of the budget and scores all three, so that a table at a
#: short budget shows whether the methods' curves have flattened (one-step quality keeps improving
#: long after multi-step Flow Matching has converged)
CURVE_POINTS = 3


def checkpoint_overrides(study: Study, dataset: str, points: int) -> tuple[str, ...]:
    """Checkpoints at each ``points``-th of the dataset's step budget (DuMo's config's; Table 1 gives
    every method the same), all of them kept: the last is the final step, the others evenly before it."""
    steps = load_steps(study.config_path(dataset, "dumo"), [*study.budget(), *study.sets])
    every = max(1, math.ceil(steps / points))
    return (f"train.checkpoint_every={every}", f"train.keep_checkpoints={points}")


def table1(study: Study) -> None:
    """Table 1 in miniature: every method on the same network and step budget, scored by NFE, and
    the same scores at each third of the budget; with --tuned, each method with the setting the
    fairness sweep chose for it (its best.json)."""
    settings = []
    for dataset in study.datasets:
        checkpoints = checkpoint_overrides(study, dataset, CURVE_POINTS)
        for method, (config, _) in TABLE1.items():
            run = Run(dataset, config, "-", checkpoints)
            if study.tuned is not None:
                tuned = study.tuned.get(dataset, {}).get(method)
                if tuned is None:
                    raise SystemExit(f"study.py: error: --tuned has no setting for {method} on {dataset}")
                run = Run(dataset, config, tuned["setting"], (*tuned["overrides"], *checkpoints))
            settings.append((method, run))
    rows = run_rows(study, settings, table1_evaluations)
    lines = [
        "Each method on the same network and step budget"
        + (" with the setting the fairness sweep chose for it" if study.tuned is not None else "")
        + ". "
        + METRIC_TEXT
        + " Wall s / run: the training process's time, so a same-wall-clock comparison can be read off.",
        "",
        *nfe_table(rows),
        "",
        *curve_table(study, rows, study.out / "curve.png"),
    ]
    study.out.mkdir(parents=True, exist_ok=True)
    sample_panels(rows, study.out / "figure.png", "1-NFE samples (seed 0; Flow Matching: 1 Euler step)")
    study.write(lines)


def curve_table(study: Study, rows: Sequence[Row], path: Path) -> list[str]:
    """Each row's TABLE1 scores at its kept checkpoints (up to CURVE_POINTS, the last one is the main
    table's), as a table and as score-against-step lines in ``path``, one panel per dataset."""
    from dumo.runs.layout import list_checkpoints

    curves: dict[tuple[str, str, str], dict[int, list[float]]] = {}  # (dataset, method, NFE) -> step -> scores
    for row in rows:
        key = metric(row.dataset)
        for folder in row.folders:
            kept = min(CURVE_POINTS, len(list_checkpoints(folder)))
            for position in range(-kept, 0):
                found = score(folder, table1_evaluations(row.run), study.num_samples(row.dataset), position)
                step = last_step(folder, position)
                for name in TABLE1[row.method][1]:
                    curve = curves.setdefault((row.dataset, row.method, name.split()[0]), {})
                    curve.setdefault(step, []).append(found[f"{name}/{key}"])
    lines = [
        "## Quality against training steps",
        "",
        "The same scores at the checkpoints kept at each third of the budget (the last is the table above's), "
        "mean ± std over seeds; where they still fall steeply, the budget is too short to rank the methods "
        f"({path.name}).",
        "",
        "| dataset | method | NFE | score by step |",
        "|---|---|---|---|",
    ]
    for (dataset, method, nfe), curve in curves.items():
        points = ", ".join(f"{step}: {mean_std(values)}" for step, values in sorted(curve.items()))
        lines.append(f"| {dataset} | {method} | {nfe} | {points} |")
    plt = pyplot()
    datasets = list(dict.fromkeys(dataset for dataset, _, _ in curves))
    figure, axes = plt.subplots(1, len(datasets), figsize=(7.5 * len(datasets), 4), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        for (curve_dataset, method, nfe), curve in curves.items():
            if curve_dataset != dataset:
                continue
            steps = sorted(curve)
            means = [statistics.mean(curve[s]) for s in steps]
            spread = [statistics.stdev(curve[s]) if len(curve[s]) > 1 else 0.0 for s in steps]
            axis.errorbar(steps, means, yerr=spread, marker="o", capsize=2, label=f"{method}, {nfe} NFE")
        axis.set_yscale("log")
        axis.set_xlabel("training step")
        axis.set_ylabel(metric(dataset))
        axis.set_title(dataset)
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside: the curves fill the axes
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return lines


def nfe_table(rows: Sequence[Row]) -> list[str]:
    """A line per method and NFE (its TABLE1 evaluations): score, class fidelity, seeds, steps, wall."""
    lines = [
        "| dataset | method | setting | NFE | score | class fidelity | seeds | steps | train s / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        key = metric(row.dataset)
        for name in TABLE1[row.method][1]:
            lines.append(
                f"| {row.dataset} | {row.method} | {row.setting} | {name.split()[0]} | {row.cell(f'{name}/{key}')} | "
                f"{row.cell(f'{name}/fidelity')} | {len(row.scores)} | {row.steps()} | {row.seconds()} |"
            )
    return lines


#: The fairness sweep: every method gets the same learning rates and three values of its own key
#: (Flow Matching has none); DuMo and MeanFlow then try the other adaptive power p at their best.
SWEEP_LR = (1e-4, 3e-4, 1e-3)
SWEEP_KEYS = {
    "Flow Matching": None,
    "DuMo": ("beta", (0.5, 0.7, 0.9)),
    "MeanFlow": ("rho", (0.25, 0.5, 0.75)),
    "Shortcut": ("bootstrap_fraction", (0.0625, 0.125, 0.25)),
}
ADAPTIVE_METHODS = ("DuMo", "MeanFlow")


def selection_name(method: str) -> str:
    """The evaluation a method is chosen by: Flow Matching's 50 Euler steps, the others' 1 NFE."""
    return "50 NFE" if method == "Flow Matching" else "1 NFE"


def best_row(rows: Sequence[Row]) -> Row:
    """The row with the lowest selection score of seed 0; a diverged run (nan) is never chosen."""

    def score_of(row: Row) -> float:
        value = row.scores[0].get(f"{selection_name(row.method)}/{metric(row.dataset)}", math.nan)
        return value if math.isfinite(value) else math.inf

    return min(rows, key=score_of)


def sweep_run(dataset: str, method: str, lr: float, key_value: float | None = None, p: float | None = None) -> Run:
    config = TABLE1[method][0]
    overrides, label = [f"optim.lr={lr}"], [f"lr = {lr}"]
    if key_value is not None:
        key = SWEEP_KEYS[method][0]
        overrides.append(f"objective.{key}={key_value}")
        label.append(f"{key} = {key_value}")
    if p is not None:
        overrides.append(f"objective.adaptive_p={p}")
        label.append(f"p = {p}")
    return Run(dataset, config, ", ".join(label), tuple(overrides))


def sweep(study: Study) -> None:
    """The same small sweep for every method at the same budget: learning rate x its own key, then
    (DuMo, MeanFlow) the other adaptive power p at the best of those, on seed 0; the best of each
    then over all seeds. Writes best.json, the chosen overrides that ``table1 --tuned`` reads."""
    from dumo.config import load_config

    rates = SWEEP_LR[1:] if study.quick else SWEEP_LR
    first_seed = dataclasses.replace(study, seeds=1)

    def own_values(method: str) -> tuple:
        own = SWEEP_KEYS[method]
        return (None,) if own is None else own[1][:1] if study.quick else own[1]

    grid = [
        (method, sweep_run(dataset, method, lr, value))
        for dataset in study.datasets
        for method in SWEEP_KEYS
        for lr in rates
        for value in own_values(method)
    ]
    tried: dict[tuple[str, str], list[Row]] = {}
    for row in run_rows(first_seed, grid, table1_evaluations):
        tried.setdefault((row.dataset, row.method), []).append(row)
    second = []
    for (dataset, method), rows in tried.items():
        if method in ADAPTIVE_METHODS:
            best = best_row(rows).run
            config = load_config(study.config_path(dataset, best.config), [*best.overrides, *study.sets])
            other_p = 1.0 - min(config.objective.adaptive_p, 1.0)  # 0 <-> 1
            overrides = (*best.overrides, f"objective.adaptive_p={other_p}")
            flipped = dataclasses.replace(best, setting=f"{best.setting}, p = {other_p}", overrides=overrides)
            second.append((method, flipped))
    for row in run_rows(first_seed, second, table1_evaluations):
        tried[(row.dataset, row.method)].append(row)
    chosen = {key: best_row(rows) for key, rows in tried.items()}
    final = run_rows(study, [(method, row.run) for (_, method), row in chosen.items()], table1_evaluations)

    study.out.mkdir(parents=True, exist_ok=True)
    best = {}
    for row in final:
        best.setdefault(row.dataset, {})[row.method] = {"setting": row.setting, "overrides": list(row.run.overrides)}
    (study.out / "best.json").write_text(json.dumps(best, indent=1) + "\n")
    sweep_figure(tried, rates, own_values, study.out / "figure.png")
    lines = [
        f"Every method with the same learning rates {', '.join(map(str, rates))} and three values of its own key, "
        "at the same step budget, seed 0; DuMo and MeanFlow then with the other adaptive power p at their best "
        "setting. Each is chosen by its 1-NFE score (Flow Matching by 50 Euler steps); the chosen setting is then "
        f"trained with every seed. {METRIC_TEXT}",
        "",
        "## The sweep (seed 0)",
        "",
        "| dataset | method | setting | chosen by | score | chosen | steps | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (dataset, method), rows in tried.items():
        for row in rows:
            name = selection_name(method)
            mark = "yes" if row is chosen[(dataset, method)] else ""
            lines.append(
                f"| {dataset} | {method} | {row.setting} | {name} | {row.cell(f'{name}/{metric(dataset)}')} | {mark} "
                f"| {row.steps()} | {row.seconds()} |"
            )
    seeds = len(study.seed_list())
    lines += ["", f"## The best of each ({seeds} seed{'s' if seeds > 1 else ''})", ""]
    lines += nfe_table(final)
    study.write(lines)


def sweep_figure(
    tried: dict[tuple[str, str], list[Row]], rates: Sequence[float], own_values: Callable[[str], tuple], path: Path
) -> None:
    """One heat map per dataset and method: log selection score over learning rate x own key (seed 0)."""
    plt = pyplot()
    figure, axes = plt.subplots(1, len(tried), figsize=(3.2 * len(tried), 3.2), squeeze=False)
    for axis, ((dataset, method), rows) in zip(axes[0], tried.items()):
        by_run = {row.run: row for row in rows}
        values = own_values(method)
        name = f"{selection_name(method)}/{metric(dataset)}"
        grid = np.array(
            [
                [np.log(by_run[sweep_run(dataset, method, lr, value)].scores[0].get(name, np.nan)) for value in values]
                for lr in rates
            ]
        )
        key = SWEEP_KEYS[method][0] if SWEEP_KEYS[method] else None
        heat_map(figure, axis, grid, [f"lr = {lr}" for lr in rates], [f"{key} = {v}" if key else "-" for v in values])
        axis.set_title(f"{method}, {dataset}: log {name}", fontsize=8)
        axis.tick_params(labelsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def trajectories(study: Study) -> None:
    """Fig. 5/6: the same noise at NFE 1..16, at two checkpoints (half-way and the end) of one run."""
    import torch

    from dumo.cli import main as dumo_main
    from dumo.runs.layout import list_checkpoints

    torch.set_num_threads(1)  # as the scoring: the training processes (--jobs) share the cores
    dataset = study.datasets[0]
    nfes = (1, 2, 4) if study.quick else TRAJECTORY_NFE
    # two stages: a checkpoint half-way and the last one, both kept
    (folder,) = study.train_all([Run(dataset, "dumo", "-")], checkpoint_overrides(study, dataset, 2))
    positions = range(-min(2, len(list_checkpoints(folder))), 0)  # the last two checkpoints
    study.out.mkdir(parents=True, exist_ok=True)
    pictures, lines = [], []
    key = metric(dataset)
    lines += [
        f"DuMo on {dataset}: u-head (DuMo's sampler) and v-head (Euler) at each NFE, two checkpoints of one run. "
        + METRIC_TEXT,
        "",
        "| step | NFE | u-head " + key + " | v-head Euler " + key + " |",
        "|---|---|---|---|",
    ]
    for position in positions:
        step = last_step(folder, position)
        picture = study.out / f"step-{step}.png"
        checkpoint = list_checkpoints(folder)[position]
        command = ["trajectories", str(folder), "--checkpoint", str(checkpoint), "--out", str(picture)]
        command += ["--nfe", *map(str, nfes), "--num", "4" if study.quick else "8"]
        if dumo_main(command) != 0:
            raise SystemExit(f"study.py: error: dumo {shlex.join(command)} failed")
        pictures.append(picture)
        evaluations = {f"{n} NFE": {"nfe": n} for n in nfes}
        evaluations |= {f"{n} Euler": {"nfe": n, "method": "euler"} for n in nfes}
        found = score(folder, evaluations, study.num_samples(dataset), position)
        for n in nfes:
            lines.append(f"| {step} | {n} | {found[f'{n} NFE/{key}']:.4g} | {found[f'{n} Euler/{key}']:.4g} |")
    plt = pyplot()
    images = [plt.imread(p) for p in pictures]
    width, height = max(i.shape[1] for i in images) / 100, sum(i.shape[0] for i in images) / 100
    figure, axes = plt.subplots(len(images), 1, figsize=(width, height + 0.4 * len(images)), squeeze=False)
    for axis, image, picture in zip(axes[:, 0], images, pictures):
        axis.imshow(image)
        axis.axis("off")
        axis.set_title(picture.stem.replace("-", " "))
    figure.tight_layout()
    figure.savefig(study.out / "figure.png", dpi=110)
    plt.close(figure)
    study.write(lines)


def load_steps(config: Path, overrides: Sequence[str]) -> int:
    """The step budget of ``config`` with ``overrides`` (KEY=VALUE) applied."""
    from dumo.config import load_config

    return load_config(config, list(overrides)).train.steps


def step_cost_module():
    """benchmarks/step_cost.py as a module (benchmarks/ is not a package)."""
    if "step_cost" in sys.modules:
        return sys.modules["step_cost"]
    spec = importlib.util.spec_from_file_location("step_cost", ROOT / "benchmarks" / "step_cost.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["step_cost"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


THROUGHPUT_METHODS = ("Flow Matching", "MeanFlow (JVP-free)", "DuMo (FD, batched)")


def throughput(study: Study) -> None:
    """Fig. 4b: training steps per second of DuMo, MeanFlow (JVP-free) and Flow Matching on the
    same DiT, batch and machine (benchmarks/step_cost.py's time_steps); ratios only on a CPU."""
    import torch

    cost = step_cost_module()
    device = torch.device(study.device)
    cuda = device.type == "cuda"
    if not cuda:
        # one thread: on a busy machine two spinning OpenMP threads made an MLP step 100x slower
        torch.set_num_threads(1)
    networks = study.networks or (
        ["dit28"] if study.quick else (["dit-s2", "dit-b2", "dit-xl2"] if cuda else ["dit28", "dit-s2"])
    )
    batch = study.batch or (2 if study.quick else None)
    settings = cost.Settings(1 if study.quick else 10, device, batch, study.bf16)
    measured: dict[tuple[str, str], list[float]] = {}
    for repeat in study.seed_list():
        for network in networks:
            for method in THROUGHPUT_METHODS:
                seconds, _ = cost.time_steps(network, cost.METHODS[method], settings)
                measured.setdefault((network, method), []).append(seconds)
                print(f"{network} {method} repeat {repeat}: {seconds * 1000:.1f} ms/step", flush=True)
    lines = [
        f"Median training-step time of each objective on the same network and batch ({device}"
        + ("" if cuda else ", one thread")
        + f", "
        f"{'bf16' if study.bf16 else 'fp32'}, guidance zeta {cost.ZETA}); throughput = steps/s, "
        "mean ± std over repeats."
        + ("" if cuda else " On a CPU only the ratios carry over to GPUs; steps/s are not shown."),
        "",
        "| network (batch) | method | throughput / FM | throughput / MeanFlow | "
        + ("steps/s | images/s |" if cuda else "step ms |"),
        "|---|---|---|---|" + ("---|---|" if cuda else "---|"),
    ]
    for network in networks:
        fm = statistics.mean(measured[network, "Flow Matching"])
        mf = statistics.mean(measured[network, "MeanFlow (JVP-free)"])
        size = batch or cost.NETWORKS[network][2]
        for method in THROUGHPUT_METHODS:
            times = measured[network, method]
            cells = f"{mean_std([fm / t for t in times])} | {mean_std([mf / t for t in times])}"
            if cuda:
                cells += f" | {mean_std([1 / t for t in times])} | {mean_std([size / t for t in times])}"
            else:
                cells += f" | {mean_std([t * 1000 for t in times])}"
            lines.append(f"| {network} ({size}) | {method} | {cells} |")
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(1.8 * len(networks) + 2.5, 3.5))
    width = 0.8 / len(THROUGHPUT_METHODS)
    for k, method in enumerate(THROUGHPUT_METHODS):
        values = [
            statistics.mean(
                (1 / t if cuda else statistics.mean(measured[n, "Flow Matching"]) / t) for t in measured[n, method]
            )
            for n in networks
        ]
        axis.bar(np.arange(len(networks)) + k * width, values, width, label=method)
    axis.set_xticks(np.arange(len(networks)) + width * (len(THROUGHPUT_METHODS) - 1) / 2, networks)
    axis.set_ylabel("training steps / s" if cuda else "training throughput / Flow Matching's")
    axis.set_title(f"Training throughput ({device})")
    axis.legend(fontsize=8)
    figure.tight_layout()
    study.out.mkdir(parents=True, exist_ok=True)
    figure.savefig(study.out / "figure.png", dpi=110)
    plt.close(figure)
    study.write(lines)


@dataclass(frozen=True)
class Experiment:
    run: Callable[[Study], None]
    help: str
    datasets: tuple[str, ...]  # the full form's; --quick and --datasets may narrow them
    trains: bool = True  # False: no dumo train runs (--config-dir and --set do not apply)


EXPERIMENTS: dict[str, Experiment] = {
    "rho-beta": Experiment(rho_beta, "Fig. 3 + 4a: MeanFlow rho vs DuMo beta vs Shortcut", ("moons", "digits")),
    "throughput": Experiment(throughput, "Fig. 4b: training throughput, DuMo / MeanFlow / FM", (), trains=False),
    "beta-grid": Experiment(beta_grid, "Fig. 4c: DuMo over t ~ Beta(theta1, theta2), log domain FD", ("digits",)),
    "multiplicity": Experiment(multiplicity, "Sec. 4.3: DuMo vs three-head variants", ("moons", "digits")),
    "table1": Experiment(table1, "Table 1: FM, Shortcut, MeanFlow, DuMo by NFE", ("digits", "fashion_mnist")),
    "sweep": Experiment(sweep, "the fairness sweep: learning rate x each method's own key, best of each", ("moons",)),
    "trajectories": Experiment(trajectories, "Fig. 5/6: NFE 1..16 at two training stages", ("digits",)),
}


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="experiment", required=True)
    for name, experiment in EXPERIMENTS.items():
        command = commands.add_parser(name, help=experiment.help, description=experiment.help)
        command.add_argument("--quick", action="store_true", help="seconds: a few steps, 1 seed, few samples")
        command.add_argument("--out", type=Path, help=f"table.md and figure.png (default docs/study/{name})")
        command.add_argument("--seeds", type=positive, default=3, help="seeds (throughput: repeats) of the full form")
        if experiment.trains:
            command.add_argument("--runs", type=Path, help=f"run folders (default experiments/results/study/{name})")
            command.add_argument("--steps", type=positive, help="training steps (default: the configs')")
            command.add_argument("--samples", type=positive, help="samples per score (default 2000 moons, 1000 images)")
            command.add_argument("--jobs", "--workers", type=positive, default=2, help="runs at once (one thread each)")
            command.add_argument("--config-dir", type=Path, default=ROOT / "configs", help="configs/ of another size")
            command.add_argument(
                "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="override for every run"
            )
            if name == "table1":
                command.add_argument("--tuned", type=Path, help="best.json of `study.py sweep`: each method's setting")
            command.add_argument(
                "--datasets",
                nargs="+",
                choices=("moons", "digits", "fashion_mnist", "mnist"),
                help="default: " + ", ".join(experiment.datasets),
            )
        else:
            command.add_argument("--networks", nargs="+", help="step_cost.py networks (default: the DiTs that fit)")
            command.add_argument("--batch", type=positive, help="batch size (default: each network's own)")
            command.add_argument("--device", default=None, help="default: cuda if available, else cpu")
            command.add_argument("--bf16", action="store_true", help="autocast the network in bf16")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    experiment = EXPERIMENTS[args.experiment]
    name = args.experiment
    study = Study(
        name=name,
        quick=args.quick,
        out=args.out or ROOT / "docs" / "study" / name,
        runs=getattr(args, "runs", None) or ROOT / "experiments" / "results" / "study" / (name + "-quick" * args.quick),
        seeds=args.seeds,
        steps=getattr(args, "steps", None),
        samples=getattr(args, "samples", None),
        jobs=getattr(args, "jobs", 1),
        config_dir=getattr(args, "config_dir", ROOT / "configs"),
        sets=getattr(args, "sets", []),
        datasets=getattr(args, "datasets", None) or list(experiment.datasets),
    )
    if getattr(args, "tuned", None) is not None:
        if not args.tuned.is_file():
            raise SystemExit(f"study.py: error: --tuned {args.tuned}: no such file")
        study.tuned = json.loads(args.tuned.read_text())
    if not experiment.trains:
        import torch

        study.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        study.networks, study.batch, study.bf16 = args.networks, args.batch, args.bf16
        unknown = sorted(set(study.networks or []) - set(step_cost_module().NETWORKS))
        if unknown:
            raise SystemExit(f"study.py: error: unknown --networks {' '.join(unknown)}")
    from dumo.errors import DumoError

    try:
        experiment.run(study)
    except DumoError as error:  # a bad --set or config: one line, not a traceback
        raise SystemExit(f"study.py: error: {error}") from None


if __name__ == "__main__":
    main()

"""The paper's toy study in miniature (Fig. 3 and Fig. 4a): MeanFlow's velocity ratio rho against
DuMo's loss weight beta, on 2-D moons, same network and budget, several seeds.

    .venv/bin/python experiments/toy_study.py                  # full study (36 runs)
    .venv/bin/python experiments/toy_study.py --steps 200 --seeds 1 --workers 1   # smoke run

Writes to --out: one JSON per run (finished runs are skipped when the study is run again),
``table.md`` (1-NFE MMD mean and spread over seeds) and ``figure.png`` (1-NFE samples of
seed 0 over the data density, one panel per setting).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MEANFLOW_RHO = (0.0, 0.25, 0.5, 0.75, 0.8, 1.0)
DUMO_BETA = (0.0, 0.3, 0.5, 0.7, 0.9, 1.0)
NUM_SAMPLES = 2000


def settings() -> list[tuple[str, str, float]]:
    """(label, config name, value) for every setting of the study."""
    return [("MeanFlow", "moons-meanflow", rho) for rho in MEANFLOW_RHO] + [
        ("DuMo", "moons-dumo", beta) for beta in DUMO_BETA
    ]


def run_one(job: dict) -> dict:
    """Train one setting and seed, then score 1-NFE (and 2-NFE) samples of the EMA weights."""
    torch.set_num_threads(1)  # the workers share the cores
    from dumo.config import load_config
    from dumo.evaluation import evaluate, generate
    from dumo.training import Trainer

    key = "rho" if job["config"] == "moons-meanflow" else "beta"
    overrides = [
        f"objective.{key}={job['value']}",
        f"train.seed={job['seed']}",
        f"train.steps={job['steps']}",
        "train.progress=false",
        "train.checkpoint_every=0",
        "train.log_every=0",
    ]
    config = load_config(ROOT / "configs" / "toy" / f"{job['config']}.yaml", overrides)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(config, Path(run_dir) / "run")
        trainer.run()
        seconds = time.perf_counter() - started
        model, dataset = trainer.ema.model, trainer.dataset
        metrics = evaluate(model, config.objective.name, dataset, config.sample, (1, 2), NUM_SAMPLES)
        points = generate(model, config.objective.name, (NUM_SAMPLES, 2), 1, config.sample)
    result = {**job, **metrics, "seconds": seconds, "samples": dataset.unstandardise(points).tolist()}
    Path(job["path"]).write_text(json.dumps(result))
    return result


def summarise(results: list[dict], out: Path, steps: int, seeds: int) -> str:
    lines = [
        f"1-NFE MMD on moons (EMA weights, {NUM_SAMPLES} samples, standardised coordinates; lower is better), "
        f"{steps} steps, {seeds} seed(s): mean ± std over seeds (min–max).",
        "",
        "| method | setting | 1-NFE MMD | min–max | 2-NFE MMD |",
        "|---|---|---|---|---|",
    ]
    for label, config, value in settings():
        rows = [r for r in results if r["config"] == config and r["value"] == value]
        if not rows:
            continue
        one = [r["mmd_1nfe"] for r in rows]
        two = [r["mmd_2nfe"] for r in rows]
        spread = statistics.stdev(one) if len(one) > 1 else 0.0
        name = "rho" if label == "MeanFlow" else "beta"
        lines.append(
            f"| {label} | {name} = {value} | {statistics.mean(one):.4f} ± {spread:.4f} | "
            f"{min(one):.4f}–{max(one):.4f} | {statistics.mean(two):.4f} |"
        )
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    return table


def draw(results: list[dict], out: Path) -> None:
    from dumo.data.toy import Moons
    from dumo.plotting import scatter_over_density

    panels = []
    for label, config, value in settings():
        first = [r for r in results if r["config"] == config and r["value"] == value and r["seed"] == 0]
        if first:
            name = "rho" if label == "MeanFlow" else "beta"
            panels.append((f"{label} {name}={value}: MMD {first[0]['mmd_1nfe']:.3f}", np.array(first[0]["samples"])))
    reference, _ = Moons().sample(50_000, torch.Generator().manual_seed(0))
    scatter_over_density(panels, reference.numpy(), out / "figure.png", columns=6, title="1-NFE samples (seed 0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the toy configs')")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "toy_study")
    args = parser.parse_args()

    from dumo.config import load_config

    steps = args.steps or load_config(ROOT / "configs" / "toy" / "moons-dumo.yaml").train.steps
    args.out.mkdir(parents=True, exist_ok=True)
    jobs, results = [], []
    for _, config, value in settings():
        for seed in range(args.seeds):
            path = args.out / f"{config}-{value}-seed{seed}-steps{steps}.json"
            if path.exists():
                results.append(json.loads(path.read_text()))
            else:
                jobs.append({"config": config, "value": value, "seed": seed, "steps": steps, "path": str(path)})
    print(f"{len(results)} runs done before, {len(jobs)} to run with {args.workers} worker(s)", flush=True)
    with get_context("spawn").Pool(args.workers) as pool:
        for result in pool.imap_unordered(run_one, jobs):
            results.append(result)
            print(
                f"{result['config']:15s} {result['value']:<5} seed {result['seed']}: "
                f"1-NFE MMD {result['mmd_1nfe']:.4f} ({result['seconds']:.0f} s)",
                flush=True,
            )
    print(summarise(results, args.out, steps, args.seeds))
    draw(results, args.out)
    print(f"wrote {args.out / 'table.md'} and {args.out / 'figure.png'}")


if __name__ == "__main__":
    main()

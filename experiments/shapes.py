"""Text-to-image on the shapes world: a Flow Matching teacher, DuMo fine-tuned from it, DuMo and MeanFlow
from scratch, judged on the world's evaluation prompts (seen, and naming held-out colour-shape pairs).

    .venv/bin/python experiments/shapes.py compare --seeds 0 1 --out experiments/results/shapes
    .venv/bin/python experiments/shapes.py compare --seeds 0 1 --out DIR --table-only   # tabulate what exists
    .venv/bin/python experiments/shapes.py compare --out DIR --set model.name=TextDiT-XS/2  # all four on another net

Per seed: configs/shapes/fm.yaml (the teacher), dumo-from-fm.yaml from it (train.init_from), dumo.yaml and
meanflow.yaml; each a ``dumo train`` process with one CPU thread, ``--jobs`` at once (the teacher before
its student). A finished run is not trained again and an interrupted one resumes. Each run's scores are
kept in its folder (shapes-scores.json), so the table can be rebuilt at no cost. The table (results.md):
the judge's overall accuracy (the mean over the four prompt categories) on seen and held-out prompts,
``--per-prompt`` images per evaluation prompt (default 4: 748 images; sampling seed 0), mean +- std over the
training seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common

from dumo.cli.common import add_set_argument

ROOT = Path(__file__).resolve().parents[1]
SCORES = "shapes-scores.json"
EULER_STEPS = 50

#: run name -> config; the teacher comes first (its student starts from it)
CONFIGS = {"fm": "fm", "dumo-from-fm": "dumo-from-fm", "dumo": "dumo", "meanflow": "meanflow"}


def evaluations(guidance: float) -> dict[str, dict[str, dict]]:
    """Per run name, the named evaluations: nfe, and optionally method, head and guidance (default 1)."""
    few = {"1 NFE": {"nfe": 1}, "2 NFE": {"nfe": 2}}
    return {
        "fm": {
            f"{EULER_STEPS} NFE": {"nfe": EULER_STEPS, "method": "euler"},
            f"{EULER_STEPS} NFE, guidance {guidance:g}": {"nfe": EULER_STEPS, "method": "euler", "guidance": guidance},
        },
        "dumo-from-fm": {**few, f"v-head {EULER_STEPS} NFE": {"nfe": EULER_STEPS, "head": "v"}},
        "dumo": few,
        "meanflow": few,
    }


TITLES = {
    "fm": "FM teacher",
    "dumo-from-fm": "DuMo from FM",
    "dumo": "DuMo from scratch",
    "meanflow": "MeanFlow from scratch",
}


def train(config: Path, run_dir: Path, overrides: list[str], table_only: bool) -> Path:
    """``dumo train`` in its own process with one thread; a scored run is left as it is."""
    if (run_dir / SCORES).is_file() or table_only:
        return run_dir
    return common.run_training(config, run_dir, overrides)


def score(run_dir: Path, wanted: dict[str, dict], per_prompt: int) -> dict[str, dict[str, float]]:
    """{evaluation: {"seen": accuracy, "held_out": accuracy}} of the run's EMA weights, cached in the run."""
    import torch

    from dumo.data import Prompts
    from dumo.evaluation import shapes_accuracy
    from dumo.runs.layout import list_checkpoints
    from dumo.runs.loading import load_run

    path = run_dir / SCORES
    scores = json.loads(path.read_text()) if path.is_file() else {}
    if scores.get("per_prompt", 1) != per_prompt:  # scored with another number of images: score again
        scores = {}
    missing = {name: spec for name, spec in wanted.items() if name not in scores}
    if missing and list_checkpoints(run_dir):
        torch.set_num_threads(1)
        run = load_run(run_dir)
        prompts = Prompts(run.space.text_spec, run.config.text)
        for name, spec in missing.items():
            sample = dataclasses.replace(
                run.config.sample, guidance_scale=spec.get("guidance", 1.0), head=spec.get("head")
            )
            result = shapes_accuracy(
                run.model,
                run.objective_name,
                run.dataset,
                prompts,
                sample,
                (spec["nfe"],),
                0,
                spec.get("method", "auto"),
                per_prompt=per_prompt,
            )
            scores[name] = {split: result[f"{split}_{spec['nfe']}nfe"] for split in ("seen", "held_out")}
        scores["training"] = common.training_time(run_dir)
        scores["per_prompt"] = per_prompt
        path.write_text(json.dumps(scores, indent=1))
    return scores


def runs_of_seed(args: argparse.Namespace, seed: int) -> list:
    """The jobs of one seed: the teacher then its student, and the two runs from scratch."""
    config = ROOT / "configs" / "shapes"
    wanted = evaluations(args.guidance)

    def run(name: str, extra: list[str]):
        folder = args.out / f"{name}-s{seed}"
        overrides = [*args.set, f"train.seed={seed}", *extra]
        train(config / f"{CONFIGS[name]}.yaml", folder, overrides, args.table_only)
        return name, seed, score(folder, wanted[name], args.per_prompt) if folder.is_dir() else {}

    def teacher_and_student():
        teacher = run("fm", [])
        return [teacher, run("dumo-from-fm", [f"train.init_from={args.out / f'fm-s{seed}'}"])]

    return [teacher_and_student, lambda: [run("dumo", [])], lambda: [run("meanflow", [])]]


def relative_time(scores: list[dict], teacher_seconds: float | None) -> str:
    """Mean training time of runs over the teacher's (a ratio, so the table holds on any machine)."""
    if not scores or not teacher_seconds:
        return "-"
    return f"{sum(s['training']['seconds'] for s in scores) / len(scores) / teacher_seconds:.2f}"


def table(results: list[tuple[str, int, dict]], guidance: float) -> list[str]:
    """Mean +- std over seeds of the overall accuracy, per run and evaluation, and each run's training
    time over the teacher's (both means over the seeds)."""
    teachers = [scores["training"]["seconds"] for run, _, scores in results if run == "fm" and "training" in scores]
    teacher_seconds = sum(teachers) / len(teachers) if teachers else None
    lines = [
        "| model | sampling | seen | held-out | seeds | training time (x the teacher's) |",
        "|---|---|---|---|---|---|",
    ]
    for name, wanted in evaluations(guidance).items():
        of_name = [scores for run, _, scores in results if run == name]
        for evaluation in wanted:
            found = [scores[evaluation] for scores in of_name if evaluation in scores]
            if not found:
                continue
            seen = common.mean_std([s["seen"] for s in found], ".3f")
            held = common.mean_std([s["held_out"] for s in found], ".3f")
            shown = relative_time([s for s in of_name if "training" in s], teacher_seconds)
            lines.append(f"| {TITLES[name]} | {evaluation} | {seen} | {held} | {len(found)} | {shown} |")
    return lines


def compare(args: argparse.Namespace) -> None:
    jobs = [job for seed in args.seeds for job in runs_of_seed(args, seed)]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = [item for items in pool.map(lambda job: job(), jobs) for item in items]
    lines = [
        "# Shapes world: text-to-image accuracy (the shapes judge, overall = mean of the four categories)",
        "",
        f"    python experiments/shapes.py compare --seeds {' '.join(map(str, args.seeds))} --out {args.out}"
        + (f" --set {' '.join(args.set)}" if args.set else ""),
        "",
        *table(results, args.guidance),
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = parser.add_subparsers(dest="stage", required=True)
    stage = stages.add_parser("compare", help="train the four configs per seed and tabulate their accuracy")
    stage.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    stage.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "shapes")
    stage.add_argument("--jobs", type=int, default=2, help="runs at once (one CPU thread each; default 2)")
    stage.add_argument("--guidance", type=float, default=2.0, help="the teacher's guided row: CFG scale (default 2)")
    stage.add_argument("--per-prompt", type=int, default=4, help="images per evaluation prompt (default 4)")
    add_set_argument(stage)  # for every run, teacher and student alike (e.g. model.name=TextDiT-XS/2)
    stage.add_argument("--table-only", action="store_true", help="tabulate the runs that exist, train nothing")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    compare(args)


if __name__ == "__main__":
    main()

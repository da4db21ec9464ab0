"""Why plain-L2 DuMo fails from scratch on digits: one factor at a time, several seeds.

Every run starts from scratch with ``configs/digits/dumo.yaml`` in the paper's plain L2 (adaptive
weighting off, zeta 0, no clamp, the paper's stencil e = 0.005) and changes one factor: the stencil
width, the time distribution, beta, the batch size or the target network. The table gives, per
factor, the u-loss (one batch every ``--log-every`` steps, in train_log.csv) at its peak and at the
end, and the EMA weights' domain FD and class fidelity at 1 and 2 NFE at the end (1,000 samples),
as mean ± std over seeds.

    .venv/bin/python experiments/from_scratch.py factors --seeds 0 1 --steps 800 --jobs 2

Runs and scores are cached under ``--out`` (default experiments/results/from_scratch/digits), so a
stopped study continues where it stopped; ``--table-only`` tabulates the runs that exist.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import common
import from_teacher
from common import read_log
from from_teacher import PLAIN, ROOT, parallel, score, scores_file, train

from dumo.runs.layout import TRAIN_LOG

#: factor -> config overrides on top of the plain-L2 baseline
FACTORS = {
    "baseline (e 0.005, uniform t, beta 0.7, batch 64, theta- = theta)": [],
    "stencil e 0.05": ["objective.epsilon=0.05"],
    "time Beta(2.4, 2.4)": ["objective.time.theta1=2.4", "objective.time.theta2=2.4"],
    "time logit-normal(-0.4, 1)": ["objective.time.distribution=logit_normal"],
    "beta 0.9": ["objective.beta=0.9"],
    "batch 128": ["data.batch_size=128"],
    "theta- = EMA": ["objective.target_network=ema"],
}
EVALUATIONS = {"1 NFE": {"nfe": 1}, "2 NFE": {"nfe": 2}}


def folder_name(factor: str) -> str:
    return factor.split(" (")[0].replace(" ", "_").replace("=", "").replace(",", "").replace("(", "").replace(")", "")


def factors(args: argparse.Namespace) -> None:
    config = ROOT / "configs" / "digits" / "dumo.yaml"
    runs: dict[tuple[str, int], Path] = {}
    jobs = []
    for seed in args.seeds:
        for factor, extra in FACTORS.items():
            if args.only and folder_name(factor) not in args.only:
                continue
            folder = args.out / f"{folder_name(factor)}-s{seed}"
            runs[(factor, seed)] = folder
            if args.table_only:
                continue
            overrides = [
                *PLAIN,
                *extra,
                f"train.seed={seed}",
                f"train.steps={args.steps}",
                f"train.log_every={args.log_every}",
                f"train.checkpoint_every={args.steps}",
                "train.eval_every=0",
            ]
            jobs.append(lambda f=folder, o=overrides: score(train(config, f, o), EVALUATIONS))
    parallel(jobs, args.jobs)
    lines = [
        f"Plain-L2 DuMo on digits from scratch (configs/digits/dumo.yaml with adaptive weighting off, zeta 0, "
        f"e = 0.005 unless named), {args.steps} steps, seeds {' '.join(map(str, args.seeds))}: u-loss (one batch "
        f"every {args.log_every} steps) at its peak and at the end, and the EMA weights' domain FD / class "
        f"fidelity at the end ({from_teacher.NUM_SAMPLES} samples); mean ± std over seeds.",
        "",
        "| factor | seeds | peak u-loss | u-loss at end | FD 1 NFE | fidelity 1 NFE | FD 2 NFE | fidelity 2 NFE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for factor in FACTORS:
        done = [
            folder
            for (name, _), folder in runs.items()
            if name == factor and (folder / TRAIN_LOG).is_file() and scores_file(folder).is_file()
        ]
        if not done:
            continue
        losses = [read_log(folder, "loss_u") for folder in done]
        scores = [json.loads(scores_file(folder).read_text()) for folder in done]
        peak = [max(loss.values()) for loss in losses]
        end = [loss[max(loss)] for loss in losses]

        def column(key: str, scores: list[dict] = scores) -> str:
            return common.mean_std([s[key] for s in scores], ".3f")

        lines.append(
            f"| {factor} | {len(done)} | {common.mean_std(peak, '.3g')} | {common.mean_std(end, '.3g')} | "
            f"{column('1 NFE/fd')} | {column('1 NFE/fidelity')} | {column('2 NFE/fd')} | {column('2 NFE/fidelity')} |"
        )
    from_teacher.write(args.out / "factors.md", lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = parser.add_subparsers(dest="stage", required=True)
    stage = stages.add_parser("factors")
    stage.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "from_scratch" / "digits")
    stage.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    stage.add_argument("--steps", type=int, default=800)
    stage.add_argument("--log-every", type=int, default=50)
    stage.add_argument("--jobs", type=int, default=2, help="runs at once (one CPU thread each)")
    stage.add_argument("--only", nargs="+", help="only these factors, by run-folder name less -sSEED")
    stage.add_argument("--table-only", action="store_true", help="tabulate the runs that exist")
    args = parser.parse_args()
    from_teacher.TABLE_ONLY = args.table_only
    factors(args)


if __name__ == "__main__":
    main()

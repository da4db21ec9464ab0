"""dumo eval-snapshots: score every EMA snapshot of a run."""

from __future__ import annotations

import argparse
from pathlib import Path

from dumo.cli.common import DATA_SAMPLES, add_device_argument, add_inception_arguments, positive


def add_parser(subparsers) -> None:
    eval_snapshots = subparsers.add_parser(
        "eval-snapshots",
        help="score every EMA snapshot of a run (train.snapshot_steps), for a curve of quality against steps",
        description="Draw the same samples (seed, -n) from each RUN_DIR/snapshots/ema_step_*.safetensors and score "
        "them as 'dumo eval' does (2-D: MMD, sliced W2; images: domain FD, class fidelity; with --inception: FID "
        "and IS). The rows go to RUN_DIR/snapshots/scores.csv (step, nfe, metrics). One process.",
    )
    eval_snapshots.add_argument("run_dir", help="run directory written by 'dumo train' with snapshots")
    eval_snapshots.add_argument(
        "-n",
        "--num",
        type=positive("--num"),
        default=DATA_SAMPLES,
        help=f"samples per snapshot (default {DATA_SAMPLES})",
    )
    eval_snapshots.add_argument("--nfe", type=positive("--nfe"), nargs="+", default=[1], help="NFE (default 1)")
    eval_snapshots.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    eval_snapshots.add_argument("--batch-size", type=positive("--batch-size"), default=256, help="samples per call")
    add_inception_arguments(
        eval_snapshots, "reference statistics from 'dumo fid-stats' (default: --num of the run's training images)"
    )
    add_device_argument(eval_snapshots)
    eval_snapshots.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dumo.distributed import resolve_device
    from dumo.runs.layout import SCORES_FILE, SNAPSHOT_DIR
    from dumo.training.snapshots import score_snapshots

    device = resolve_device(args.device, option="--device")
    print(f"{args.run_dir}: EMA snapshots, {args.num} samples each, seed {args.seed}")
    score_snapshots(args.run_dir, args.nfe, args.num, args.seed, args.batch_size, str(device), args.inception, args.ref)
    print(f"scores: {Path(args.run_dir) / SNAPSHOT_DIR / SCORES_FILE}")
    return 0

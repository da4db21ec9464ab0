"""dumo train: train a model from a YAML config, or resume the run in --out."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dumo.cli.common import UsageError, add_set_argument


def add_parser(subparsers) -> None:
    train = subparsers.add_parser(
        "train",
        help="train a model from a YAML config",
        description="Train a model. If --out already holds this run (same config, except train.steps and "
        "logging cadence), training resumes from its latest checkpoint; a different run there is refused "
        "unless --overwrite. dumo marks its run folders with dumo-run.json, the list of what it wrote there; a "
        "non-empty folder without it is refused, and with --overwrite trained beside its files (none of them "
        "deleted or replaced). SIGINT/SIGTERM save a checkpoint and stop.",
    )
    train.add_argument("config", nargs="?", help="YAML config, e.g. configs/toy/moons-dumo.yaml")
    train.add_argument("--out", required=True, help="run directory for config, logs and checkpoints")
    train.add_argument(
        "--resume", action="store_true", help="continue the run in --out with its own config.yaml (CONFIG optional)"
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in --out even if it holds another run: deletes what dumo wrote there as its "
        "dumo-run.json lists it (config, logs, checkpoints, sample pictures, TensorBoard events, snapshots; "
        "history.txt is kept) and nothing else",
    )
    add_set_argument(train)
    train.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dumo.config import load_config
    from dumo.distributed import shutdown
    from dumo.runs.folder import is_dumo_run
    from dumo.runs.layout import CONFIG_FILE
    from dumo.training import train

    out = Path(args.out)
    if args.resume and args.overwrite:
        raise UsageError(
            "--resume and --overwrite contradict each other: --resume continues the run in --out, --overwrite "
            "deletes it to start afresh; give one of them"
        )
    if args.config is None and not args.resume:
        raise UsageError("CONFIG is required unless --resume continues the run in --out")
    if args.resume and not (out.is_dir() and is_dumo_run(out)):
        raise UsageError(f"--resume: {out} holds no run to resume; drop --resume to start a new run there")
    if args.config is None and not (out / CONFIG_FILE).is_file():
        raise UsageError(f"--resume: {out} holds no {CONFIG_FILE} to resume with; give the run's CONFIG")
    config = load_config(args.config or out / CONFIG_FILE, args.set)
    try:
        result = train(config, out, overwrite=args.overwrite)
    finally:
        shutdown()  # leave the process group torchrun set up, if any
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks for all
        print_result(result, config.train.steps)
    return result.exit_status


def print_result(result, steps: int) -> None:
    if result.already_done:
        print(f"already at step {result.step} (train.steps is {steps}): nothing to train; run: {result.run_dir}")
        return
    state = "interrupted" if result.interrupted else "finished"
    resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from is not None else ""
    print(f"{state} at step {result.step}{resumed} in {result.seconds:.1f} s; run: {result.run_dir}")
    if result.skipped_steps:
        print(f"  skipped {result.skipped_steps} steps (non-finite loss or gradient)")
    if result.interrupted:
        print(f"  not finished (exit status {result.exit_status}); rerun the same command to continue")
    for key, value in result.metrics.items():
        print(f"  {key:12s} {value:.5f}")
    if result.note:
        print(f"  note: {result.note}")

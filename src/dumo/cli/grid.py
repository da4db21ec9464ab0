"""dumo grid: fixed prompts drawn at a few NFE from each EMA snapshot of a run, as one labelled picture."""

from __future__ import annotations

import argparse
from pathlib import Path

from dumo.cli.common import add_device_argument, check_output_file, finite_non_negative, positive


def add_parser(subparsers) -> None:
    grid = subparsers.add_parser(
        "grid",
        help="a picture of training progress: prompts (rows) at each NFE from each EMA snapshot (columns)",
        description="Draw every prompt of --prompts (one a line) from each RUN_DIR/snapshots/ema_step_*.safetensors "
        "(or those of --steps) at each --nfe, and save one PNG: a row per prompt, a column per (snapshot, NFE), "
        "labelled with the prompts and steps. One seed for the whole grid, so a row draws the same noise in every "
        "column and only the weights and the NFE change along it. One process.",
    )
    grid.add_argument("run_dir", help="a text-to-image run written by 'dumo train' with snapshots")
    grid.add_argument("--prompts", required=True, metavar="FILE", help="text file of prompts, one a line (the rows)")
    grid.add_argument("--nfe", type=positive("--nfe"), nargs="+", default=[1, 2], help="NFE per snapshot (default 1 2)")
    grid.add_argument(
        "--steps", type=positive("--steps"), nargs="+", help="the snapshots' steps to show (default: every snapshot)"
    )
    grid.add_argument("--out", required=True, help="the picture (.png); an existing file is replaced with --force")
    grid.add_argument("--force", action="store_true", help="replace an existing --out")
    grid.add_argument("--seed", type=int, default=0, help="seed of the noise, the same in every column (default 0)")
    grid.add_argument(
        "--guidance",
        type=finite_non_negative("--guidance"),
        metavar="W",
        help="classifier-free guidance scale (two network passes per step; default: the config's)",
    )
    add_device_argument(grid)
    grid.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dumo.data.prompts import read_prompts
    from dumo.distributed import resolve_device
    from dumo.runs.snapshot_grid import draw_snapshot_grid, save_snapshot_grid

    out = Path(args.out).expanduser()
    check_output_file(out, (".png",), force=args.force)
    prompts = read_prompts(args.prompts)
    device = resolve_device(args.device, option="--device")
    print(f"{args.run_dir}: {len(prompts)} prompts at {' and '.join(map(str, args.nfe))} NFE, seed {args.seed}")
    grid = draw_snapshot_grid(args.run_dir, prompts, args.nfe, args.steps, args.seed, args.guidance, str(device))
    steps = sorted({step for step, _ in grid.columns})
    save_snapshot_grid(
        grid, out, title=f"{Path(args.run_dir).name}: EMA snapshots at steps {', '.join(map(str, steps))}"
    )
    print(f"grid: {out} ({len(prompts)} rows x {len(grid.columns)} columns)")
    return 0

"""dumo plan: estimate the cost of a config's run before starting it."""

from __future__ import annotations

import argparse

from dumo.cli.common import add_set_argument, positive


def add_parser(subparsers) -> None:
    plan = subparsers.add_parser(
        "plan",
        help="parameters, FLOPs, images/s, memory per GPU, days and GPU-hours of a config's run",
        description="Estimate a configured run before starting it, on the CPU in seconds: parameters, FLOPs per "
        "image per training step (counted on fake tensors: every pass of the objective), images/s and step time "
        "(a measured throughput from dumo/plan_table.yaml where it has one for this GPU, network, objective and "
        "precision; else the GPU's peak FLOP/s times an assumed MFU), memory per GPU under DDP and FSDP (states "
        "plus a rough activation estimate), and the days, GPU-hours and epochs of train.steps.",
    )
    plan.add_argument("config", help="YAML config, e.g. configs/imagenet256/dumo-xl2.yaml")
    plan.add_argument("--gpus", type=positive("--gpus"), default=1, help="number of GPUs (default 1)")
    plan.add_argument(
        "--gpu", default="h100", help="GPU kind from dumo/plan_table.yaml: h100 (default), h100-pcie, h200, a100"
    )
    plan.add_argument("--mfu", type=float, help="assume this MFU instead of the table's (a fraction, e.g. 0.4)")
    plan.add_argument(
        "--dataset-size",
        type=positive("--dataset-size"),
        help="training images per epoch (default: from the data, or the config's data.train_images)",
    )
    add_set_argument(plan)
    plan.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dumo.config import load_config
    from dumo.errors import ConfigError
    from dumo.network import is_diffusers
    from dumo.plan import format_plan, make_plan

    config = load_config(args.config, args.set)
    if is_diffusers(config):  # a released transformer: its published size, no folder needed
        from dumo.bridge.memory import format_bridge_plan
        from dumo.training.throughput import throughput_table

        table = throughput_table()["gpus"]
        if args.gpu not in table:
            raise ConfigError(f"unknown GPU kind {args.gpu!r}; the table knows {', '.join(table)}")
        entry = table[args.gpu]
        print(format_bridge_plan(config, args.gpus, float(entry["memory_gib"]), entry["name"], args.config))
        return 0
    plan = make_plan(config, args.gpus, args.gpu, args.mfu, args.dataset_size)
    print(format_plan(plan, args.config))
    return 0

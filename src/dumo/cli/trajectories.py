"""dumo trajectories: a picture of the same noise drawn at several NFE, by each head."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from dumo.cli.common import MAX_NFE, add_sampling_arguments, check_output_file, positive

TRAJECTORY_IMAGES = 8  # default rows of the trajectories figure of an image run
TRAJECTORY_PATHS = 32  # default paths per panel of the trajectories figure of a 2-D run


def add_parser(subparsers) -> None:
    trajectories = subparsers.add_parser(
        "trajectories",
        help="picture of samples against NFE, from the u-head and the v-head ODE",
        description="Draw the same noise with 1, 2, 4, 8, ... NFE. Images: one row per sample (labelled with its "
        "class), one column per (head, NFE), labelled. 2-D data: one row of panels per head, one column per NFE, "
        "over the data density; each noise point's path is a line through the sampler's states (v-head ODE: x at "
        "each step's time; u-head flow map: x at each time of the k-step schedule), from the noise to the sample.",
    )
    add_sampling_arguments(trajectories)
    trajectories.set_defaults(num=None)
    for action in trajectories._actions:
        if action.dest == "num":
            action.help = (
                f"samples (images: one row each, default {TRAJECTORY_IMAGES}; 2-D: paths per panel, "
                f"default {TRAJECTORY_PATHS})"
            )
        if action.dest == "method":
            action.help = "auto (default): every head with its own sampler (DuMo: the u-head's and the v-head's "
            "Euler); a named sampler draws only the head it reads (or --head)"
    trajectories.add_argument(
        "--nfe",
        type=positive("--nfe", MAX_NFE),
        nargs="+",
        default=[1, 2, 4, 8, 16],
        help="the NFE of each column (default 1 2 4 8 16)",
    )
    trajectories.add_argument("--out", required=True, help="output .png (replaced if it exists)")
    trajectories.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dumo.files import atomic_output
    from dumo.plotting import image_grid, paths_over_density
    from dumo.runs.loading import load_run
    from dumo.samplers import cost_label
    from dumo.sampling import balanced_labels, generate, head_draws, is_guided

    out = Path(args.out).expanduser()
    check_output_file(out, (".png",))
    run = load_run(args.run_dir, args.checkpoint, args.weights)
    run.choose_sampling(guidance=args.guidance, guidance_option="--guidance")
    draws = head_draws(run.model, run.objective_name, args.head, args.method, "--head", "--method")
    num = args.num or (TRAJECTORY_IMAGES if run.space.is_images else TRAJECTORY_PATHS)
    labels = balanced_labels(num, run.num_classes)
    guided = is_guided(run.config.sample, labels is not None)
    columns = {}  # (head, nfe) -> samples in the data's own space (2-D: every state of the sampler)
    costs = {}  # (head, nfe) -> "2 NFE", or under guidance the steps and passes
    for draw in draws:
        name, head, method = draw.label, draw.head, draw.method
        for nfe in args.nfe:
            states: list = []
            x = generate(
                run.model,
                run.objective_name,
                (num, *run.space.shape),
                nfe,
                dataclasses.replace(run.config.sample, head=head),
                args.seed,
                labels,
                method,
                path=None if run.space.is_images else states,
            )
            costs[name, nfe] = cost_label(nfe, method, guided)
            if run.space.is_images:
                columns[name, nfe] = run.space.unstandardise(x).numpy()
            else:
                columns[name, nfe] = np.stack([run.space.unstandardise(state).numpy() for state in states])
    if run.space.is_images:
        title = f"{run.objective_name}, step {run.step}: the same noise at each NFE"
        # one row per sample (its class on the left), one column per (head, NFE)
        grid = [columns[key][i] for i in range(num) for key in columns]
        column_titles = [f"{name}\n{costs[name, nfe]}" for name, nfe in columns]
        rows = [run.space.class_name(int(c)) for c in labels] if labels is not None else None
        with atomic_output(out) as tmp:
            image_grid(
                np.stack(grid),
                None,
                tmp,
                title=title,
                columns=len(columns),
                column_titles=column_titles,
                row_titles=rows,
            )
    else:
        # one row per head, one column per NFE: each noise point's path through the sampler's states
        title = f"{run.objective_name}, step {run.step}: {num} paths from noise (grey) to sample (red)"
        reference = run.space.reference_points(50_000)
        panels = [(f"{name}, {costs[name, nfe]}", states) for (name, nfe), states in columns.items()]
        with atomic_output(out) as tmp:
            paths_over_density(panels, reference.numpy(), tmp, columns=len(args.nfe), title=title)
    passes = f", each 2 network passes with guidance {run.config.sample.guidance_scale}" if guided else ""
    print(
        f"wrote trajectories ({', '.join(draw.label for draw in draws)}; NFE {', '.join(map(str, args.nfe))}{passes}) "
        f"to {out}"
    )
    return 0

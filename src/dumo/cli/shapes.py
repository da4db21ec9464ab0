"""dumo shapes (render prompts of the shapes world, write its evaluation prompts) and dumo eval-shapes
(judge images against their prompts)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dumo.cli.common import Parser, UsageError, check_output_file, positive
from dumo.runs.generation import read_pixels


def add_parser(subparsers) -> None:
    held_out_help = 'held-out colour-shape pairs (default "yellow triangle,purple circle,green square"; "" for none)'
    default_held_out = "yellow triangle,purple circle,green square"
    shapes = subparsers.add_parser(
        "shapes",
        help="the shapes world: render prompts to images, or write its evaluation prompts",
        description="The shapes world: 32x32 images of coloured circles, squares and triangles on black, drawn "
        "from their prompts ('a red circle', 'a red circle and a blue square', 'three red circles', 'a red circle "
        "left of a blue square'). 'render' draws one image per line of a prompts file (image i from the seed and "
        "i); 'prompts' writes the fixed evaluation set, seen prompts then held-out ones. Judge images with "
        "'dumo eval-shapes'.",
    )
    actions = shapes.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=Parser)
    render = actions.add_parser("render", help="render a prompts file into a samples .npz (uint8 arr_0, NHWC)")
    render.add_argument("--prompts", required=True, help="text file, one prompt a line")
    render.add_argument("--seed", type=int, default=0, help="seed (>= 0, default 0)")
    render.add_argument("--out", required=True, help="output .npz")
    render.add_argument("--force", action="store_true", help="replace --out if it exists (default: refuse)")
    prompts = actions.add_parser("prompts", help="write the evaluation prompts (seen, then held-out) to a text file")
    prompts.add_argument("--out", required=True, help="output .txt")
    prompts.add_argument(
        "--per-category",
        type=positive("--per-category"),
        default=32,
        help="prompts per category and split (default 32; fewer where a category has fewer)",
    )
    prompts.add_argument("--seed", type=int, default=0, help="seed of the choice of prompts (>= 0, default 0)")
    prompts.add_argument("--held-out", default=default_held_out, help=held_out_help)
    prompts.add_argument("--force", action="store_true", help="replace --out if it exists (default: refuse)")
    shapes.set_defaults(handler=run)

    eval_shapes = subparsers.add_parser(
        "eval-shapes",
        help="judge images of the shapes world against their prompts (GenEval-style accuracy)",
        description="Judge image i of SAMPLES against line i of PROMPTS: its objects (found by palette colour, "
        "shape from their geometry) must be exactly those named, with the named relation. Prints the fraction "
        "passed per category (single, two_objects, counting, position) and their mean (overall), for prompts "
        "that name no held-out pair (seen), those that do (held-out) and all.",
    )
    eval_shapes.add_argument("samples", help="samples .npz (uint8 'arr_0' (N, 32, 32, 3), as 'dumo sample' writes)")
    eval_shapes.add_argument("prompts", help="text file, one prompt a line, one line per image")
    eval_shapes.add_argument("--held-out", default=default_held_out, help=held_out_help)
    eval_shapes.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """dumo shapes (render, prompts) or dumo eval-shapes, by the command's name."""
    return run_shapes(args) if args.command == "shapes" else run_eval_shapes(args)


def run_shapes(args: argparse.Namespace) -> int:
    from dumo.data.shapes import evaluation_prompts, parse_held_out, read_prompt_file, render_prompts
    from dumo.files import atomic_output

    out = Path(args.out).expanduser()
    if args.action == "render":
        check_output_file(out, (".npz",), force=args.force)
        images = render_prompts(read_prompt_file(args.prompts), args.seed)
        with atomic_output(out) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, arr_0=images)
        print(f"wrote {len(images)} images of {args.prompts} (seed {args.seed}) to {out}")
        return 0
    check_output_file(out, (".txt",), force=args.force)
    prompts = evaluation_prompts(parse_held_out(args.held_out), args.per_category, args.seed)
    with atomic_output(out) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in prompts.seen + prompts.held_out))
    print(f"wrote {len(prompts.seen)} seen and {len(prompts.held_out)} held-out prompts to {out}")
    return 0


def run_eval_shapes(args: argparse.Namespace) -> int:
    from dumo.data.shapes import parse_held_out, read_prompt_file
    from dumo.metrics.shapes import judge

    prompts = read_prompt_file(args.prompts)
    count, pixels = read_pixels(args.samples, None)
    images = pixels(slice(0, count)).permute(0, 2, 3, 1).numpy()
    if images.shape[3] != 3 or count != len(prompts):
        raise UsageError(
            f"{args.samples} holds {count} images with {images.shape[3]} channel(s); the judge needs one RGB image "
            f"per line of {args.prompts} ({len(prompts)}), in order"
        )
    print(judge(images, prompts, parse_held_out(args.held_out)).format())
    return 0

"""dumo sample: draw samples from a run into a .npy, .npz, .png or a folder of PNGs."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import numpy as np

from dumo.cli.common import (
    DATA_SAMPLES,
    MAX_NFE,
    UsageError,
    add_decode_argument,
    add_sampling_arguments,
    check_output_file,
    check_png_folder,
    parse_times,
    positive,
    sampling_session,
)
from dumo.runs.generation import generate_from_run, sample_labels, stream_from_run

PICTURE_SAMPLES = 64  # default -n for a .png grid (2000 tiles would be a 1100 x 24000 px picture)
PROMPT_SAMPLES = 16  # default -n for one --prompt


def add_parser(subparsers) -> None:
    sample = subparsers.add_parser(
        "sample",
        help="draw samples from a trained run",
        description="Draw samples with the run's EMA weights (a run folder or an export: no training data needed). "
        "For 2-D data: FILE.npy holds an (N, 2) array in the dataset's own coordinates; FILE.png shows the samples "
        f"over the data density. For images: FILE.npz holds 'images' (N, C, H, W) float32 in [0, 1], 'labels' (N,) "
        "int64 (-1: unconditional) and 'arr_0' (N, H, W, C) uint8 (what DiT/SiT/ADM FID scripts read); FILE.png is "
        f"a labelled grid (default -n {PICTURE_SAMPLES}); a path without suffix becomes a folder of PNGs "
        "(000000.png, ... by sample index, and labels.csv). The file is written to a temporary name and renamed, so "
        "an interrupted write leaves nothing half-written. Under torchrun each rank draws, decodes and writes its "
        "own chunks: a .npz is written as one part file per rank beside it (as much disk as the .npz, on a "
        "filesystem all ranks share) that rank 0 then copies in order into FILE.npz, one chunk (--batch-size "
        "samples) in memory at a time; no rank holds all samples.",
    )
    add_sampling_arguments(sample)
    add_decode_argument(sample)
    sample.set_defaults(num=None)
    sample.add_argument(
        "--nfe", type=positive("--nfe", MAX_NFE), required=True, help=f"network evaluations per sample (1 to {MAX_NFE})"
    )
    sample.add_argument(
        "--out",
        required=True,
        help="output: .npy (2-D) / .npz (images) or .png, or for images a folder (no suffix) of one PNG per sample; "
        "missing folders are created",
    )
    sample.add_argument(
        "--force",
        action="store_true",
        help="replace --out if it exists (default: refuse); a folder of PNGs is replaced as a whole, and only "
        "if it holds nothing but dumo's PNGs and labels.csv",
    )
    sample.add_argument(
        "--uint8",
        action="store_true",
        help="a .npz with only 'arr_0' and 'labels', the ADM layout, a quarter of the size without the float32 "
        "'images' (50,000 samples at 256 px: 9.8 GB instead of 49 GB)",
    )
    sample.add_argument(
        "--times", help="k-step times t_0,...,t_{k-1} in (0, 1], decreasing, e.g. 1.0,0.4 (default: config schedule)"
    )
    sample.add_argument(
        "--class",
        dest="class_label",
        metavar="CLASS",
        help="class to sample, by index or by name (an image folder's subfolder) (default: balanced over classes)",
    )
    sample.add_argument(
        "--prompt",
        metavar="TEXT",
        help=f'a text-to-image run: draw -n images (default {PROMPT_SAMPLES}) of this prompt, e.g. "a red circle"',
    )
    sample.add_argument(
        "--prompts",
        metavar="FILE",
        help="a text-to-image run: draw --per-prompt images of each line of FILE (one prompt a line), in line "
        "order; a .npz also holds them as 'prompts', a folder of PNGs as prompts.txt",
    )
    sample.add_argument(
        "--per-prompt",
        type=positive("--per-prompt"),
        metavar="K",
        help="with --prompts: K images of each prompt, one after the other (default 1)",
    )
    sample.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dumo.distributed import shutdown
    from dumo.files import atomic_output
    from dumo.plotting import image_grid, scatter_over_density
    from dumo.runs.sample_files import PngFolder, label_array, npz_sink, sample_npz
    from dumo.sampling import sampling_cost

    out = Path(args.out).expanduser()
    dist, run = sampling_session(args)
    try:
        images = run.space.is_images
        check_output_file(out, (".npz", ".png") if images else (".npy", ".png"), folder_ok=images, force=args.force)
        picture = out.suffix.lower() == ".png"
        png_folder = images and out.suffix == ""
        if png_folder:
            check_png_folder(out, "--out")
        if args.uint8 and out.suffix.lower() != ".npz":
            if not (picture or png_folder):
                raise UsageError(f"--uint8 writes a .npz only; {out} gets the float coordinates of 2-D samples")
            if dist.is_main:
                print("dumo: warning: --uint8 shapes a .npz only; PNGs are 8-bit anyway: ignored", file=sys.stderr)
        label = class_index(run, args.class_label)
        texts = prompt_texts(args, run)
        num = len(texts) if texts else args.num or (PICTURE_SAMPLES if picture and images else DATA_SAMPLES)
        # "2 NFE", or under guidance the steps and passes; it also refuses a sampler unfit for the model
        cost = sampling_cost(run.model, run.objective_name, args.nfe, run.config.sample, args.method, run.conditional)
        ranks = f" on {dist.world_size} processes" if dist.enabled else ""
        if images and not picture:
            # a .npz or a folder of PNGs: every rank writes its own chunks as it decodes them
            labels = sample_labels(run, num, label) if texts is None else run.prompt_condition(texts)
            if png_folder:
                classes = label_array(labels, num) if run.num_classes else None
                writer = PngFolder(out, dist, classes, run.space, texts)
                sinks = [writer.sink]
            else:
                writer = sample_npz(
                    out, run, num, args.batch_size, labels, dist, float_images=not args.uint8, prompts=texts
                )
                sinks = [npz_sink(writer, float_images=not args.uint8)]
            dist.barrier()  # every rank has checked --out before any writes to it
            method, times = args.method, parse_times(args.times)
            try:
                stream_from_run(
                    run,
                    args.nfe,
                    num,
                    args.seed,
                    method,
                    times,
                    labels,
                    args.batch_size,
                    args.decode_batch,
                    dist,
                    sinks,
                )
                writer.finish()
            except BaseException:
                writer.abort()  # nothing half-written is left beside --out
                raise
            if dist.is_main:
                print(f"wrote {num} samples ({cost}, step {run.step}) to {out}{ranks}")
            return 0
        labels, points = generate_from_run(
            run, args.nfe, num, args.seed, args.method, parse_times(args.times), label, args.batch_size, dist, texts
        )
        if not dist.is_main:
            return 0
        data = run.space.unstandardise(points).numpy()
        title = f"{run.objective_name}, step {run.step}, {cost}"
        if picture and images:
            if texts is not None:
                names = [textwrap.fill(text, 18) for text in texts]
            else:
                names = None if labels is None else [run.space.class_name(int(c)) for c in labels]
            with atomic_output(out) as tmp:
                image_grid(data, names, tmp, title=title, columns=8)
        elif picture:
            reference = run.space.reference_points(50_000)
            with atomic_output(out) as tmp:
                scatter_over_density([(title, data)], reference.numpy(), tmp)
        else:
            with atomic_output(out) as tmp:
                np.save(tmp, data.astype(np.float64))
        print(f"wrote {num} samples ({cost}, step {run.step}) to {out}{ranks}")
        return 0
    finally:
        shutdown()


def prompt_texts(args: argparse.Namespace, run) -> list[str] | None:
    """The prompt of each sample, in order (--prompt, or --prompts with --per-prompt), checked against
    the run: prompts for a text-to-image run only, and a text-to-image run needs them."""
    from dumo.data.prompts import read_prompts

    given = "--prompt" if args.prompt is not None else "--prompts" if args.prompts is not None else None
    if args.prompt is not None and args.prompts is not None:
        raise UsageError("give --prompt or --prompts, not both")
    if given is None:
        if args.per_prompt is not None:
            raise UsageError("--per-prompt goes with --prompts FILE")
        if run.is_text:
            raise UsageError("this run draws images of prompts: give --prompt TEXT or --prompts FILE")
        return None
    if not run.is_text:
        kind = "class-conditional (use --class)" if run.num_classes else "unconditional"
        raise UsageError(f"{given}: this run is {kind}; it reads no prompts")
    if args.prompt is not None:
        if args.per_prompt is not None:
            raise UsageError("--per-prompt goes with --prompts FILE; with --prompt give -n")
        if not args.prompt.strip():
            raise UsageError("--prompt is empty")
        return [" ".join(args.prompt.split())] * (args.num or PROMPT_SAMPLES)
    if args.num is not None:
        raise UsageError("-n does not go with --prompts: each line is drawn --per-prompt times (default 1)")
    return [line for line in read_prompts(args.prompts) for _ in range(args.per_prompt or 1)]


def class_index(run, text: str | None) -> int | None:
    """``--class`` as an index (3) or a class name (cat), checked against the model."""
    if text is None:
        return None
    if run.is_text:
        raise UsageError("--class: this run is conditioned on prompts; give --prompt TEXT or --prompts FILE")
    if run.num_classes == 0:
        raise UsageError("--class given but the model is unconditional")
    label = run.space.class_label(text)
    if not 0 <= label < run.num_classes:
        raise UsageError(f"--class must be in [0, {run.num_classes - 1}]; got {label}")
    return label

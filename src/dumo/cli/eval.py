"""dumo eval: score samples of a run against its data (and with --inception: FID and IS)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from dumo.cli.common import (
    UsageError,
    add_decode_argument,
    add_inception_arguments,
    add_sampling_arguments,
    check_png_folder,
    inception_line,
    positive,
    sampling_session,
)
from dumo.runs.generation import check_memory, sample_labels, stream_from_run

EVAL_MINIMUM = 2  # every score of dumo eval needs two samples: a covariance (FD, FID) or MMD's pairs


def add_parser(subparsers) -> None:
    evaluate = subparsers.add_parser(
        "eval",
        help="score a trained run (2-D: MMD, sliced Wasserstein; images: domain FD, class fidelity)",
        description="Score samples of a run against the data. 2-D: MMD (multi-bandwidth RBF) and sliced "
        "Wasserstein-2 on standardised coordinates. Images: Frechet distance in the features of a small "
        "classifier trained once on the dataset (cached), and for class-conditional runs the classifier's "
        "accuracy on the requested classes. With --inception: FID and Inception Score; under torchrun each rank "
        "draws its own chunks, decodes and scores them --decode-batch at a time on its GPU, and only the feature "
        "sums (float64) are added across ranks, so 50,000 ImageNet-size samples need no more memory than a batch. "
        "The scores depend on the seed and --batch-size, not on the number of processes.",
    )
    add_sampling_arguments(evaluate)
    add_decode_argument(evaluate)
    evaluate.add_argument(
        "--nfe", type=positive("--nfe"), nargs="+", default=[1, 2], help="one or more NFE (default 1 2)"
    )
    add_inception_arguments(
        evaluate, "reference statistics from 'dumo fid-stats' (default: --num of the run's own training images)"
    )
    evaluate.add_argument(
        "--npz",
        metavar="FILE.npz",
        help="also write the scored images (one --nfe) as 'arr_0' (N, H, W, C) uint8 and 'labels', the layout of the "
        "ADM evaluation suite; each rank writes a part file beside it and rank 0 copies them in order, one chunk in "
        "memory at a time (the parts take as much disk as the .npz, on a filesystem every rank can write to)",
    )
    evaluate.add_argument(
        "--png-dir",
        metavar="FOLDER",
        help="also write the scored images (one --nfe) as 000000.png, ... by sample index (and labels.csv); a "
        "folder written before is replaced as a whole, and only if it holds nothing but such files",
    )
    evaluate.add_argument("--json", metavar="FILE.json", help="also write the scores as JSON (by rank 0)")
    evaluate.add_argument(
        "--prompts",
        metavar="FILE",
        help="a run trained on the shapes world: judge one image per line of FILE (prompts of the world's grammar) "
        "instead of its evaluation prompts (the default; -n does not apply); accuracy per category and overall, "
        "for prompts naming no held-out pair (seen) and those that do (held-out)",
    )
    evaluate.add_argument(
        "--per-prompt",
        type=positive("--per-prompt"),
        default=1,
        metavar="K",
        help="with a shapes run: K images of each prompt (default 1)",
    )
    evaluate.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from dumo.data import ToyDataset
    from dumo.distributed import shutdown
    from dumo.evaluation import image_scorer, toy_scorer
    from dumo.runs.sample_files import PngFolder, label_array, npz_sink, sample_npz
    from dumo.sampling import ChunkGather, sampling_cost
    from dumo.training.logs import small_data_note

    dist, run = sampling_session(args)
    try:
        if run.is_text or args.prompts is not None:
            return judge_prompts(args, dist, run)
        latent = run.space.kind == "latents"  # its training latents are not read: they can be large
        if latent and args.inception is None:
            raise UsageError("a latent-space run is scored with Inception metrics: give --inception (and --ref)")
        if (args.npz or args.png_dir) and len(args.nfe) != 1:
            raise UsageError("--npz and --png-dir keep the samples of one NFE; give one --nfe")
        if (args.npz or args.png_dir) and not run.space.is_images:
            raise UsageError("--npz and --png-dir write images; this run draws 2-D points (use 'dumo sample')")
        if args.num < EVAL_MINIMUM:
            metric = "FID" if latent else "MMD" if run.space.kind == "toy" else "domain FD"
            raise UsageError(f"-n {args.num}: {metric} needs at least {EVAL_MINIMUM} samples")
        # each NFE as shown ("2 NFE", or the steps and passes under guidance); an unfit sampler is refused here
        costs = {
            nfe: sampling_cost(run.model, run.objective_name, nfe, run.config.sample, args.method, run.num_classes > 0)
            for nfe in args.nfe
        }
        npz = None if args.npz is None else Path(args.npz).expanduser()
        png_dir = None if args.png_dir is None else Path(args.png_dir).expanduser()
        if npz is not None:
            check_sample_output(npz, "--npz", folder=False)
        if png_dir is not None:
            check_sample_output(png_dir, "--png-dir", folder=True)
            check_png_folder(png_dir, "--png-dir")
        if not latent:  # the domain metrics score all samples at once on rank 0: meant for small data
            size = math.prod(run.space.shape) * 4
            check_memory(3 * args.num * size, f"{args.num} samples gathered for the domain metrics")
        score = None
        if dist.is_main and not latent:  # the small domain metrics: rank 0 scores the gathered samples
            scorer = toy_scorer if isinstance(run.dataset, ToyDataset) else image_scorer
            score = scorer(run.dataset, args.num)
            note = small_data_note(run.dataset)
            if note:
                print(f"note: {note}")
        inception, reference = None, None
        if args.inception is not None:
            inception, reference = inception_reference(args, run, dist)
        if dist.is_main:
            shown = f"{run.objective_name}, step {run.step}, {args.num} samples, seed {args.seed}"
            print(f"{args.run_dir}: {shown}" + (f", {dist.world_size} processes" if dist.enabled else ""))
        names = {"mmd": "MMD", "sw": "SW", "fd": "domain FD", "fidelity": "class fidelity"}
        results = {}
        for nfe in args.nfe:
            labels = sample_labels(run, args.num, None)
            gather = None if latent else ChunkGather(args.num, run.space.shape, args.batch_size, dist, run.device)
            streamed, image_sinks, writer, png_writer = None, [], None, None
            if inception is not None:
                from dumo.metrics.fid_stats import inception_scores

                streamed = inception_scores(inception, args.num)

                def add_to_scores(first, images, pixels, streamed=streamed):
                    # the float images: a non-finite one is refused by number, not scored as black pixels
                    streamed.add(images, torch.arange(first, first + images.shape[0]))

                image_sinks.append(add_to_scores)
            if npz is not None:
                writer = sample_npz(npz, run, args.num, args.batch_size, labels, dist, float_images=False)
                image_sinks.append(npz_sink(writer, float_images=False))
            if png_dir is not None:
                png_labels = None if labels is None else label_array(labels, args.num)
                png_writer = PngFolder(png_dir, dist, png_labels, run.space)
                image_sinks.append(png_writer.sink)
            try:
                stream_from_run(
                    run,
                    nfe,
                    args.num,
                    args.seed,
                    args.method,
                    None,
                    labels,
                    args.batch_size,
                    args.decode_batch,
                    dist,
                    image_sinks,
                    [] if gather is None else [gather.add],
                )
                points = None if gather is None else gather.result().cpu()
                if streamed is not None:
                    streamed.reduce(dist)
                if writer is not None:
                    writer.finish()
                if png_writer is not None:
                    png_writer.finish()
            except BaseException:
                for unfinished in (writer, png_writer):
                    if unfinished is not None:
                        unfinished.abort()  # nothing half-written is left beside the outputs
                raise
            if not dist.is_main:
                continue
            metrics = {} if score is None else score(points, labels)
            shown = "  ".join(f"{names[k]} {v:.5f}" for k, v in metrics.items())
            if streamed is not None:
                scores = streamed.scores(reference)
                metrics.update(scores)
                shown = f"{shown}  {inception_line(scores)}".strip()
            results[str(nfe)] = metrics
            print(f"  {costs[nfe]:>7}  {shown}")
        if args.json is not None and dist.is_main:
            from dumo.files import atomic_output

            record = {
                "run": str(args.run_dir),
                "step": run.step,
                "num": args.num,
                "seed": args.seed,
                "processes": dist.world_size,
                "guidance_scale": run.config.sample.guidance_scale if run.num_classes else None,
                "nfe": results,
            }
            with atomic_output(Path(args.json).expanduser()) as tmp:
                tmp.write_text(json.dumps(record, indent=2) + "\n")
        if dist.is_main and (npz is not None or png_dir is not None):
            print(f"  samples: {', '.join(str(p) for p in (npz, png_dir) if p is not None)}")
        return 0
    finally:
        shutdown()


def judge_prompts(args: argparse.Namespace, dist, run) -> int:
    """dumo eval of a run trained on the shapes world: the shapes judge on its evaluation prompts
    (or --prompts), each NFE, seen and held-out prompts apart."""
    import json

    from dumo.data.shapes import evaluation_prompts, read_prompt_file
    from dumo.metrics.inception import to_uint8
    from dumo.metrics.shapes import judge
    from dumo.runs.generation import generate_from_run
    from dumo.sampling import sampling_cost

    if not run.is_text:
        kind = "class-conditional" if run.num_classes else "unconditional"
        raise UsageError(f"--prompts: this run is {kind}; it reads no prompts")
    if run.space.name != "shapes":
        raise UsageError(
            f"dumo eval judges runs trained on the shapes world; this run was trained on {run.space.name}: draw "
            "images with 'dumo sample --prompts' and score them with a metric of your own"
        )
    for option in ("inception", "npz", "png_dir"):
        if getattr(args, option) is not None:
            raise UsageError(f"--{option.replace('_', '-')} does not apply to the shapes judge; use 'dumo sample'")
    held_out = run.config.data.held_out_pairs()
    if args.prompts is not None:
        lines = read_prompt_file(args.prompts)
    else:
        chosen = evaluation_prompts(held_out)
        lines = chosen.seen + chosen.held_out
    texts = [line for line in lines for _ in range(args.per_prompt)]
    if dist.is_main:
        source = args.prompts or "the evaluation prompts"
        print(
            f"{args.run_dir}: {run.objective_name}, step {run.step}, {len(texts)} images of {source}, seed {args.seed}"
        )
    results, failures = {}, {}
    for nfe in args.nfe:
        cost = sampling_cost(run.model, run.objective_name, nfe, run.config.sample, args.method, True)
        _, points = generate_from_run(
            run, nfe, len(texts), args.seed, args.method, None, None, args.batch_size, dist, texts
        )
        if not dist.is_main:
            continue
        images = to_uint8(run.space.unstandardise(points)).permute(0, 2, 3, 1).numpy()
        report = judge(images, texts, held_out)
        results[str(nfe)] = report.scores()
        failures[str(nfe)] = {split: report.failure_counts(split) for split in ("seen", "held_out", "all")}
        print(f"  {cost}")
        print("    " + report.format().replace("\n", "\n    "))
    if args.json is not None and dist.is_main:
        from dumo.files import atomic_output

        record = {
            "run": str(args.run_dir),
            "step": run.step,
            "images": len(texts),
            "seed": args.seed,
            "guidance_scale": run.config.sample.guidance_scale,
            "nfe": results,
            "failures": failures,  # per NFE and split: images failed, by the first rule broken
        }
        with atomic_output(Path(args.json).expanduser()) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
    return 0


def check_sample_output(path: Path, option: str, folder: bool) -> None:
    """--npz / --png-dir of dumo eval: a .npz file (replaced if it exists) or a folder."""
    if folder and path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is a file; name a folder for the PNGs")
    if not folder and (path.is_dir() or path.suffix.lower() != ".npz"):
        raise UsageError(f"{option} {path}: name a file ending in .npz")
    try:
        (path if folder else path.parent).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{option} {path}: cannot create the folder: {error.strerror}") from None


def inception_reference(args: argparse.Namespace, run, dist):
    """The Inception network (on every rank) and the reference statistics: --ref, or the Inception
    statistics of --num of the run's own training images, shared among the ranks."""
    from dumo.metrics.inception import InceptionNetwork, Statistics

    inception = InceptionNetwork(args.inception, run.device)
    if args.ref is not None:
        return inception, Statistics.load(args.ref)
    if run.space.kind == "latents":
        raise UsageError("--ref is required for a latent-space run (make it with 'dumo fid-stats' on the images)")
    from dumo.evaluation import reference_images
    from dumo.metrics.fid_stats import image_statistics
    from dumo.metrics.inception import to_uint8

    images = reference_images(run.dataset, args.num)
    return inception, image_statistics(inception, len(images), lambda part: to_uint8(images[part]), dist, 100)

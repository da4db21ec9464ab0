"""dumo fid-stats (Inception reference statistics) and dumo fid (FID and IS of a samples .npz)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dumo.cli.common import add_device_argument, check_output_file, inception_line, positive
from dumo.runs.generation import read_pixels


def add_parser(subparsers) -> None:
    fid_stats = subparsers.add_parser(
        "fid-stats",
        help="Inception reference statistics (mu, sigma) of a dataset or of a samples .npz",
        description="Write STATS.npz with 'mu' (2048,) and 'sigma' (2048, 2048) of Inception-v3 pool features "
        "(torch-fidelity's network), the layout pytorch-fid and torch-fidelity read.",
    )
    fid_stats.add_argument("source", help="a config file or run directory (its image dataset), or a samples .npz")
    fid_stats.add_argument("--inception", metavar="WEIGHTS", required=True, help="local Inception-v3 weights")
    fid_stats.add_argument("--out", required=True, help="output .npz")
    fid_stats.add_argument("--num", type=positive("--num"), help="images to use (default: all)")
    add_inception_batch_argument(fid_stats)
    add_device_argument(fid_stats)
    fid_stats.set_defaults(handler=run)

    fid = subparsers.add_parser(
        "fid",
        help="FID and Inception Score of a samples .npz against reference statistics",
        description="Score the images of a .npz written by 'dumo sample' or an ADM-style sample file (e.g. 50,000 of "
        "them) against STATS.npz from 'dumo fid-stats'. The file is memory-mapped and read a batch at a time; under "
        "torchrun each rank scores its share of the batches.",
    )
    fid.add_argument(
        "samples", help="samples .npz: a uint8 'arr_0' (N, H, W, C), or 'images' (N, C, H, W) float in [0, 1]"
    )
    fid.add_argument("--ref", required=True, metavar="STATS.npz", help="reference statistics")
    fid.add_argument("--inception", metavar="WEIGHTS", required=True, help="local Inception-v3 weights")
    add_inception_batch_argument(fid)
    add_device_argument(fid)
    fid.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """dumo fid-stats or dumo fid, by the command's name."""
    return run_fid_stats(args) if args.command == "fid-stats" else run_fid(args)


def run_fid_stats(args: argparse.Namespace) -> int:
    from dumo.distributed import shutdown
    from dumo.metrics.fid_stats import image_statistics

    out = Path(args.out)
    check_output_file(out, (".npz",))
    count, pixels = read_pixels(args.source, args.num)
    dist, inception = inception_session(args)
    try:
        statistics = image_statistics(inception, count, pixels, dist, args.batch_size)
        if dist.is_main:
            statistics.save(out)
            print(f"wrote Inception statistics of {count} images from {args.source} to {out}")
        return 0
    finally:
        shutdown()


def run_fid(args: argparse.Namespace) -> int:
    import torch

    from dumo.distributed import shutdown
    from dumo.metrics.fid_stats import inception_scores, rank_batches
    from dumo.metrics.inception import Statistics

    count, pixels = read_pixels(args.samples, None)
    reference = Statistics.load(args.ref)
    dist, inception = inception_session(args)
    try:
        streamed = inception_scores(inception, count)
        for part in rank_batches(count, args.batch_size, dist):
            streamed.add(pixels(part), torch.arange(part.start, part.stop))
        streamed.reduce(dist)
        if dist.is_main:
            print(f"{args.samples}: {count} images  {inception_line(streamed.scores(reference))}")
        return 0
    finally:
        shutdown()


def inception_session(args: argparse.Namespace):
    """torchrun's process group, if any, and the Inception network on this rank's device."""
    from dumo.distributed import from_environment, resolve_device
    from dumo.metrics.inception import InceptionNetwork

    dist = from_environment()
    device = resolve_device(args.device, dist.local_rank, option="--device")
    return dist, InceptionNetwork(args.inception, device, batch_size=args.batch_size)


def add_inception_batch_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batch-size", type=positive("--batch-size"), default=100, help="images per Inception call (default 100)"
    )

"""dumo encode: encode an image dataset once into a folder of latent shards."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dumo.cli.common import UsageError, positive


def add_parser(subparsers) -> None:
    encode = subparsers.add_parser(
        "encode",
        help="encode an image dataset once into latents (SD-VAE or DC-AE from a local folder)",
        description="Encode every image (and its horizontal mirror, unless --no-flip) with diffusers' AutoencoderKL "
        "(sd-vae) or AutoencoderDC (dc-ae), loaded from a local folder (nothing is downloaded), into a folder of "
        "safetensors shards (shard k: images [k*S, (k+1)*S) of the sorted list) and an index.json. Latents are "
        "stored already multiplied by the autoencoder's scaling factor; train on them with data.name=latents, "
        "data.path=FOLDER. Under torchrun (torchrun --nproc_per_node=N -m dumo encode ...) the ranks share the "
        "shards, each on its own device; a rerun skips the shards already written.",
    )
    encode.add_argument(
        "--data", required=True, choices=("digits", "fashion_mnist", "mnist", "cifar10", "image_folder")
    )
    encode.add_argument("--data-path", help="where the dataset's files are (default: its usual location)")
    encode.add_argument("--resolution", type=positive("--resolution"), help="image_folder: centre-crop size (ADM)")
    encode.add_argument("--kind", required=True, choices=("sd-vae", "dc-ae"), help="autoencoder family")
    encode.add_argument("--autoencoder", required=True, help="local diffusers folder (config.json + weights)")
    encode.add_argument("--out", required=True, help="output folder (shards and index.json; resumed if it has some)")
    encode.add_argument("--no-flip", action="store_true", help="do not add horizontally flipped copies")
    encode.add_argument("--batch-size", type=positive("--batch-size"), default=64, help="images per batch and rank")
    encode.add_argument(
        "--shard-size",
        type=positive("--shard-size"),
        help="images per shard file (default 4096; a rerun must use the same)",
    )
    encode.add_argument(
        "--workers", type=int, default=4, help="DataLoader processes reading images, per rank (0: this process)"
    )
    encode.add_argument("--device", default="auto", help="auto (default: cuda:LOCAL_RANK if available, else cpu)")
    encode.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    if out.suffix.lower() == ".safetensors":
        raise UsageError(
            f"--out {out}: dumo encode writes a folder of shards; name a folder (e.g. latents/imagenet256-sdvae). "
            "Latent files of earlier versions are still read."
        )
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if args.resolution is not None and args.data != "image_folder":
        raise UsageError(f"--resolution applies to --data image_folder only, not {args.data}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0; got {args.workers}")
    from dumo.data.encode import DEFAULT_SHARD_SIZE, encode_images, image_source
    from dumo.data.latents import LatentCodec, load_autoencoder
    from dumo.distributed import from_environment, resolve_device, shutdown

    dist = from_environment()
    try:
        device = resolve_device(args.device, dist.local_rank, option="--device")
        source = image_source(args.data, args.data_path, args.resolution)
        codec = LatentCodec(load_autoencoder(args.kind, args.autoencoder, device), args.kind)
        summary = encode_images(
            source,
            codec,
            out,
            args.autoencoder,
            device=device,
            dist=dist,
            flip=not args.no_flip,
            batch_size=args.batch_size,
            shard_size=args.shard_size or DEFAULT_SHARD_SIZE,
            workers=args.workers,
        )
    finally:
        shutdown()  # leave the process group torchrun set up, if any
    if summary is None:  # under torchrun, rank 0 speaks for all
        return 0
    if summary.transparent:
        print(f"dumo: note: {summary.transparent} images have transparency; composited over white", file=sys.stderr)
    flips = "with flips" if not args.no_flip else "no flips"
    kept = f", {summary.skipped_shards} already there" if summary.skipped_shards else ""
    ranks = f" on {dist.world_size} processes" if dist.enabled else ""
    print(
        f"encoded {summary.num_images} images ({summary.num_latents} latents {flips}) of {args.data} with "
        f"{args.kind} to {out}: {summary.num_shards} shards{kept}{ranks}"
    )
    shape = "x".join(map(str, summary.latent_shape))
    print(
        f"latents {shape}; per-channel mean {' '.join(f'{m:.4f}' for m in summary.mean)}, "
        f"std {' '.join(f'{s:.4f}' for s in summary.std)}"
    )
    return 0

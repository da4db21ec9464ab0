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
        "shards, each on its own device; a rerun skips the shards already written. --data captions (a caption folder "
        "or .jsonl manifest) keeps each image's caption in the shards (train with data.name=caption_latents) and, "
        "with --text-encoder, stores a frozen encoder's embeddings of every caption in FOLDER/text-embeddings.",
    )
    encode.add_argument(
        "--data", required=True, choices=("digits", "fashion_mnist", "mnist", "cifar10", "image_folder", "captions")
    )
    encode.add_argument(
        "--data-path",
        help="where the dataset's files are (default: its usual location; captions: a folder or .jsonl manifest)",
    )
    encode.add_argument(
        "--resolution", type=positive("--resolution"), help="image_folder, captions: centre-crop size (ADM)"
    )
    encode.add_argument("--kind", required=True, choices=("sd-vae", "dc-ae"), help="autoencoder family")
    encode.add_argument("--autoencoder", required=True, help="local diffusers folder (config.json + weights)")
    encode.add_argument("--out", required=True, help="output folder (shards and index.json; resumed if it has some)")
    flips = encode.add_mutually_exclusive_group()
    flips.add_argument("--no-flip", action="store_true", help="do not add horizontally flipped copies")
    flips.add_argument(
        "--flip",
        action="store_true",
        help="add horizontally flipped copies to captions too (off by default there: a mirror turns 'left' right)",
    )
    encode.add_argument(
        "--text-encoder",
        metavar="PATH",
        help="captions: a local transformers folder whose embeddings of every caption are computed once and kept "
        "with the latents (train with text.encoder=pretrained, text.path=PATH and the same max tokens and layer)",
    )
    encode.add_argument(
        "--text-max-tokens",
        type=positive("--text-max-tokens"),
        help="--text-encoder: prompts padded or cut to this many tokens (default: text.max_tokens's default, 16)",
    )
    encode.add_argument("--text-layer", type=int, help="--text-encoder: the hidden state to read (default: the last)")
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
    if args.resolution is not None and args.data not in ("image_folder", "captions"):
        raise UsageError(f"--resolution applies to --data image_folder and captions only, not {args.data}")
    text_options = [name for name in ("text_max_tokens", "text_layer") if getattr(args, name) is not None]
    if args.text_encoder is None and text_options:
        raise UsageError(f"--{text_options[0].replace('_', '-')} applies with --text-encoder only")
    if args.text_encoder is not None and args.data != "captions":
        raise UsageError(f"--text-encoder applies to --data captions only, not {args.data}: it encodes captions")
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
        flip = args.flip or (not args.no_flip and args.data != "captions")
        summary = encode_images(
            source,
            codec,
            out,
            args.autoencoder,
            device=device,
            dist=dist,
            flip=flip,
            batch_size=args.batch_size,
            shard_size=args.shard_size or DEFAULT_SHARD_SIZE,
            workers=args.workers,
        )
        text = None if args.text_encoder is None else encode_captions(args, source.captions, out, device, dist)
    finally:
        shutdown()  # leave the process group torchrun set up, if any
    if summary is None:  # under torchrun, rank 0 speaks for all
        return 0
    if summary.transparent:
        print(f"dumo: note: {summary.transparent} images have transparency; composited over white", file=sys.stderr)
    flips = "with flips" if flip else "no flips"
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
    if text is not None:
        print(
            f"text embeddings of {text['prompts']} distinct captions "
            f"({text['max_tokens']} tokens x {text['text_dim']}) by {text['path']} in {out / 'text-embeddings'}"
        )
    return 0


def encode_captions(args: argparse.Namespace, captions: list[str], out: Path, device, dist) -> dict | None:
    """Every rank encodes its share of the distinct captions with the frozen encoder on its device; rank 0
    then lists the encoder in the index (returned; None on the other ranks)."""
    from dumo.conditioning.pretrained_text import PretrainedTextEncoder
    from dumo.data.caption_latents import precompute_caption_embeddings, record_text_encoder
    from dumo.data.prompts import TextConfig

    # the length and layer a config's text section gives by default, so that one without them matches
    max_tokens = args.text_max_tokens or TextConfig().max_tokens
    encoder = PretrainedTextEncoder.from_pretrained(
        args.text_encoder, max_length=max_tokens, layer=args.text_layer, device=device
    )
    done = precompute_caption_embeddings(out, captions, encoder, dist.rank, dist.world_size)
    if dist.is_main:
        print(f"dumo encode: encoded {done} captions with {args.text_encoder} (rank 0's share)", file=sys.stderr)
    dist.barrier()
    return record_text_encoder(out, captions, encoder, args.text_encoder, args.text_layer) if dist.is_main else None

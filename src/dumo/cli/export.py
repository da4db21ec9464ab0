"""dumo export (a run's EMA weights and config for sharing) and dumo import-weights (official DiT or
SiT weights as such a folder)."""

from __future__ import annotations

import argparse

from dumo.cli.common import add_set_argument, positive


def add_parser(subparsers) -> None:
    export = subparsers.add_parser(
        "export",
        help="write a run's EMA weights (safetensors) and config for sharing, or a diffusers pipeline folder",
        description="Write OUT_DIR/model.safetensors (EMA weights of the latest checkpoint) and OUT_DIR/config.yaml. "
        "'dumo sample OUT_DIR ...' and 'dumo eval OUT_DIR ...' work on the result. A run on a diffusers pipeline "
        "(model.name diffusers) also exports with --diffusers OUT: the pipeline folder with the u-head as its "
        "transformer's output and a flow-map Euler scheduler, which samples in 1 or 2 steps with diffusers alone.",
    )
    export.add_argument("run_dir", help="run directory written by 'dumo train'")
    export.add_argument("out_dir", nargs="?", help="new (or empty) output directory")
    export.add_argument("--diffusers", metavar="OUT", help="write a plain diffusers pipeline folder OUT instead")
    export.add_argument("--force", action="store_true", help="--diffusers: replace an existing OUT")
    export.set_defaults(handler=run)

    import_weights = subparsers.add_parser(
        "import-weights",
        help="turn an official DiT or SiT checkpoint into a dumo model folder (v-head), as 'dumo export' writes",
        description="Convert the weights of the official DiT (facebookresearch/DiT) or SiT (willisma/SiT) code "
        "into OUT_DIR/model.safetensors and OUT_DIR/config.yaml, as 'dumo export' writes them: 'dumo sample OUT' "
        "needs no data. CONFIG (objective fm) supplies data, objective and training settings; its model section is "
        "replaced by what the checkpoint needs. SiT weights (Linear path, velocity prediction) map exactly to a Flow "
        "Matching model; DiT weights predict DDPM noise and are only a start for fine-tuning. .pt/.pth files are "
        "read with torch.load(weights_only=True): no code in them runs.",
    )
    import_weights.add_argument("kind", choices=("dit", "sit"), help="the code that trained the checkpoint")
    import_weights.add_argument("checkpoint", help="official checkpoint (.pt, .pth or .safetensors)")
    import_weights.add_argument("--config", required=True, help="YAML config, e.g. configs/imagenet256/fm-xl2.yaml")
    import_weights.add_argument("--out", required=True, help="new (or empty) output directory")
    import_weights.add_argument(
        "--num-heads",
        type=positive("--num-heads"),
        help="attention heads (default: the standard size's; needed only for a non-standard width)",
    )
    import_weights.add_argument(
        "--autoencoder",
        help="latents: local diffusers folder of the SD-VAE that decodes the samples (stabilityai/sd-vae-ft-ema "
        "or -mse; default: data.autoencoder_path), recorded in the weights with the official scale 0.18215",
    )
    add_set_argument(import_weights)
    import_weights.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """dumo export or dumo import-weights, by the command's name."""
    return run_export(args) if args.command == "export" else run_import_weights(args)


def run_export(args: argparse.Namespace) -> int:
    from dumo.errors import ConfigError
    from dumo.runs.loading import export_run

    if (args.out_dir is None) == (args.diffusers is None):
        raise ConfigError(
            "give OUT_DIR (dumo's own export) or --diffusers OUT (a diffusers pipeline folder), one of them"
        )
    if args.force and args.diffusers is None:
        raise ConfigError("--force applies to --diffusers only (OUT_DIR must be new or empty)")
    if args.diffusers is not None:
        from dumo.runs.diffusers_export import export_run_diffusers

        out = export_run_diffusers(args.run_dir, args.diffusers, overwrite=args.force)
        advice = "sample it with diffusers alone: sigmas=[1.0] (one step) or [1.0, 0.5] (two)"
        print(f"exported a diffusers pipeline to {out}; {advice}")
        return 0
    path = export_run(args.run_dir, args.out_dir)
    print(f"exported EMA weights and config to {path.parent}")
    return 0


def run_import_weights(args: argparse.Namespace) -> int:
    from dumo.config import load_config
    from dumo.runs.importing import import_official_weights

    config = load_config(args.config, args.set)
    imported = import_official_weights(
        args.kind, args.checkpoint, config, args.out, num_heads=args.num_heads, autoencoder=args.autoencoder
    )
    print(f"wrote {imported.written} ({imported.describe()}) from {args.kind.upper()} weights to {args.out}")
    autoencoder = imported.space.autoencoder if imported.space is not None else None
    if autoencoder is not None:
        print(
            f"samples decode with {autoencoder['name']} from {autoencoder['path']} "
            f"(latents / {autoencoder['scaling_factor']}); no data needed: dumo sample {args.out} ..."
        )
    print(f"note: {imported.note}")
    return 0

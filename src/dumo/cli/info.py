"""dumo info: the parameter counts and effective settings of a config."""

from __future__ import annotations

import argparse

from dumo.cli.common import UsageError, add_set_argument


def add_parser(subparsers) -> None:
    info = subparsers.add_parser(
        "info",
        help="parameter counts (total, backbone, each head) and effective settings of a config",
        description="Build the config's network on the meta device (no weights allocated) and print its parameter "
        "counts and the effective configuration after defaults and overrides.",
    )
    info.add_argument("config", help="YAML config")
    add_set_argument(info)
    info.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch
    import yaml

    from dumo.config import load_config
    from dumo.data import config_text_spec
    from dumo.models import count_parameters, describe_model
    from dumo.network import build_network, is_diffusers
    from dumo.objectives import objective_class

    config = load_config(args.config, args.set)
    objective = objective_class(config.objective.name)
    shape = config.data.expected_shape()
    classes = config.data.expected_classes() if config.data.conditional else 0
    if shape is None or classes is None:
        missing = []
        if shape is None:
            missing.append("data.resolution" if config.data.name == "image_folder" else "data.latent_shape")
        if classes is None:
            missing.append(
                "data.path (an existing folder)" if config.data.name == "image_folder" else "data.num_classes"
            )
        raise UsageError(f"the data's shape or classes are known only from its files: set {' and '.join(missing)}")
    text = config_text_spec(config.data, config.text)
    with torch.device("meta"):  # counts parameters without allocating them
        model = build_network(config, shape, classes, text)
    total = count_parameters(model)
    print(
        f"model {describe_model(config.model)}, data {config.data.name} {shape} ({classes} classes), "
        f"{objective.__name__}"
    )
    print(f"  parameters: {total:,} total ({total / 1e6:.2f}M)")
    if is_diffusers(config):  # the pipeline's transformer (its output layers are the v-head) and the u-head
        print(f"    transformer (v-head included): {count_parameters(model.transformer):,}")
        print(f"    u-head:   {count_parameters(model.u_head):,}")
    else:
        print(f"    backbone: {count_parameters(model.backbone):,}")
        for name, head in model.heads.items():
            print(f"    {name}-head:   {count_parameters(head):,}")
    print("effective settings:")
    print("  " + yaml.safe_dump(config.to_dict(), sort_keys=False).replace("\n", "\n  ").rstrip())
    return 0

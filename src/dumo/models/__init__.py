"""Networks: a backbone plus one or two output heads (v, u).

``model.name`` picks the backbone: ``mlp`` for 2-D data, or a DiT name such as ``DiT-XL/2``
(sizes S, B, L, XL, and dumo's small XS; patch 1, 2 or 4) for images and latents.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

from dumo.errors import ConfigError
from dumo.models.dit import (
    POSITION_ORDERS,
    DiTBackbone,
    DiTHead,
    DiTSize,
    keep_activations,
    parse_dit_name,
    set_activation_checkpointing,
    transformer_blocks,
)
from dumo.models.embeddings import ConditionerFactory
from dumo.models.heads import FlowModel, OutputHead
from dumo.models.mlp import MLPBackbone
from dumo.models.output import ModelOutput
from dumo.models.registry import (
    MLP_DEPTH,
    MLP_HIDDEN_DIM,
    MODEL_REGISTRY,
    ModelEntry,
    describe,
    find_model,
    model_entry,
)
from dumo.models.text_dit import TextDiTSize, build_text_dit, parse_text_dit_name
from dumo.models.unet import UNetBackbone, UNetHead
from dumo.schema import require

MODEL_NAMES = tuple(name for name, entry in MODEL_REGISTRY.items() if entry.buildable)


@dataclass
class LoRAConfig:
    """``model.lora`` of a diffusers model: low-rank adapters on the backbone's attention."""

    rank: int = 32
    alpha: float | None = None  # null: the rank (a scale of 1)
    targets: list[str] | None = None  # module names (to_q, to_k, ...); null: every attention projection

    def validate(self, prefix: str) -> None:
        require(self.rank >= 1, f"{prefix}.rank must be >= 1; got {self.rank}")
        require(self.alpha is None or self.alpha > 0, f"{prefix}.alpha must be > 0 or null; got {self.alpha}")
        require(self.targets is None or len(self.targets) > 0, f"{prefix}.targets must name modules or be null")


@dataclass
class ModelConfig:
    name: str = "mlp"  # mlp, unet, DiT-{XS,S,B,L,XL}/{1,2,4}, or TextDiT-... for data with prompts
    hidden_dim: int | None = None  # width; null = the size's own (mlp: 256)
    depth: int | None = None  # blocks; null = the size's own (mlp: 4)
    num_heads: int | None = None  # DiT attention heads; null = the size's own
    channels: int = 128  # unet: base width
    channel_mult: tuple[int, ...] = (2, 2, 2)  # unet: width multiplier per resolution level
    num_res_blocks: int = 4  # unet: residual blocks per level
    attention_resolutions: tuple[int, ...] = (16,)  # unet: resolutions with self-attention
    dropout: float = 0.1  # unet
    # Sinusoidal time features are of time_embedding_scale * t (every network, also MeanFlow's interval).
    # 100 keeps DuMo's finite-difference du/dt accurate; imported DiT weights need 1000, SiT weights 1.
    time_embedding_scale: float = 100.0
    # DiT: which half of the 2-D sin-cos position table encodes the row; columns_first = official DiT/SiT
    position_order: Literal["rows_first", "columns_first"] = "rows_first"
    # With train.init_from a model whose source has no u-head: copy the v-head (u = v at step 0) or keep zeros.
    u_head_init: Literal["copy_v", "zero"] = "copy_v"
    # DiT: the last head_blocks of the `depth` blocks are private to each head instead of shared (0: the
    # paper's heads, a duplicated final layer). Each head's path keeps the full depth, so init_from maps a
    # shared-trunk checkpoint onto it exactly; the trunk's last blocks run once per head.
    head_blocks: int = 0
    # diffusers: a local diffusers pipeline folder (SANA, SD3, FLUX) whose transformer gets DuMo's two heads
    pretrained: str | None = None
    lora: LoRAConfig | None = None  # diffusers: LoRA on the backbone's attention; null = full fine-tuning
    # diffusers: accept bf16/tf32 target passes with the family's fine finite-difference stencil (their
    # rounding, divided by 2 epsilon, swamps du/dt: refused unless this is set)
    allow_coarse_targets: bool = False

    def validate(self, prefix: str) -> None:
        require(
            self.name in MODEL_NAMES,
            f"{prefix}.name must be mlp, unet, a DiT name like DiT-B/2, a TextDiT name like TextDiT-B/2 or "
            f"diffusers; got {self.name!r}",
        )
        is_diffusers = model_entry(self.name).family == "diffusers"
        require(
            is_diffusers == (self.pretrained is not None),
            f"{prefix}.name=diffusers needs {prefix}.pretrained (a local diffusers pipeline folder)"
            if is_diffusers
            else f"{prefix}.pretrained applies to {prefix}.name=diffusers only",
        )
        if not is_diffusers:
            for key in ("lora", "allow_coarse_targets"):
                require(not getattr(self, key), f"{prefix}.{key} applies to {prefix}.name=diffusers only")
        require(self.channels > 0 and all(m > 0 for m in self.channel_mult), f"{prefix}.channels must be > 0")
        require(self.num_res_blocks >= 1, f"{prefix}.num_res_blocks must be >= 1")
        require(0 <= self.dropout < 1, f"{prefix}.dropout must be in [0, 1)")
        require(self.hidden_dim is None or self.hidden_dim > 0, f"{prefix}.hidden_dim must be > 0")
        require(self.depth is None or self.depth >= 0, f"{prefix}.depth must be >= 0")
        require(self.num_heads is None or self.num_heads > 0, f"{prefix}.num_heads must be > 0")
        require(
            math.isfinite(self.time_embedding_scale) and self.time_embedding_scale > 0,
            f"{prefix}.time_embedding_scale must be > 0; got {self.time_embedding_scale}",
        )
        require(
            self.position_order in POSITION_ORDERS,
            f"{prefix}.position_order must be one of {', '.join(POSITION_ORDERS)}; got {self.position_order!r}",
        )
        require(
            self.position_order == "rows_first" or parse_dit_name(self.name) is not None,
            f"{prefix}.position_order applies to DiT models only",
        )
        entry = model_entry(self.name)
        if entry.family == "diffusers":
            require(self.head_blocks == 0, f"{prefix}.head_blocks applies to DiT models only")
            require(self.num_heads is None, f"{prefix}.num_heads applies to DiT models only")
        elif entry.family == "text_dit":
            require(self.head_blocks == 0, f"{prefix}.head_blocks applies to DiT models only, not TextDiT")
            size = self.dit_size()
            require(
                size.hidden_dim % size.num_heads == 0 and size.hidden_dim % 4 == 0,
                f"{prefix}.hidden_dim ({size.hidden_dim}) must be divisible by 4 and by num_heads ({size.num_heads})",
            )
        elif not entry.head_blocks:
            require(self.num_heads is None, f"{prefix}.num_heads applies to DiT models only")
            require(self.head_blocks == 0, f"{prefix}.head_blocks applies to DiT models only")
        else:
            size = self.dit_size()
            require(
                0 <= self.head_blocks <= size.depth,
                f"{prefix}.head_blocks must be in [0, depth = {size.depth}]; got {self.head_blocks}",
            )
            require(
                size.hidden_dim % size.num_heads == 0 and size.hidden_dim % 4 == 0,
                f"{prefix}.hidden_dim ({size.hidden_dim}) must be divisible by 4 and by num_heads ({size.num_heads})",
            )

    def network(self) -> ModelEntry:
        """The registry entry of this network, with the size this config sets."""
        return model_entry(self.name).with_overrides(self.hidden_dim, self.depth, self.num_heads)

    def dit_size(self) -> DiTSize:
        """The DiT (or TextDiT) size after the hidden_dim / depth / num_heads overrides."""
        size, _ = parse_dit_name(self.name) or parse_text_dit_name(self.name)
        return DiTSize(
            self.hidden_dim or size.hidden_dim,
            size.depth if self.depth is None else self.depth,
            self.num_heads or size.num_heads,
        )


def build_model(
    config: ModelConfig,
    data_shape: Sequence[int],
    heads: tuple[str, ...],
    num_classes: int = 0,
    time_inputs: int = 1,
    conditioner: ConditionerFactory | None = None,
    text_dim: int | None = None,
    text_encoder: nn.Module | None = None,
    pooled_dim: int | None = None,
) -> FlowModel:
    """The network for ``config`` on data of ``data_shape`` ((D,) vectors or (C, H, W) images)
    with the heads (and time inputs) an objective needs, conditioned on class labels when
    ``num_classes`` > 0, or by the module ``conditioner(dim)`` builds for another kind of condition.
    A TextDiT reads prompts of width ``text_dim``: embeddings (with pooled vectors of ``pooled_dim``),
    or token ids that its trainable ``text_encoder`` turns into such tokens."""
    data_shape = tuple(data_shape)
    if model_entry(config.name).family == "diffusers":
        raise ConfigError("model.name=diffusers is built from its pipeline folder by dumo.network.build_network")
    check_fits(config, data_shape)
    if model_entry(config.name).family == "text_dit":
        if text_dim is None:
            raise ConfigError(f"model.name={config.name} reads prompts: it needs the width of their text encoder")
        size = config.dit_size()
        return build_text_dit(
            config.name,
            data_shape[1],
            data_shape[0],
            text_dim,
            heads,
            time_inputs,
            config.time_embedding_scale,
            text_encoder,
            pooled_dim,
            size=TextDiTSize(size.hidden_dim, size.depth, size.num_heads, size.hidden_dim, size.num_heads),
        )
    dit = parse_dit_name(config.name)
    if dit is not None:
        size, patch = config.dit_size(), dit[1]
        channels, resolution = data_shape[0], data_shape[1]
        shared = DiTSize(size.hidden_dim, size.depth - config.head_blocks, size.num_heads)
        backbone = DiTBackbone(
            resolution,
            channels,
            shared,
            patch,
            num_classes,
            time_inputs,
            time_scale=config.time_embedding_scale,
            position_order=config.position_order,
            conditioner=conditioner,
        )
        return FlowModel(
            backbone,
            DiTHead,
            heads,
            hidden_dim=size.hidden_dim,
            patch_size=patch,
            out_channels=channels,
            grid=backbone.grid,
            blocks=config.head_blocks,
            num_heads=size.num_heads,
        )
    if config.name == "unet":
        backbone = UNetBackbone(
            data_shape[1],
            data_shape[0],
            config.channels,
            config.channel_mult,
            config.num_res_blocks,
            config.attention_resolutions,
            config.dropout,
            num_classes,
            time_inputs,
            time_scale=config.time_embedding_scale,
            conditioner=conditioner,
        )
        return FlowModel(
            backbone,
            UNetHead,
            heads,
            channels=backbone.output_channels,
            cond_dim=4 * config.channels,
            out_channels=data_shape[0],
        )
    hidden_dim = MLP_HIDDEN_DIM if config.hidden_dim is None else config.hidden_dim
    backbone = MLPBackbone(
        data_shape[0],
        hidden_dim=hidden_dim,
        depth=MLP_DEPTH if config.depth is None else config.depth,
        num_classes=num_classes,
        time_inputs=time_inputs,
        time_scale=config.time_embedding_scale,
        conditioner=conditioner,
    )
    return FlowModel(backbone, OutputHead, heads, hidden_dim=hidden_dim, out_dim=data_shape[0])


def check_fits(config: ModelConfig, data_shape: tuple[int, ...]) -> None:
    """Refuse, in one line naming the keys to change, a network that cannot take data of this shape."""
    shown = "x".join(map(str, data_shape))
    if config.name == "mlp":
        if len(data_shape) != 1:
            raise ConfigError(
                f"model.name=mlp needs vector data (2-D toys); the data is {shown}: set model.name to a DiT "
                "(e.g. DiT-S/2) or unet"
            )
        return
    if len(data_shape) != 3 or data_shape[1] != data_shape[2]:
        raise ConfigError(
            f"model.name={config.name} needs square images; the data is {shown} (C x H x W): set data.resolution "
            "to centre-crop image folders to a square"
            if len(data_shape) == 3
            else f"model.name={config.name} needs images; the data is {shown}: use model.name=mlp for 2-D data"
        )
    patch = model_entry(config.name).patch
    if patch is not None and data_shape[1] % patch:
        raise ConfigError(
            f"model.name={config.name} has patch size {patch}, which does not divide the image size {data_shape[1]}: "
            f"set data.resolution to a multiple of {patch} or pick another patch size (DiT-S/1, /2, /4)"
        )


def describe_model(config: ModelConfig) -> str:
    """The network's name, and its actual size where it differs from the standard size of that name
    (the digits configs' DiT-S/2 is 96 wide and 4 deep: 0.74M parameters, not DiT-S/2's 33M)."""
    standard, actual = model_entry(config.name), config.network()
    if actual == standard or standard.patch is None:
        return config.name
    return (
        f"{config.name} with a custom size (width {actual.hidden_dim}, depth {actual.depth}, {actual.num_heads} "
        f"heads; the standard {config.name} is width {standard.hidden_dim}, depth {standard.depth})"
    )


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = [
    "MODEL_NAMES",
    "MODEL_REGISTRY",
    "ConditionerFactory",
    "FlowModel",
    "LoRAConfig",
    "ModelConfig",
    "ModelEntry",
    "ModelOutput",
    "build_model",
    "count_parameters",
    "describe",
    "describe_model",
    "find_model",
    "keep_activations",
    "model_entry",
    "set_activation_checkpointing",
    "transformer_blocks",
]

"""Memory per GPU of DuMo on a diffusers transformer at its published size, next to a distillation
that keeps a teacher, a student and a critic (DMD2-style), for ``dumo plan``.

Nothing is loaded: the sizes are numbers from each model's published ``transformer/config.json``
(the Hugging Face repositories named in :data:`PUBLISHED`), and the parameter counts are those of
diffusers' classes built from those configs (on the meta device). The rules, in bytes, per GPU
under DDP (every GPU holds everything; under FSDP the weights and their states are divided by the
GPUs, see :func:`dumo_memory`):

- full fine-tuning: fp32 weights, gradients, Adam's two moments and the EMA: 20 bytes a parameter
  (the transformer and the u-head, a copy of its output layers);
- LoRA: the frozen base in fp32 (4 bytes a parameter, shared with the EMA, as dumo loads it), and
  20 bytes a trainable parameter (adapters of ``rank`` on the attention projections, and the u-head);
- bf16 autocast caches a bf16 copy of every weight that requires grad during the forward pass
  (2 bytes a trained parameter; the frozen base's casts last one layer);
- activations: with gradient checkpointing each block keeps its input (``tokens x width`` values) and
  one block at a time is recomputed, holding about 17 values per token and hidden unit (34 bytes in
  16-bit: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
  with fused attention); without it every block holds those 17;
- the no-grad target passes (DuMo's central difference: 2 rows per image, 3 with training-time
  guidance) hold one block's working set at a time in fp32 with ``objective.target_precision: fp32``:
  the residual stream, q, k, v, the attention output and the MLP's hidden layer;
- the distillation: the teacher frozen (fp32), the student (20 bytes a trained parameter) and a
  critic (16: no EMA), trained as DuMo's model is (fully, or as LoRA adapters on the teacher's
  frozen base, shared by all three), both through checkpointed activations.

Rough, as ``dumo plan``'s other memory figures are: the CUDA context, workspaces and fragmentation
(add 10-20%) are left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 2**30
#: activation values per token and hidden unit that one transformer block keeps for its backward pass
BLOCK_VALUES = 17


@dataclass(frozen=True)
class PublishedSize:
    """One released transformer: what its memory depends on."""

    name: str
    family: str
    source: str  # the Hugging Face repository whose transformer/config.json gives the numbers
    folders: tuple[str, ...]  # lower-case parts of the pipeline folder names it is released under
    parameters: int  # the transformer's (diffusers' class built from the published config)
    head_parameters: int  # its output layers (norm_out, proj_out, SANA's scale_shift_table): the u-head's size
    lora_parameters_per_rank: int  # sum of (in + out) over the attention projections LoRA adapts
    width: int  # hidden size (heads x head dim)
    blocks: int  # transformer blocks (FLUX: double- and single-stream)
    mlp_ratio: float
    vae_factor: int  # pixels per latent
    patch: int  # latents per token side (FLUX packs 2x2)
    text_tokens: int  # prompt tokens in the blocks' joint sequence (SANA: 0, its prompt enters by cross-attention)


PUBLISHED = {
    size.name: size
    for size in (
        # attention 36 x 32, cross-attention 16 x 72, 28 blocks, Mix-FFN ratio 2.5, 32 latent channels
        PublishedSize("sana-0.6b", "sana", "Efficient-Large-Model/Sana_600M_1024px_diffusers", ("sana_600m",),
                      591_747_872, 39_200, 516_096, 1152, 28, 2.5, 32, 1, 0),
        # attention 70 x 32, cross-attention 20 x 112, 20 blocks
        PublishedSize("sana-1.6b", "sana", "Efficient-Large-Model/Sana_1600M_1024px_diffusers", ("sana_1600m",),
                      1_604_462_752, 76_192, 716_800, 2240, 20, 2.5, 32, 1, 0),
        # 24 blocks of 24 x 64 (dual attention in 0-12), patch 2, CLIP 77 + T5 256 prompt tokens
        PublishedSize("sd3.5-medium", "sd3", "stabilityai/stable-diffusion-3.5-medium",
                      ("stable-diffusion-3.5-medium", "sd3.5-medium", "sd35-medium"),
                      2_243_171_520, 4_820_032, 746_496, 1536, 24, 4.0, 8, 2, 333),
        # 19 double- and 38 single-stream blocks of 24 x 128, 2x2 packed latents, T5 512 prompt tokens
        PublishedSize("flux-dev", "flux", "black-forest-labs/FLUX.1-dev", ("flux.1-dev", "flux-dev", "flux1-dev"),
                      11_901_408_320, 19_077_184, 1_634_304, 3072, 57, 4.0, 8, 2, 512),
    )
}  # fmt: skip


def published_size(pretrained: str) -> PublishedSize:
    """The row of :data:`PUBLISHED` whose release ``pretrained`` (a pipeline folder) names."""
    from dumo.errors import ConfigError

    name = pretrained.rstrip("/").rsplit("/", 1)[-1].lower()
    for size in PUBLISHED.values():
        if any(folder in name for folder in size.folders):
            return size
    known = ", ".join(f"{size.name} ({size.source})" for size in PUBLISHED.values())
    raise ConfigError(f"dumo plan knows the published sizes of {known}; model.pretrained={pretrained} names none")


@dataclass(frozen=True)
class BridgeSetting:
    """What a run does with the transformer: its memory depends on these and on the size."""

    resolution: int
    micro_batch: int  # images per GPU per forward-backward
    lora_rank: int | None  # None: full fine-tuning
    bf16: bool  # bf16 autocast
    checkpointing: bool
    target_rows: int  # no-grad rows per image (DuMo: 2, with guidance 3)
    fp32_targets: bool
    shards: int = 1  # GPUs the weights are sharded over (train.parallel: fsdp); 1 under DDP


def tokens(size: PublishedSize, resolution: int) -> int:
    """Image tokens plus the prompt tokens of the joint sequence, at ``resolution`` pixels."""
    side = resolution // (size.vae_factor * size.patch)
    return side * side + size.text_tokens


def activation_bytes(size: PublishedSize, setting: BridgeSetting) -> float:
    """What the gradient pass keeps for backward, for the micro-batch."""
    values = tokens(size, setting.resolution) * size.width * setting.micro_batch
    element = 2 if setting.bf16 else 4
    if setting.checkpointing:
        return (size.blocks + BLOCK_VALUES) * values * element
    return size.blocks * BLOCK_VALUES * values * element


def target_pass_bytes(size: PublishedSize, setting: BridgeSetting) -> float:
    """One block's working set of the no-grad target passes: residual, q, k, v, attention output, MLP hidden."""
    per_token = (5 + size.mlp_ratio) * size.width
    element = 4 if setting.fp32_targets or not setting.bf16 else 2
    return per_token * tokens(size, setting.resolution) * setting.micro_batch * setting.target_rows * element


def trainable_parameters(size: PublishedSize, setting: BridgeSetting) -> int:
    """What trains: the transformer and its u-head, or (LoRA) the adapters and the u-head."""
    if setting.lora_rank is None:
        return size.parameters + size.head_parameters
    return setting.lora_rank * size.lora_parameters_per_rank + size.head_parameters


def dumo_memory(size: PublishedSize, setting: BridgeSetting) -> dict[str, float]:
    """Bytes per GPU of DuMo on ``size`` (DDP, or FSDP over ``setting.shards`` GPUs), by part.

    Under FSDP each GPU keeps 1/shards of every weight and state, plus one block's gathered weights
    at a time; the EMA model is sharded apart from the model, so a LoRA run's frozen base is held
    twice (model and EMA), each in shards."""
    trainable = trainable_parameters(size, setting)
    shards = setting.shards
    parts: dict[str, float] = {}
    if setting.lora_rank is not None:
        if shards == 1:
            parts["frozen base (fp32, 4 B/param)"] = 4.0 * size.parameters
        else:
            parts[f"frozen base, model and EMA (fp32, 8 B/param / {shards})"] = 8.0 * size.parameters / shards
    parts["trained: weights, gradients, Adam, EMA (20 B/param)" + sharded(shards)] = 20.0 * trainable / shards
    if setting.bf16:  # autocast caches the casts of weights that require grad until the forward pass ends
        parts["bf16 copies of trained weights (autocast)" + sharded(shards)] = 2.0 * trainable / shards
    if shards > 1:  # FSDP gathers one block's full weights (and frees them) at a time
        parts["one gathered block (fp32)"] = 4.0 * size.parameters / size.blocks
    checkpointed = "checkpointed" if setting.checkpointing else "no checkpointing"
    parts[f"activations ({setting.micro_batch} images, {checkpointed})"] = activation_bytes(size, setting)
    parts[f"no-grad target passes ({setting.target_rows} rows/image)"] = target_pass_bytes(size, setting)
    return parts


def distillation_memory(size: PublishedSize, setting: BridgeSetting) -> dict[str, float]:
    """Bytes per GPU of a distillation keeping a frozen teacher, a student and a critic trained as
    DuMo's model is (fully, or LoRA on one shared frozen base; DDP, or FSDP over ``setting.shards``), by part."""
    trainable = trainable_parameters(size, setting)
    shared = " = the shared frozen base" if setting.lora_rank is not None else ""
    split = sharded(setting.shards)  # under FSDP each of the three is sharded as DuMo's model is
    parts = {
        f"teacher (frozen, fp32{shared}){split}": 4.0 * size.parameters / setting.shards,
        f"student: weights, gradients, Adam, EMA (20 B/param){split}": 20.0 * trainable / setting.shards,
        f"critic: weights, gradients, Adam (16 B/param){split}": 16.0 * trainable / setting.shards,
    }
    if setting.bf16:
        parts[f"bf16 copies of trained weights (autocast){split}"] = 2.0 * 2 * trainable / setting.shards
    if setting.shards > 1:
        parts["one gathered block (fp32)"] = 4.0 * size.parameters / size.blocks
    parts["activations (student and critic)"] = 2 * activation_bytes(size, setting)
    return parts


def sharded(shards: int) -> str:
    return "" if shards == 1 else f" / {shards}"


def setting_of(config, gpus: int) -> BridgeSetting:
    """The setting of a ``model.name: diffusers`` config trained on ``gpus`` GPUs."""
    objective = config.objective
    guided = getattr(objective, "zeta", 0.0) > 0
    rows = (2 + guided) if getattr(objective, "derivative", None) == "finite_difference" else 1
    return BridgeSetting(
        resolution=config.data.resolution or 1024,
        micro_batch=math.ceil(config.data.batch_size / (gpus * config.train.grad_accumulation)),
        lora_rank=None if config.model.lora is None else config.model.lora.rank,
        bf16=config.train.precision == "bf16",
        checkpointing=config.train.activation_checkpointing,
        target_rows=rows,
        fp32_targets=getattr(objective, "target_precision", "fp32") == "fp32",
        shards=gpus if config.train.parallel == "fsdp" else 1,
    )


def format_bridge_plan(config, gpus: int, gpu_memory_gib: float, gpu_name: str, config_name: str = "") -> str:
    """The lines ``dumo plan`` prints for a diffusers model: memory per GPU of DuMo and of a distillation."""
    size = published_size(config.model.pretrained)
    setting = setting_of(config, gpus)
    training = "full fine-tuning" if setting.lora_rank is None else f"LoRA rank {setting.lora_rank}"
    trainable = trainable_parameters(size, setting)
    strategy = "DDP" if setting.shards == 1 else f"FSDP, {setting.shards}"
    lines = [
        f"plan of {config_name or 'the config'} on {gpus} x {gpu_name} ({'bf16' if setting.bf16 else 'fp32'})",
        f"  network      {size.name}: {size.parameters:,} transformer parameters ({size.source}) + u-head "
        f"{size.head_parameters:,}; {training}, {trainable:,} trainable",
        f"  tokens       {tokens(size, setting.resolution):,} per image at {setting.resolution} px "
        f"({setting.micro_batch} images per GPU per forward-backward)",
    ]
    dumo, distill = dumo_memory(size, setting), distillation_memory(size, setting)
    rows = [(f"DuMo: {name}", value, None) for name, value in dumo.items()]
    rows += [(f"distillation: {name}", None, value) for name, value in distill.items()]
    width = max(len(name) for name, _, _ in rows)
    lines.append(f"  memory/GPU ({strategy}){'':{width - len(strategy) - 11}s} {'DuMo':>9s} {'distill':>9s}   (GiB)")
    for name, ours, theirs in rows:
        shown = [f"{value / GIB:9.2f}" if value is not None else f"{'':9s}" for value in (ours, theirs)]
        lines.append(f"    {name:{width}s} {shown[0]} {shown[1]}".rstrip())
    dumo_total, distill_total = sum(dumo.values()), sum(distill.values())
    lines.append(f"    {'total':{width}s} {dumo_total / GIB:9.2f} {distill_total / GIB:9.2f}   of {gpu_memory_gib:g}")
    if dumo_total > gpu_memory_gib * GIB:
        lines.append(
            "  note: DuMo exceeds one GPU's memory here: LoRA (model.lora), gradient checkpointing, a smaller "
            "micro-batch (train.grad_accumulation) or more GPUs"
        )
    lines.append("  (rough: the CUDA context, workspaces and fragmentation add 10-20%; see dumo.bridge.memory)")
    return "\n".join(lines)


__all__ = [
    "PUBLISHED",
    "BridgeSetting",
    "distillation_memory",
    "dumo_memory",
    "format_bridge_plan",
    "published_size",
    "trainable_parameters",
]

"""``dumo plan``: what a configured run will cost before it is started.

For a config, a number of GPUs and a GPU kind: the parameters, the FLOPs of one training step per
image (counted on fake tensors by the same counter as the training log's MFU column, so every pass
of the objective is in it), the expected images/s and step time, the memory per GPU under DDP and
FSDP, and the days, GPU-hours and epochs of ``train.steps`` at ``data.batch_size``.

The throughput comes from ``dumo/plan_table.yaml``: a measured single-GPU images/s where the table
has one for this GPU, network, objective and precision (scaled by the number of GPUs: DDP's
communication is assumed hidden behind the backward pass), else the GPU's peak dense FLOP/s times
an assumed MFU (the table's, measured for Flow Matching, unless ``--mfu``). Both are estimates; the
training log's ``images_per_sec`` and ``mfu`` columns measure the real thing within the first
``train.log_every`` steps.

Memory per GPU: fp32 weights, gradients and the two Adam moments, the EMA copy and a frozen teacher
where the objective uses one (dumo keeps fp32 master weights; bf16 autocast adds a bf16 copy of the
weights), plus activations: the bytes the gradient pass saves for backward, counted on fake tensors
per image and scaled to this GPU's micro-batch. That activation figure is rough: it leaves out the
CUDA context, kernel workspaces, the no-grad passes' transient tensors and allocator fragmentation
(add 10-20%), and fused attention or torch.compile change it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from dumo.config import Config
from dumo.data import TextSpec, config_text_spec
from dumo.errors import ConfigError
from dumo.training.throughput import StepCost, count_step_cost, format_flops, throughput_table

#: ImageNet-1k training images (one epoch; flipped latent copies not counted): the ImageNet configs'
#: data.train_images
IMAGENET_TRAIN = 1_281_167
GIB = 2**30


@dataclass
class Memory:
    """Bytes per GPU of one training process, by part."""

    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())


@dataclass
class TextEncoderCost:
    """A frozen text encoder of a run: not trained, and not loaded at all on precomputed embeddings."""

    name: str
    parameters: int
    precomputed: bool


@dataclass
class Plan:
    config: Config
    gpus: int
    gpu: str  # the table's key
    gpu_name: str
    gpu_memory_gib: float
    precision: str  # what the matmuls run in: bf16, tf32 or fp32
    cost: StepCost
    images_per_sec: float  # over all GPUs
    throughput_source: str  # how images_per_sec was obtained, for the reader
    dataset_size: int | None
    dataset_source: str
    memory: dict[str, Memory]  # "ddp", "fsdp"
    text_encoder: TextEncoderCost | None = None  # a frozen text encoder beside the network

    @property
    def batch_size(self) -> int:
        return self.config.data.batch_size

    @property
    def steps(self) -> int:
        return self.config.train.steps

    @property
    def micro_batch(self) -> int:
        """Images per GPU per forward-backward (the global batch over GPUs and accumulation shards)."""
        return math.ceil(self.batch_size / (self.gpus * self.config.train.grad_accumulation))

    @property
    def step_seconds(self) -> float:
        return self.batch_size / self.images_per_sec

    @property
    def mfu(self) -> float:
        """The model FLOP utilisation these numbers imply."""
        peak = throughput_table()["gpus"][self.gpu]["peak_tflops"][self.precision] * 1e12
        return self.cost.flops_per_image * self.images_per_sec / self.gpus / peak

    @property
    def train_seconds(self) -> float:
        return self.steps * self.step_seconds

    @property
    def gpu_hours(self) -> float:
        return self.train_seconds * self.gpus / 3600

    @property
    def epochs(self) -> float | None:
        return None if not self.dataset_size else self.steps * self.batch_size / self.dataset_size

    @property
    def epochs_per_day(self) -> float | None:
        return None if not self.dataset_size else self.images_per_sec * 86_400 / self.dataset_size


def matmul_precision_of(config: Config) -> str:
    """bf16 under autocast; fp32 runs use TF32 tensor cores when train.tf32 is on."""
    if config.train.precision == "bf16":
        return "bf16"
    return "tf32" if getattr(config.train, "tf32", False) else "fp32"


def model_shape(config: Config) -> tuple[tuple[int, ...], int]:
    """The data's shape and the conditioning classes (0: unconditional), known without the data."""
    shape = config.data.expected_shape()
    classes = config.data.expected_classes()
    if shape is None:
        key = "data.resolution" if config.data.name == "image_folder" else "data.latent_shape"
        raise ConfigError(f"the data's shape is known only from its files: set {key}")
    if config.data.conditional and classes is None:
        raise ConfigError("the number of classes is known only from the data: set data.num_classes or data.path")
    return tuple(shape), classes if config.data.conditional else 0


def dataset_size(config: Config) -> tuple[int | None, str]:
    """Training images in one epoch, and where the number comes from (None: generated data, or unknown)."""
    data = config.data
    if data.is_generated():
        return None, "generated data: no epochs"
    index = Path(data.path or "").expanduser() / "index.json"
    if data.name in ("latents", "caption_latents") and data.path and index.is_file():
        try:
            import json

            return int(json.loads(index.read_text())["num_images"]), f"{data.path} (flipped copies not counted)"
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: fall back to what the config says
    if data.name == "latents" and data.path and Path(data.path).expanduser().is_file():
        counted = latent_file_images(Path(data.path).expanduser())
        if counted is not None:
            return counted, f"{data.path} (flipped copies not counted)"
    if data.train_images is not None:
        return data.train_images, "data.train_images"
    if data.expected_images() is not None:
        return data.expected_images(), f"the {data.name} training set"
    return None, "unknown: give --dataset-size or data.train_images"


def latent_file_images(path: Path) -> int | None:
    """Images encoded in a ``dumo encode`` file, read from its header (the file may be tens of GB)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            rows = handle.get_slice("latents").get_shape()[0]
            flipped = (handle.metadata() or {}).get("flipped_copies") == "true"
    except Exception:  # unreadable: fall back to what the config says
        return None
    return rows // 2 if flipped else rows


def measured_throughput(config: Config, gpu: str, precision: str) -> dict | None:
    """The table's measured entry for this GPU kind, network, objective and precision, if any."""
    objective = config.objective
    guided = getattr(objective, "zeta", 0.0) > 0 and config.data.conditional
    derivative = getattr(objective, "derivative", None)
    target = getattr(objective, "target_precision", None)
    for entry in throughput_table().get("measured") or []:
        if (
            entry["gpu"] == gpu
            and entry["model"] == config.model.name
            and config.model.hidden_dim is None
            and config.model.depth is None
            and entry["objective"] == objective.name
            and entry.get("derivative") == derivative
            and bool(entry.get("guided", False)) == guided
            and entry["precision"] == precision
            and bool(entry.get("compile", False)) == bool(config.train.compile)
            # where both name it: the precision of the no-grad target passes (fp32 ones cost more)
            and (target is None or entry.get("target_precision", target) == target)
        ):
            return entry
    return None


def memory_per_gpu(config: Config, cost: StepCost, gpus: int, micro_batch: int, precision: str) -> dict[str, Memory]:
    """DDP and FSDP memory of one GPU: the states of :mod:`dumo.training.loop` plus rough activations."""
    from dumo.objectives import build_objective

    params = cost.parameters
    teacher = build_objective(config.objective, 0).wants_teacher()
    activations = (cost.activation_bytes_per_image or 0.0) * micro_batch
    # bf16 autocast casts each weight once per step and keeps the copy for backward; in fp32 the
    # tensors saved for backward are the weights themselves (no extra memory)
    casts = (cost.fixed_activation_bytes or 0.0) if precision == "bf16" else 0.0
    plans = {}
    for strategy, shards in (("ddp", 1), ("fsdp", gpus)):
        parts = {
            "weights (fp32)": 4 * params / shards,
            "gradients (fp32)": 4 * params / shards,
            "Adam moments (2 x fp32)": 8 * params / shards,
            "EMA (fp32)": 4 * params / shards,
        }
        if teacher:
            parts["teacher (fp32, not sharded)"] = 4 * params
        if casts:
            parts["bf16 weight copies (autocast)"] = casts
        parts[f"activations ({micro_batch} images, rough)"] = activations
        plans[strategy] = Memory(parts)
    return plans


def make_plan(
    config: Config,
    gpus: int,
    gpu: str,
    mfu: float | None = None,
    images: int | None = None,
) -> Plan:
    """The plan of ``config`` on ``gpus`` GPUs of kind ``gpu`` (a key of plan_table.yaml)."""
    table = throughput_table()
    if gpu not in table["gpus"]:
        raise ConfigError(f"unknown GPU kind {gpu!r}; the table knows {', '.join(table['gpus'])}")
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1; got {gpus}")
    if mfu is not None and not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1]; got {mfu}")
    entry = table["gpus"][gpu]
    precision = matmul_precision_of(config)
    shape, classes = model_shape(config)
    text, text_encoder = plan_text(config)
    cost = count_step_cost(config, shape, classes, activations=True, text=text)
    peak = entry["peak_tflops"][precision] * 1e12
    measured = None if mfu is not None else measured_throughput(config, gpu, precision)
    if measured is not None:
        images_per_sec = measured["images_per_sec"] * gpus
        source = (
            f"measured {measured['images_per_sec']:g} images/s on one {gpu} (batch {measured['batch']}, "
            f"{measured.get('source', 'plan_table.yaml')}) x {gpus} GPUs"
        )
    else:
        assumed = mfu if mfu is not None else table["assumed_mfu"]
        images_per_sec = gpus * peak * assumed / cost.flops_per_image
        how = "given" if mfu is not None else "assumed"
        source = f"{how} MFU {assumed:g} of the {precision} peak {entry['peak_tflops'][precision]:g} TFLOP/s per GPU"
    if images is not None:
        size, size_source = images, "--dataset-size"
    else:
        size, size_source = dataset_size(config)
    micro_batch = math.ceil(config.data.batch_size / (gpus * config.train.grad_accumulation))
    memory = memory_per_gpu(config, cost, gpus, micro_batch, precision)
    return Plan(
        config,
        gpus,
        gpu,
        entry["name"],
        float(entry["memory_gib"]),
        precision,
        cost,
        images_per_sec,
        source,
        size,
        size_source,
        memory,
        text_encoder,
    )


def plan_text(config: Config) -> tuple[TextSpec | None, TextEncoderCost | None]:
    """How the prompts of ``config`` reach the network, for planning: a frozen encoder is described from
    its config.json alone (no weights read), and is precomputed when ``text.precomputed`` says so or the
    latent folder lists its embeddings."""
    if not config.data.is_text:
        return None, None
    text = config.text
    if text.encoder == "small":
        return config_text_spec(config.data, text), None
    from dumo.conditioning.pretrained_text import describe_encoder

    shape = describe_encoder(text.path)
    spec = TextSpec("pretrained", text.max_tokens, path=text.path, text_dim=shape.text_dim, pooled_dim=shape.pooled_dim)
    return spec, TextEncoderCost(shape.class_name, shape.parameters, text.precomputed or listed_encoder(config))


def listed_encoder(config: Config) -> bool:
    """Whether the caption latents of ``config`` list embeddings of its text section's encoder."""
    import json

    index = Path(config.data.path or "").expanduser() / "index.json"
    if config.data.name != "caption_latents" or not index.is_file():
        return False
    try:
        records = json.loads(index.read_text()).get("text_encoders") or []
    except (OSError, ValueError, AttributeError):
        return False
    folder = str(Path(config.text.path).expanduser().resolve())
    return any(
        r.get("path") == folder
        and r.get("max_tokens") == config.text.max_tokens
        and r.get("layer") == config.text.layer
        for r in records
    )


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86_400:
        return f"{seconds / 86_400:.2f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.2f} hours"
    return f"{seconds / 60:.1f} minutes"


def format_plan(plan: Plan, config_name: str = "") -> str:
    """The plan as the lines ``dumo plan`` prints."""
    config = plan.config
    objective = config.objective
    details = [d for d in (getattr(objective, "derivative", None),) if d]
    if getattr(objective, "zeta", 0.0) > 0 and config.data.conditional:
        details.append(f"guidance zeta {objective.zeta:g}")
    shown_objective = objective.name + (f" ({', '.join(details)})" if details else "")
    lines = [
        f"plan of {config_name or 'the config'} on {plan.gpus} x {plan.gpu_name} ({plan.precision})",
        f"  network      {config.model.name}, {plan.cost.parameters:,} parameters ({plan.cost.parameters / 1e6:.1f}M); "
        f"objective {shown_objective}",
        f"  FLOPs        {format_flops(plan.cost.flops_per_image)} per image per training step "
        "(counted: forward and backward of every pass of the objective)",
        f"  throughput   {plan.images_per_sec:,.0f} images/s ({plan.images_per_sec / plan.gpus:,.1f} per GPU; MFU "
        f"{plan.mfu:.2f}): {plan.throughput_source}",
        f"  step         {plan.step_seconds:.4g} s for a batch of {plan.batch_size} ({plan.micro_batch} per GPU per "
        f"forward-backward)",
        f"  run          {plan.steps:,} steps: {_duration(plan.train_seconds)}, {plan.gpu_hours:,.0f} GPU-hours "
        f"({plan.steps:,} x {plan.step_seconds:.4g} s x {plan.gpus} GPUs / 3600)",
    ]
    if plan.dataset_size:
        lines.append(
            f"  data         {plan.dataset_size:,} images ({plan.dataset_source}): "
            f"{plan.epochs_per_day:,.1f} epochs/day, {plan.epochs:,.1f} epochs in all"
        )
    else:
        lines.append(f"  data         {plan.dataset_source}")
    shards = plan.gpus * config.train.grad_accumulation
    if plan.batch_size % shards:
        lines.append(
            f"  note: data.batch_size {plan.batch_size} is not divisible by {plan.gpus} GPUs x train.grad_accumulation "
            f"{config.train.grad_accumulation}: dumo train refuses that split"
        )
    target = getattr(objective, "target_precision", None)
    if plan.precision == "bf16" and target in ("fp32", "tf32") and "measured" not in plan.throughput_source:
        lines.append(
            f"  note: the objective's no-grad target passes run in {target} (objective.target_precision), at a "
            "lower peak than bf16: expect fewer images/s (one H100 measured DuMo with fp32 passes at 5.9x Flow "
            "Matching's step time)"
        )
    encoder = plan.text_encoder
    if encoder is not None and encoder.precomputed:
        lines.append(
            f"  text encoder {encoder.name}, {encoder.parameters / 1e6:,.1f}M parameters, frozen: its embeddings are "
            "precomputed with the latents (dumo encode --text-encoder), so training never loads it"
        )
    elif encoder is not None:
        lines.append(
            f"  text encoder {encoder.name}, {encoder.parameters / 1e6:,.1f}M parameters, frozen (with the network: "
            f"{(plan.cost.parameters + encoder.parameters) / 1e6:,.1f}M): loaded in fp32 on each rank's CPU, "
            f"{4 * encoder.parameters / GIB:.2f} GiB of host memory per rank, to encode each prompt once; "
            "precompute them with the latents to skip it (dumo encode --text-encoder, text.precomputed)"
        )
    ddp, fsdp = plan.memory["ddp"], plan.memory["fsdp"]
    lines.append(f"  memory/GPU   {'':34s} {'DDP':>9s} {'FSDP':>9s}   (GiB)")
    for name in ddp.parts:
        lines.append(f"    {name:44s} {ddp.parts[name] / GIB:9.2f} {fsdp.parts[name] / GIB:9.2f}")
    lines.append(f"    {'total':44s} {ddp.total / GIB:9.2f} {fsdp.total / GIB:9.2f}   of {plan.gpu_memory_gib:g}")
    for strategy, memory in (("DDP", ddp), ("FSDP", fsdp)):
        if memory.total > plan.gpu_memory_gib * GIB:
            lines.append(
                f"  note: under {strategy} this exceeds one GPU's memory: raise train.grad_accumulation (fewer images "
                "per forward-backward) or use more GPUs" + (" or train.parallel=fsdp" if strategy == "DDP" else "")
            )
    return "\n".join(lines)

"""The run configuration: one YAML file, every key overridable with ``--set key=value``.

Sections: ``data``, ``model``, ``objective`` (its keys depend on ``objective.name``),
``optim``, ``train``, ``sample`` and, for data with prompts, ``text``. Defaults are the paper's (AdamW lr 1e-4, betas
(0.9, 0.95), no weight decay, EMA 0.9999) and METHOD's documented option defaults.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dumo.data import DataConfig, TextConfig
from dumo.errors import ConfigError
from dumo.models import ModelConfig, find_model, model_entry
from dumo.models.registry import DIFFUSERS_FD_EPSILON
from dumo.objectives import DEFAULT_OBJECTIVE, OBJECTIVES, ObjectiveConfig, objective_config_class
from dumo.samplers import SAMPLERS
from dumo.schema import build, require, to_dict


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    eps: float = 1e-8
    grad_clip: float | None = None  # max global gradient norm; null = no clipping

    def validate(self, prefix: str) -> None:
        require(self.lr > 0, f"{prefix}.lr must be > 0; got {self.lr}")
        require(all(0 <= b < 1 for b in self.betas), f"{prefix}.betas must lie in [0, 1); got {list(self.betas)}")
        require(self.weight_decay >= 0, f"{prefix}.weight_decay must be >= 0; got {self.weight_decay}")
        require(self.eps > 0, f"{prefix}.eps must be > 0; got {self.eps}")
        require(self.grad_clip is None or self.grad_clip > 0, f"{prefix}.grad_clip must be > 0 or null")


@dataclass
class TrainConfig:
    steps: int = 10_000
    seed: int = 0
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + step) / (10 + step)): early EMA follows the weights
    log_every: int = 100
    eval_every: int = 0  # steps between quality evaluations (1-NFE); 0 = only at the end
    eval_samples: int = 2000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    device: str = "auto"  # auto: cuda when available, else cpu
    progress: bool = True  # progress bar on the terminal
    tensorboard: bool = False  # also write the logged scalars and scores to RUN_DIR/tensorboard (needs tensorboard)
    max_nonfinite_steps: int = 5  # stop after this many skipped (non-finite) steps in a row
    # a run that skipped more than this fraction of its steps (non-finite loss or gradient) ends in an error
    max_skipped_fraction: float = 0.01
    grad_accumulation: int = 1  # shards per rank per step: the per-rank batch is split this many times
    max_minutes: float | None = None  # wall-clock budget of this invocation; stops (with a checkpoint) when spent
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast the network; heads, times, targets stay fp32
    # CUDA: TF32 matmuls/convolutions for fp32 computations (the target passes follow objective.target_precision)
    tf32: bool = False
    # torch.compile for the training step: true = the whole network (the gradient pass and the no-grad
    # target passes); blocks = each transformer block alone (regional: built once, reused by every block,
    # so it builds in a fraction of the time on a deep DiT); false = eager
    compile: bool | Literal["blocks"] = False
    # recompute each transformer block in the backward pass instead of storing its activations
    # (less memory for about one more forward pass of compute); DiT models only
    activation_checkpointing: bool = False
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate (DDP) or shard (FSDP2) the model
    # FSDP2's MixedPrecisionPolicy for the transformer/residual blocks: bf16 parameters in the forward
    # pass and the all-gather, fp32 gradient reduction; fp32 = gather and compute as stored.
    fsdp_param_dtype: Literal["fp32", "bf16"] = "fp32"
    # Start from these weights (a dumo run or export directory, or a .safetensors file) instead of
    # a random initialisation; see dumo.training.initialise for how they are fitted to the model.
    init_from: str | None = None
    # EMA snapshots (fp16, RUN/snapshots/ema_step_XXXXXXXX.safetensors) after these steps and/or every
    # snapshot_every steps (0: none); kept whatever checkpoint rotation deletes, for FID against steps.
    snapshot_steps: list[int] = field(default_factory=list)
    snapshot_every: int = 0

    def validate(self, prefix: str) -> None:
        require(self.steps >= 0, f"{prefix}.steps must be >= 0; got {self.steps}")
        require(self.max_nonfinite_steps >= 1, f"{prefix}.max_nonfinite_steps must be >= 1")
        require(0 <= self.max_skipped_fraction <= 1, f"{prefix}.max_skipped_fraction must be in [0, 1]")
        require(self.max_minutes is None or self.max_minutes > 0, f"{prefix}.max_minutes must be > 0 or null")
        require(self.grad_accumulation >= 1, f"{prefix}.grad_accumulation must be >= 1")
        require(0 <= self.ema_decay < 1, f"{prefix}.ema_decay must be in [0, 1); got {self.ema_decay}")
        for key in ("log_every", "eval_every", "checkpoint_every"):
            require(getattr(self, key) >= 0, f"{prefix}.{key} must be >= 0; got {getattr(self, key)}")
        require(self.eval_samples >= 2, f"{prefix}.eval_samples must be >= 2; got {self.eval_samples}")
        require(self.keep_checkpoints >= 1, f"{prefix}.keep_checkpoints must be >= 1; got {self.keep_checkpoints}")
        require(
            all(step >= 1 for step in self.snapshot_steps),
            f"{prefix}.snapshot_steps must be steps >= 1; got {self.snapshot_steps}",
        )
        require(self.snapshot_every >= 0, f"{prefix}.snapshot_every must be >= 0; got {self.snapshot_every}")


@dataclass
class SampleConfig:
    """Defaults for ``dumo sample`` and evaluations."""

    method: str = "auto"  # a name in dumo.samplers.SAMPLERS; auto: the objective's default_sampler
    t_start: float = 1.0  # first time of the few-step samplers (slightly below 1 is an option)
    schedule_power: float = 1.0  # k-step times t_i = t_start * (1 - i/k)^power; > 1 moves them toward 0
    stochasticity: float = 1.0  # flow-map re-noising: 1 fresh noise, 0 the noise the prediction implies
    # Classifier-free guidance at sampling: out = uncond + w (cond - uncond) on every head, two
    # network passes per step (so twice the cost per NFE). 1 = off; w = 1 + zeta matches
    # training-time guidance of strength zeta.
    guidance_scale: float = 1.0
    # The head to draw (dumo sample --head): any head of the model, with its own sampler for method
    # auto. null: the head of the objective's own sampler (a multi-head model: its first head).
    head: str | None = None

    def validate(self, prefix: str) -> None:
        choices = ("auto", *SAMPLERS)
        require(
            self.method in choices,
            f"config key '{prefix}.method' must be one of {', '.join(choices)}; got {self.method!r}",
        )
        require(0 < self.t_start <= 1, f"{prefix}.t_start must be in (0, 1]; got {self.t_start}")
        require(self.schedule_power > 0, f"{prefix}.schedule_power must be > 0; got {self.schedule_power}")
        require(0 <= self.stochasticity <= 1, f"{prefix}.stochasticity must be in [0, 1]; got {self.stochasticity}")
        require(
            math.isfinite(self.guidance_scale) and self.guidance_scale >= 0,
            f"{prefix}.guidance_scale must be a finite number >= 0; got {self.guidance_scale}",
        )


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=lambda: objective_config_class(DEFAULT_OBJECTIVE)())
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain values, with only the model keys the chosen network reads (a DiT's
        config.yaml listing U-Net keys suggests they matter), and the text section only for data
        with prompts."""
        raw = to_dict(self)
        network = find_model(self.model.name)  # None: a name validation refuses; then every key is kept
        unused = network.unused_keys if network is not None else ()
        raw["model"] = {k: v for k, v in raw["model"].items() if k not in unused}
        if not self.data.is_text:
            raw.pop("text")
        return raw


def check_conditions(config: Config) -> None:
    """Refuse a network that cannot read what the data conditions on (prompts need a TextDiT)."""
    network = find_model(config.model.name)
    reads_text = network is not None and "text" in network.conditions
    if config.data.is_text and not reads_text:
        raise ConfigError(
            f"data.name={config.data.name} conditions on prompts: set model.name to a TextDiT (e.g. TextDiT-XS/4); "
            f"{config.model.name} reads no text"
        )
    if config.text.precomputed and config.data.name != "caption_latents":
        raise ConfigError(
            f"text.precomputed reads embeddings stored with caption latents (data.name=caption_latents), "
            f"not {config.data.name}"
        )
    if reads_text and not config.data.is_text:
        raise ConfigError(
            f"model.name={config.model.name} is conditioned on prompts; data.name={config.data.name} has none "
            "(text data: shapes, captions, caption_latents)"
        )


SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
    "text": TextConfig,
}


def config_from_dict(raw: Any) -> Config:
    """Validate a parsed config mapping; raises :class:`ConfigError` naming the first problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of sections; got {type(raw).__name__}")
    unknown = [key for key in raw if key not in SECTIONS and key != "objective"]
    if unknown:
        raise ConfigError(f"unknown config section '{unknown[0]}' (sections: {', '.join([*SECTIONS, 'objective'])})")
    model = build(ModelConfig, raw.get("model"), prefix="model")
    objective_raw = raw.get("objective") or {}
    if not isinstance(objective_raw, dict):
        raise ConfigError("'objective' must be a mapping of keys to values")
    text_raw = raw.get("text")
    if model_entry(model.name).family == "diffusers":
        objective_raw, text_raw = diffusers_defaults(model, objective_raw, text_raw)
    sections = {
        name: model if name == "model" else build(cls, text_raw if name == "text" else raw.get(name), prefix=name)
        for name, cls in SECTIONS.items()
    }
    name = objective_raw.get("name", DEFAULT_OBJECTIVE)
    if name not in OBJECTIVES:
        raise ConfigError(f"config key 'objective.name' must be one of {', '.join(OBJECTIVES)}; got {name!r}")
    if "fp32_target_passes" in objective_raw:  # the boolean that target_precision replaced (older config.yaml)
        if "target_precision" in objective_raw:
            raise ConfigError("give objective.target_precision only; fp32_target_passes is its older form")
        objective_raw = dict(objective_raw)
        objective_raw["target_precision"] = "fp32" if objective_raw.pop("fp32_target_passes") else "bf16"
    objective = build(OBJECTIVES[name][0], {**objective_raw, "name": name}, prefix="objective")
    config = Config(objective=objective, **sections)
    if model_entry(model.name).family == "diffusers":
        check_diffusers_targets(config)
    if raw.get("text") and not config.data.is_text:
        raise ConfigError(
            f"the text section applies to data with prompts (shapes, captions, caption_latents), not {config.data.name}"
        )
    check_conditions(config)
    return config


def diffusers_defaults(model: ModelConfig, objective_raw: dict, text_raw: Any) -> tuple[dict, dict]:
    """The objective and text sections of a diffusers model: the prompts are encoded by the
    pipeline's own text encoders (``text.encoder: pipeline``, its folder ``model.pretrained``) and,
    where the config leaves them unset, the finite-difference stencil is the families' measured
    ``objective.epsilon`` with fp32 target passes (see docs/diffusers.md)."""
    if text_raw is not None and not isinstance(text_raw, dict):
        raise ConfigError("'text' must be a mapping of keys to values")
    text = dict(text_raw or {})
    encoder = text.setdefault("encoder", "pipeline")
    if encoder != "pipeline":
        raise ConfigError(
            f"model.name=diffusers reads prompts as its pipeline encodes them: set text.encoder=pipeline, not {encoder}"
        )
    if text.get("path") is None:
        text["path"] = model.pretrained
    elif str(text["path"]) != model.pretrained:
        raise ConfigError(f"text.path ({text['path']}) must be model.pretrained ({model.pretrained}) or null")
    objective = dict(objective_raw)
    name = objective.get("name", DEFAULT_OBJECTIVE)
    fields = getattr(OBJECTIVES.get(name, (None,))[0], "__dataclass_fields__", {})
    if "epsilon" in fields and "epsilon" not in objective:
        objective["epsilon"] = DIFFUSERS_FD_EPSILON
        if "fp32_target_passes" not in objective:
            objective.setdefault("target_precision", "fp32")
    return objective, text


def check_diffusers_targets(config: Config) -> None:
    """Refuse train.init_from (the weights are the pipeline's) and, on a diffusers model, target passes
    in bf16 or TF32 with a fine finite-difference stencil: their rounding (about 4e-3 and 5e-4 of each
    value) divided by 2 epsilon swamps du/dt."""
    if config.train.init_from is not None:
        raise ConfigError("train.init_from does not apply to model.name=diffusers: it starts from model.pretrained")
    objective = config.objective
    epsilon = getattr(objective, "epsilon", None)
    precision = getattr(objective, "target_precision", "fp32")
    if epsilon is None or getattr(objective, "derivative", "") != "finite_difference":
        return
    if epsilon < 0.01 and precision != "fp32" and not config.model.allow_coarse_targets:
        raise ConfigError(
            f"objective.target_precision={precision} rounds the target passes far more than objective.epsilon="
            f"{epsilon:g} can resolve: set objective.target_precision=fp32 "
            "(or model.allow_coarse_targets=true to insist)"
        )


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"objective.beta=0.5"`` -> (["objective", "beta"], 0.5); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"override {text!r} must look like key=value (for example train.steps=100); --set takes every "
            "word after it up to the next option, so give CONFIG before --set"
        )
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value  # not YAML: keep the raw string and let the type check decide
    return key.strip().split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for i, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"cannot set '{text.partition('=')[0]}': '{'.'.join(keys[: i + 1])}' is not a section"
                )
            node = child
        node[keys[-1]] = value
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key that appears twice in one mapping (it keeps the last
    silently: a second ``train:`` block would drop the first)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise ConfigError(
                f"duplicate key '{key}' (lines {seen[key] + 1} and {key_node.start_mark.line + 1} of "
                f"{key_node.start_mark.name}): merge the two"
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def find_config(path: str | Path) -> Path:
    """``path`` itself, or else the config of that name shipped inside the package: the shipped
    ``configs/toy/moons-dumo.yaml`` is found from any working directory (as ``toy/moons-dumo.yaml`` too)."""
    path = Path(path).expanduser()
    if path.is_file() or path.is_absolute():
        return path
    from importlib import resources

    shipped = Path(str(resources.files("dumo") / "configs"))
    parts = path.parts[1:] if path.parts and path.parts[0] == "configs" else path.parts
    candidate = shipped.joinpath(*parts) if parts else shipped
    return candidate if candidate.is_file() else path


def read_yaml(path: str | Path) -> Any:
    path = find_config(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open() as handle:  # a file (not its text) so that marks name the path
            return yaml.load(handle, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or "parse error"
        raise ConfigError(f"{path} is not valid YAML: {problem}{where}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``key=value`` overrides, validate."""
    raw = read_yaml(path)
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections; got {type(raw).__name__}")
    return config_from_dict(apply_overrides(raw or {}, overrides or []))


def config_text(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def save_config(config: Config, path: str | Path) -> bool:
    """Write ``config`` to ``path`` atomically (temp file, fsync, rename), only if the file's
    content would change; a cut-off write leaves the previous file. True when it was written."""
    from dumo.files import atomic_write

    path = Path(path)
    text = config_text(config)
    if path.is_file() and not path.is_symlink() and path.read_text() == text:
        return False
    atomic_write(path, text.encode())
    return True


def config_differences(a: Config, b: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between two configs (keys in ``ignore`` skipped)."""

    def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                out.update(flatten(value, f"{prefix}{key}."))
            return out
        return {prefix[:-1]: node}

    flat_a, flat_b = flatten(a.to_dict()), flatten(b.to_dict())
    keys = sorted(set(flat_a) | set(flat_b))
    return [k for k in keys if k not in ignore and flat_a.get(k) != flat_b.get(k)]

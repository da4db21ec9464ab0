"""Starting a run from existing weights (``train.init_from``): a dumo run, an export or a safetensors file.

The mapping is explicit, tensor by tensor:

- same architecture (continuation): every tensor is copied;
- a head the source lacks starts as its objective declares (``Objective.head_inits``, a
  :class:`~dumo.objectives.terms.HeadInit` per head): a copy of a source head (DuMo's u and
  MeanFlow's u: the Flow Matching teacher's v), or, where the declaration allows it and the model
  also trains that source head, its own zero initialisation (``model.u_head_init: zero``); a head
  that reads the interval t - r gets a new interval embedding with a zero output layer, so at step 0
  it gives the teacher's velocity for every r;
- a shared trunk -> a DiT with ``model.head_blocks`` k: the source's last k blocks become each
  head's own blocks (every head's path computes what the source computed at step 0).

Anything else that does not fit (a missing backbone tensor, a shape that differs) is refused
with one line naming the first such tensor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from dumo.errors import CheckpointError
from dumo.files import FORMAT, MODEL_FORMAT, load_checkpoint
from dumo.objectives.terms import HeadInit
from dumo.runs.checkpoints import unprefixed
from dumo.runs.layout import CONFIG_FILE, EXPORTED_WEIGHTS, list_checkpoints

HEADS = "heads."
INTERVAL = "backbone.conditioning.interval."
BLOCKS = "backbone.blocks."
HEAD_BLOCK = re.compile(r"heads\.\w+\.blocks\.(\d+)\.(.+)")


@dataclass
class InitialWeights:
    """The weights a run starts from, and what was done to fit them to the model."""

    state: dict[str, Tensor]
    source: Path
    copied: int = 0
    filled: list[str] = field(default_factory=list)  # how tensors the source lacks were made
    dropped: list[str] = field(default_factory=list)  # source heads the model does not have

    def summary(self) -> str:
        parts = [f"{self.copied} tensors copied from {self.source}"]
        parts += self.filled
        if self.dropped:
            parts.append(f"not used: {', '.join(self.dropped)}")
        return "; ".join(parts)


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], Path]:
    """The weights stored at ``path`` (EMA weights of a run's latest checkpoint, an export's
    weights, or a safetensors file of either kind or a plain state dict), and the file read."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / EXPORTED_WEIGHTS).is_file():
            return load_checkpoint(path / EXPORTED_WEIGHTS, kind=MODEL_FORMAT)[0], path / EXPORTED_WEIGHTS
        if not (path / CONFIG_FILE).is_file():
            raise CheckpointError(f"train.init_from: {path} is not a dumo run or export directory (no {CONFIG_FILE})")
        found = list_checkpoints(path)
        if not found:
            raise CheckpointError(f"train.init_from: {path} has no checkpoints yet")
        return unprefixed(load_checkpoint(found[-1])[0], "ema."), found[-1]
    if not path.is_file():
        raise CheckpointError(f"train.init_from: {path} not found")
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"train.init_from: {path} is not a dumo run, export or .safetensors file "
            "(convert an official DiT or SiT checkpoint with 'dumo import-weights' first)"
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            kind = (handle.metadata() or {}).get("format")
    except Exception as error:  # safetensors raises several types for torn or foreign files
        raise CheckpointError(f"train.init_from: {path} is not a readable safetensors file: {error}") from None
    if kind == FORMAT:
        return unprefixed(load_checkpoint(path)[0], "ema."), path
    if kind == MODEL_FORMAT:
        return load_checkpoint(path, kind=MODEL_FORMAT)[0], path
    with safe_open(str(path), framework="pt") as handle:  # a plain state dict with dumo's names
        return {key: handle.get_tensor(key) for key in handle.keys()}, path  # noqa: SIM118 (not a dict)


def fit_weights(
    source: dict[str, Tensor],
    model: nn.Module,
    u_head_init: str = "copy_v",
    origin: Path | str = "init_from",
    head_inits: Mapping[str, HeadInit] | None = None,
) -> InitialWeights:
    """Map ``source`` onto the state dict of ``model`` (see the module docstring). ``head_inits``:
    how heads the source lacks start, by head name (the objective's ``head_inits()``); None: every
    head may start from the source's velocity head, as DuMo's and MeanFlow's do."""
    expected = model.state_dict()
    model_heads = list(dict.fromkeys(k.split(".")[1] for k in expected if k.startswith(HEADS)))
    if head_inits is None:
        head_inits = {head: HeadInit(zero_allowed=True, zero_interval=True) for head in model_heads}
    state: dict[str, Tensor] = {}
    result = InitialWeights(state, Path(origin))
    used: set[str] = set()
    started: dict[str, str] = {}  # head -> how it started, for the summary
    zeroed_interval = False
    # model.head_blocks: head block i is trunk block (shared depth + i) of a shared-trunk source
    shared_depth = len({k.split(".")[2] for k in expected if k.startswith(BLOCKS)})
    for key, target in expected.items():
        head_block = HEAD_BLOCK.fullmatch(key)
        trunk_key = head_block and f"{BLOCKS}{shared_depth + int(head_block[1])}.{head_block[2]}"
        head, init, from_key = head_source(key, head_inits)
        if key in source:
            name = key
        elif trunk_key in source:
            name = trunk_key
        elif init is not None and from_key in source:
            name = from_key
            if init.zero_allowed and u_head_init == "zero" and init.source in model_heads:
                state[key] = target.detach().clone()  # the model's own (zero) initialisation
                started[head] = f"{head}-head left at its zero initialisation"
                continue
            how = "copied from" if init.source in model_heads else "initialised from"
            started[head] = f"{head}-head {how} the {init.source}-head"
        elif key.startswith(INTERVAL) and any(init.zero_interval for init in head_inits.values()):
            # A new interval embedding whose output layer is zero adds nothing to the conditioning.
            last = max(int(k[len(INTERVAL) :].split(".")[1]) for k in expected if k.startswith(INTERVAL + "mlp."))
            is_output = key.startswith(f"{INTERVAL}mlp.{last}.")
            state[key] = torch.zeros_like(target) if is_output else target.detach().clone()
            zeroed_interval = True
            continue
        else:
            raise CheckpointError(f"train.init_from: {origin} has no tensor {key} (needed by this model)")
        if source[name].shape != target.shape:
            raise CheckpointError(
                f"train.init_from: {origin}: shape of {name} is {tuple(source[name].shape)}, "
                f"this model needs {tuple(target.shape)} for {key}"
            )
        state[key] = source[name].to(dtype=target.dtype, copy=True)  # own storage: a head may copy another
        used.add(name)
        result.copied += 1
    result.filled += started.values()
    if zeroed_interval:
        result.filled.append("new interval embedding with a zero output layer (u(x, r, t) = v(x, t) at step 0)")
    unused = sorted(set(source) - used)
    heads = sorted({k.split(".")[1] for k in unused if k.startswith(HEADS)})
    others = [k for k in unused if not k.startswith(HEADS)]
    if others:
        raise CheckpointError(f"train.init_from: {origin} has tensor {others[0]}, which this model does not have")
    result.dropped = [f"head {h}" for h in heads if h not in model_heads]
    return result


def head_source(key: str, head_inits: Mapping[str, HeadInit]) -> tuple[str, HeadInit | None, str]:
    """For a tensor of a head: (the head, its declared start, the source tensor it starts from)."""
    if not key.startswith(HEADS):
        return "", None, ""
    _, head, rest = key.split(".", 2)
    init = head_inits.get(head)
    return head, init, "" if init is None else f"{HEADS}{init.source}.{rest}"


#: model keys that change what the weights compute without changing any tensor's shape
SHAPELESS_MODEL_KEYS = ("time_embedding_scale", "position_order")


def recorded_model_keys(path: str | Path, weights_file: Path) -> dict:
    """The model section the source recorded: the config stored in the weights file read (a run's
    checkpoint, an export) over the folder's config.yaml, which a user may have edited or damaged;
    empty for a bare file that records none."""
    import json

    import yaml

    with safe_open(str(weights_file), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "config" in metadata:
        return json.loads(metadata["config"]).get("model") or {}
    config_file = Path(path).expanduser() / CONFIG_FILE
    if not config_file.is_file():
        return {}
    return (yaml.safe_load(config_file.read_text()) or {}).get("model") or {}


def check_model_keys(path: str | Path, weights_file: Path, model_config: object) -> None:
    """Refuse a source run or export whose recorded model keys would make the same tensors compute
    something else here (a SiT import needs time_embedding_scale 1, say). A bare file records none."""
    recorded = recorded_model_keys(path, weights_file)
    for key in SHAPELESS_MODEL_KEYS:
        if key in recorded and recorded[key] != getattr(model_config, key):
            raise CheckpointError(
                f"train.init_from: {path} was trained with model.{key}={recorded[key]}, this config has "
                f"{getattr(model_config, key)}; set model.{key}: {recorded[key]}"
            )


def initial_weights(
    path: str | Path,
    model: nn.Module,
    u_head_init: str = "copy_v",
    model_config: object | None = None,
    head_inits: Mapping[str, HeadInit] | None = None,
) -> InitialWeights:
    """Read ``path`` and fit its weights to ``model`` (checking ``model_config`` against the source's);
    ``head_inits`` as in :func:`fit_weights`."""
    source, origin = read_weights(path)
    if model_config is not None:
        check_model_keys(path, origin, model_config)
    return fit_weights(source, model, u_head_init, origin, head_inits)

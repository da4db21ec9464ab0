"""LoRA on the backbone of a two-headed diffusers transformer, through peft.

The backbone's attention projections get low-rank adapters (diffusers' own ``add_adapter``, so
the adapter is the one diffusers pipelines load); the u-head stays fully trainable, since it
starts as a copy of the v-head and must move away from it; everything else is frozen.

:func:`save_lora` writes the adapter in the standard diffusers format
(``pytorch_lora_weights.safetensors``, keys ``transformer.<module>.lora_A.weight``, loadable by
``pipeline.load_lora_weights``) and the u-head's output layers beside it (``u_head.safetensors``,
under the transformer's own names): a LoRA file cannot replace whole output layers.
"""

from __future__ import annotations

import copy
from pathlib import Path

from torch import Tensor, nn

from dumo.bridge.dual_head import DualHeadTransformer
from dumo.errors import CheckpointError

#: the attention projections of diffusers' attention blocks (self-, cross- and joint attention)
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
U_HEAD_FILE = "u_head.safetensors"


def attention_targets(transformer: nn.Module) -> list[str]:
    """The projection names of :data:`ATTENTION_PROJECTIONS` that ``transformer`` has."""
    names = {name for name, _ in transformer.named_modules()}
    return [target for target in ATTENTION_PROJECTIONS if any(name.endswith("." + target) for name in names)]


def apply_lora(
    model: DualHeadTransformer,
    rank: int = 16,
    alpha: float | None = None,
    targets: list[str] | None = None,
    train_v_head: bool = False,
) -> DualHeadTransformer:
    """Put LoRA adapters of ``rank`` on the backbone's attention projections (or ``targets``) and
    leave trainable only them and the u-head (and the v-head's output layers with ``train_v_head``)."""
    from peft import LoraConfig

    if rank < 1:
        raise CheckpointError(f"the LoRA rank must be at least 1; got {rank}")
    targets = attention_targets(model.transformer) if targets is None else list(targets)
    if not targets:
        raise CheckpointError(
            f"{type(model.transformer).__name__} has none of the attention projections {ATTENTION_PROJECTIONS}"
        )
    config = LoraConfig(
        r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=targets, init_lora_weights=True
    )
    model.transformer.add_adapter(config)
    head_names = model.family.head_state_names()
    for name, parameter in model.transformer.named_parameters():
        is_v_head = name.startswith(head_names)
        parameter.requires_grad_("lora_" in name or (train_v_head and is_v_head))
    model.u_head.requires_grad_(True)
    return model


def has_lora(transformer: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(module, BaseTunerLayer) for module in transformer.modules())


def merged_transformer(transformer: nn.Module) -> nn.Module:
    """A plain copy of ``transformer`` with its LoRA adapters merged into the weights (the original
    is left as it is)."""
    plain = copy.deepcopy(transformer)
    try:
        lora = has_lora(plain)
    except ImportError:  # without peft there can be no adapter
        lora = False
    if lora:
        plain.fuse_lora()
        plain.unload_lora()
    return plain


def save_lora(model: DualHeadTransformer, out: str | Path, state: dict[str, Tensor] | None = None) -> Path:
    """Write the backbone's adapter (diffusers' LoRA format) and the u-head's output layers to ``out``:
    ``model``'s own, or those of ``state``, a full state dict of it (a sharded model's, gathered)."""
    import diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    if not has_lora(model.transformer):
        raise CheckpointError("the model has no LoRA adapter to save (apply_lora first)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipeline_class = getattr(diffusers, model.family.pipeline_class)
    if state is None:
        layers = get_peft_model_state_dict(model.transformer)
        u_head = model.u_head_state()
    else:
        transformer = {
            key.removeprefix("transformer."): v for key, v in state.items() if key.startswith("transformer.")
        }
        layers = get_peft_model_state_dict(model.transformer, state_dict=transformer)
        u_head = {key.removeprefix("u_head."): value for key, value in state.items() if key.startswith("u_head.")}
    pipeline_class.save_lora_weights(out, transformer_lora_layers=layers, safe_serialization=True)
    u_head = {name: tensor.detach().contiguous() for name, tensor in u_head.items()}
    save_file(u_head, str(out / U_HEAD_FILE), metadata={"format": "pt", "dumo": "u-head output layers"})
    return out

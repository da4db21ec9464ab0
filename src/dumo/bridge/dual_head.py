"""DuMo's two heads on a diffusers transformer, without editing diffusers.

The transformer's own output layers stay the v-head. The u-head is a copy of them (SANA: with
its own ``scale_shift_table``) that reads the same last hidden states: a forward pre-hook on
``norm_out`` captures what it is given (hidden states and the time embedding) during the one
backbone pass, and the copy is applied to that. One pass gives both heads; the extra cost is one
output layer.

Copied from the v-head, the u-head starts as the teacher's one Euler step from t:
``x_t - t u(x_t, t) = x_t - t v(x_t, t)`` (``tests/test_bridge.py`` checks it per family).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from dumo.bridge.families import Family, OutputLayers, family_of
from dumo.conditioning import TextCondition
from dumo.errors import CheckpointError
from dumo.models.output import ModelOutput


def copied(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose tensors are cloned in the current mode (``copy.deepcopy`` of
    fake tensors, used to count FLOPs without weights, would put them in another fake mode)."""
    memo: dict[int, object] = {id(p): nn.Parameter(p.detach().clone(), p.requires_grad) for p in module.parameters()}
    memo.update({id(b): b.detach().clone() for b in module.buffers()})
    return copy.deepcopy(module, memo)


class DualHeadTransformer(nn.Module):
    """A diffusers flow transformer with a v-head (its own output layers) and a u-head (a copy).

    ``forward(x, t, r=None, cond=TextCondition)`` takes dumo's convention (NCHW latents, t in
    [0, 1] with noise at 1) and returns ``ModelOutput(v=..., u=...)``, so dumo's objectives and
    samplers use it like any dumo network. Rows of ``cond`` flagged null read the null prompt
    (the pipeline's encoding of the empty prompt, given by :meth:`set_null_prompt`).
    """

    #: its conditioner's kind: prompts, whose null rows read the null prompt (guidance, prompt dropout)
    condition_kind = "text"

    def __init__(self, transformer: nn.Module, family: Family | None = None):
        super().__init__()
        self.family = family_of(transformer) if family is None else family
        self.transformer = transformer
        self.u_head: OutputLayers = copied(self.family.output_layers(transformer))
        self.head_names = ("v", "u")

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """``train.activation_checkpointing``: the transformer's own (diffusers') recomputation of its
        blocks in the backward pass; the u-head reads the last hidden states either way."""
        if enabled:
            self.transformer.enable_gradient_checkpointing()
        else:
            self.transformer.disable_gradient_checkpointing()

    def shard_units(self) -> list[nn.Module]:
        """The transformer's blocks (SANA's and SD3's ``transformer_blocks``, FLUX's double- and
        single-stream ones), which FSDP shards one by one; the embeddings and both heads form the root."""
        lists = [child for name, child in self.transformer.named_children() if name.endswith("blocks")]
        return [block for blocks in lists if isinstance(blocks, nn.ModuleList) for block in blocks]

    @property
    def patch_size(self) -> int:
        return int(getattr(self.transformer.config, "patch_size", 1) or 1)

    def set_null_prompt(self, tokens: Tensor, mask: Tensor, pooled: Tensor | None = None) -> None:
        """The unconditional input of guidance and of prompt dropout: (1, L, D) embeddings of the
        empty prompt as the pipeline encodes it, its (1, L) mask and (1, D_pooled) pooled vector."""
        if tokens.dim() != 3 or tokens.shape[0] != 1:
            raise CheckpointError(f"the null prompt must be one row of embeddings (1, L, D); got {tuple(tokens.shape)}")
        self.register_buffer("null_tokens", tokens.detach().clone())
        self.register_buffer("null_mask", mask.detach().clone().bool().reshape(1, -1))
        if pooled is not None:
            self.register_buffer("null_pooled", pooled.detach().clone().reshape(1, -1))

    def null_like(self, cond: TextCondition | None) -> TextCondition | None:
        """``cond`` with every row the null prompt (the unconditional input of guidance)."""
        return None if cond is None else cond.with_null()

    def drop(self, cond: TextCondition | None, rows: Tensor) -> TextCondition | None:
        """``cond`` with the rows where ``rows`` holds replaced by the null prompt (prompt dropout)."""
        return None if cond is None else cond.with_null(rows)

    def is_null(self, cond: TextCondition) -> Tensor:
        return cond.null

    def with_null_prompt(self, cond: TextCondition) -> TextCondition:
        """``cond`` with its null rows replaced by the null prompt."""
        null_tokens = getattr(self, "null_tokens", None)
        if null_tokens is None:
            if bool(cond.null.any()):
                raise CheckpointError("null prompts need the model's null prompt (set_null_prompt) and it has none")
            return cond
        # replaced by torch.where whether or not a row is null: no data-dependent branch (fake tensors count FLOPs)
        if null_tokens.shape[1:] != cond.tokens.shape[1:]:
            raise CheckpointError(
                f"the null prompt's embeddings {tuple(null_tokens.shape[1:])} differ from the prompts' "
                f"{tuple(cond.tokens.shape[1:])}: encode both with the same length"
            )
        rows = cond.null.reshape(-1, 1)
        tokens = torch.where(rows[..., None], null_tokens.to(cond.tokens.dtype), cond.tokens)
        mask = torch.where(rows, self.null_mask, cond.mask.bool())
        pooled = cond.pooled if self.family.reads_pooled else None
        if pooled is not None:
            null_pooled = getattr(self, "null_pooled", None)
            if null_pooled is None:
                raise CheckpointError("the null prompt has no pooled vector and the prompts have one")
            pooled = torch.where(rows, null_pooled.to(pooled.dtype), pooled)
        return TextCondition(tokens, mask, pooled, cond.null)

    def forward(self, x: Tensor, t: Tensor, r: Tensor | None = None, cond: TextCondition | None = None) -> ModelOutput:
        if not isinstance(cond, TextCondition):
            raise CheckpointError("a diffusers text-to-image transformer needs prompts (a TextCondition)")
        cond = self.with_null_prompt(cond)
        captured: list[tuple[Tensor, Tensor]] = []

        def capture(_module: nn.Module, args: tuple) -> None:
            captured.append((args[0], args[1]))

        handle = self.transformer.norm_out.register_forward_pre_hook(capture)
        try:
            v = self.family.velocity(self.transformer, x, t, cond)
        finally:
            handle.remove()
        hidden, temb = captured[-1]
        u = self.family.head_output(self.u_head, hidden, temb, x, self.patch_size)
        return ModelOutput(v=v, u=u)

    def u_head_state(self) -> dict[str, Tensor]:
        """The u-head's weights under the transformer's own names (``norm_out.*``, ``proj_out.*``,
        ``scale_shift_table``): loading them into a plain transformer makes it the u-head's model."""
        return {name: tensor for name, tensor in self.u_head.state_dict().items()}

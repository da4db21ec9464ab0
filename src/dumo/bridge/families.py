"""The diffusers flow-matching transformers dumo can drive, one class per family.

Every family answers the same call, in dumo's convention: latents ``x`` (B, C, H, W) at time ``t``
in [0, 1] on the path ``x_t = t z + (1 - t) x_0`` (noise at t = 1) and the prompt's embeddings;
out comes the velocity ``v = dx_t/dt = z - x_0``, (B, C, H, W).

diffusers' flow-match pipelines use the same path and the same sign: ``FlowMatchEulerDiscreteScheduler``
steps ``x + (sigma_next - sigma) * model_output`` with sigma = t, so the transformer's output is
dumo's v as it is. What differs between families is how t enters (SANA and SD3 read ``1000 t``,
FLUX reads t and multiplies by 1000 inside), what the prompt brings (SD3 and FLUX a pooled vector,
FLUX a guidance scale and position ids) and the layout of the output (FLUX works on 2x2 patches
packed into tokens). ``tests/test_bridge.py`` checks each against the family's own pipeline.

The output layers (``norm_out`` + ``proj_out``, and SANA's ``scale_shift_table``) are the part
the two-headed wrapper duplicates; :meth:`Family.head_output` applies a set of them to the last
hidden states, so that a copy of the layers gives exactly the transformer's own output.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor, nn

from dumo.conditioning import TextCondition
from dumo.errors import CheckpointError


class OutputLayers(nn.Module):
    """One family's output layers: ``norm_out``, ``proj_out`` and SANA's ``scale_shift_table``."""

    def __init__(self, norm_out: nn.Module, proj_out: nn.Module, scale_shift_table: Tensor | None = None):
        super().__init__()
        self.norm_out = norm_out
        self.proj_out = proj_out
        if scale_shift_table is not None:
            self.scale_shift_table = nn.Parameter(scale_shift_table.detach().clone())
        else:
            self.scale_shift_table = None


class Family(ABC):
    """How one diffusers transformer class is called in dumo's convention."""

    name: ClassVar[str]
    transformer_class: ClassVar[str]
    pipeline_class: ClassVar[str]
    #: the transformer's parameters (not modules) that belong to its output layers
    head_parameters: ClassVar[tuple[str, ...]] = ()
    #: whether the transformer reads the prompt's pooled vector (SD3, FLUX) or not (SANA)
    reads_pooled: ClassVar[bool] = True
    #: half-width in t of DuMo's finite-difference stencil (``objective.epsilon``) for this family.
    #: The time embedding's sinusoids of 1000 t reach 1000 rad per unit of t, so a stencil of e
    #: smooths them by sin(1000 e) / (1000 e): dumo's default 0.05 (chosen for its own networks)
    #: misses most of du/dt here. Measured against torch.func.jvp in docs/diffusers.md.
    fd_epsilon: ClassVar[float] = 1e-4

    def output_layers(self, transformer: nn.Module) -> OutputLayers:
        """The transformer's own output layers (shared, not copied)."""
        table = getattr(transformer, "scale_shift_table", None) if self.head_parameters else None
        return OutputLayers(transformer.norm_out, transformer.proj_out, table)

    def head_state_names(self) -> tuple[str, ...]:
        """Prefixes of the transformer's state-dict keys that hold the output layers."""
        return ("norm_out.", "proj_out.", *self.head_parameters)

    def check_condition(self, cond: TextCondition) -> None:
        if cond.tokens.dim() != 3:
            raise CheckpointError(
                f"a {self.name} transformer reads prompt embeddings (B, L, D); got token ids {tuple(cond.tokens.shape)}"
            )

    @abstractmethod
    def velocity(self, transformer: nn.Module, x: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        """dumo's velocity at (x, t) from the transformer's own output layers."""

    @abstractmethod
    def head_output(self, layers: OutputLayers, hidden: Tensor, temb: Tensor, like: Tensor, patch: int) -> Tensor:
        """``layers`` applied to the last hidden states (what ``norm_out`` reads), unpatchified like ``like``."""


def _batch_time(t: Tensor, x: Tensor) -> Tensor:
    return t.to(x.dtype).reshape(-1).expand(x.shape[0])


def _unpatchify(tokens: Tensor, like: Tensor, patch: int) -> Tensor:
    """(B, h*w, p*p*C) tokens in (p, q, C) order back to (B, C, h*p, w*p), as SANA and SD3 do."""
    batch, _, height, width = like.shape
    grid_h, grid_w = height // patch, width // patch
    tokens = tokens.reshape(batch, grid_h, grid_w, patch, patch, -1)
    return torch.einsum("nhwpqc->nchpwq", tokens).reshape(batch, -1, height, width)


def pack_latents(x: Tensor) -> Tensor:
    """FLUX's layout: (B, C, H, W) -> (B, H/2 * W/2, 4C), each token a 2x2 patch (channel-major)."""
    batch, channels, height, width = x.shape
    x = x.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: Tensor, like: Tensor) -> Tensor:
    """The inverse of :func:`pack_latents` for latents shaped like ``like``."""
    batch, channels, height, width = like.shape
    tokens = tokens.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return tokens.reshape(batch, channels, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """FLUX's position ids of the packed latent tokens: (row, column) of each 2x2 patch."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class SanaFamily(Family):
    """``SanaTransformer2DModel``: timestep ``1000 t * timestep_scale``, a padding mask, a
    ``scale_shift_table`` on the output norm."""

    name = "sana"
    transformer_class = "SanaTransformer2DModel"
    pipeline_class = "SanaPipeline"
    head_parameters = ("scale_shift_table",)
    reads_pooled = False

    def timestep(self, transformer: nn.Module, t: Tensor) -> Tensor:
        return t * 1000.0 * transformer.config.timestep_scale

    def velocity(self, transformer: nn.Module, x: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        self.check_condition(cond)
        out = transformer(
            x,
            encoder_hidden_states=cond.tokens.to(x.dtype),
            encoder_attention_mask=cond.mask.to(x.dtype),
            timestep=self.timestep(transformer, _batch_time(t, x)),
            return_dict=False,
        )[0]
        return out[:, : x.shape[1]]  # a learned-sigma model's second half is not a velocity

    def head_output(self, layers: OutputLayers, hidden: Tensor, temb: Tensor, like: Tensor, patch: int) -> Tensor:
        tokens = layers.proj_out(layers.norm_out(hidden, temb, layers.scale_shift_table))
        return _unpatchify(tokens, like, patch)[:, : like.shape[1]]


class SD3Family(Family):
    """``SD3Transformer2DModel``: timestep ``1000 t``, a pooled prompt vector, no padding mask
    (the pipeline attends to every token of the padded prompt, and so does this call)."""

    name = "sd3"
    transformer_class = "SD3Transformer2DModel"
    pipeline_class = "StableDiffusion3Pipeline"

    def velocity(self, transformer: nn.Module, x: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        self.check_condition(cond)
        if cond.pooled is None:
            raise CheckpointError("an SD3 transformer needs the prompt's pooled vector (TextCondition.pooled)")
        return transformer(
            x,
            encoder_hidden_states=cond.tokens.to(x.dtype),
            pooled_projections=cond.pooled.to(x.dtype),
            timestep=_batch_time(t, x) * 1000.0,
            return_dict=False,
        )[0]

    def head_output(self, layers: OutputLayers, hidden: Tensor, temb: Tensor, like: Tensor, patch: int) -> Tensor:
        tokens = layers.proj_out(layers.norm_out(hidden, temb))
        return _unpatchify(tokens, like, patch)


class FluxFamily(Family):
    """``FluxTransformer2DModel``: timestep t (scaled by 1000 inside), latents packed in 2x2
    patches, position ids, a pooled vector and, for guidance-distilled models, a guidance scale."""

    name = "flux"
    transformer_class = "FluxTransformer2DModel"
    pipeline_class = "FluxPipeline"

    def __init__(self, guidance: float = 3.5):
        self.guidance = guidance

    def velocity(self, transformer: nn.Module, x: Tensor, t: Tensor, cond: TextCondition) -> Tensor:
        self.check_condition(cond)
        if cond.pooled is None:
            raise CheckpointError("a FLUX transformer needs the prompt's pooled vector (TextCondition.pooled)")
        if x.shape[2] % 2 or x.shape[3] % 2:
            raise CheckpointError(f"FLUX packs 2x2 latent patches; latents {tuple(x.shape)} have an odd side")
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((x.shape[0],), self.guidance, device=x.device, dtype=x.dtype)
        out = transformer(
            pack_latents(x),
            encoder_hidden_states=cond.tokens.to(x.dtype),
            pooled_projections=cond.pooled.to(x.dtype),
            timestep=_batch_time(t, x),
            guidance=guidance,
            img_ids=latent_image_ids(x.shape[2], x.shape[3], x.device, x.dtype),
            txt_ids=torch.zeros(cond.tokens.shape[1], 3, device=x.device, dtype=x.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, x)

    def head_output(self, layers: OutputLayers, hidden: Tensor, temb: Tensor, like: Tensor, patch: int) -> Tensor:
        return unpack_latents(layers.proj_out(layers.norm_out(hidden, temb)), like)


FAMILIES: dict[str, type[Family]] = {cls.transformer_class: cls for cls in (SanaFamily, SD3Family, FluxFamily)}


def family_of(transformer: nn.Module | str) -> Family:
    """The family of a diffusers transformer (an instance or its class name)."""
    name = transformer if isinstance(transformer, str) else type(transformer).__name__
    if name not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise CheckpointError(f"dumo cannot drive a {name}; it knows {known}")
    return FAMILIES[name]()

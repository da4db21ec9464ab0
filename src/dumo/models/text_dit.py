"""Text-conditioned Diffusion Transformer (TextDiT) for text-to-image, in the style of PixArt-alpha and SANA.

Each block is a DiT block (adaLN-zero self-attention and MLP, :mod:`dumo.models.dit`) with a
cross-attention sublayer to the prompt's tokens between the two. The cross-attention's output
projection starts at zero and the adaLN gates start at zero, so every block starts as the identity.
The blocks are modulated by the time embedding(s) (t, and MeanFlow's interval t - r when
``time_inputs=2``) plus a projection of the prompt's pooled vector. The backbone returns
(tokens, conditioning vector) like ``DiTBackbone``, so ``FlowModel`` gives it DiT's v and u heads.

Prompts arrive as a :class:`~dumo.conditioning.TextCondition` of either kind:

- float embeddings (B, L, text_dim) of a frozen encoder (T5, Gemma, ...) computed ahead of training;
- token ids (B, L) for a trainable ``text_encoder`` inside the network: any module with
  ``forward(ids, mask) -> (tokens (B, L, text_dim), mask, pooled (B, text_dim) or None)``.

The tokens are projected to the text width (Linear, GELU, Linear, LayerNorm: the norm puts the
keys and values at one scale whatever the encoder's). The pooled vector comes with the embeddings
(``TextCondition.pooled``, of width ``pooled_dim``, default ``text_dim``) or from the trainable encoder;
without one it is the mean of the real tokens.

The null prompt (classifier-free guidance's unconditional input, which prompt dropout trains): one
learned token, in the projected text space, stands in front of every prompt and is always attended
to. A row whose ``null`` flag is set masks out all of its prompt tokens, so it attends to the null
token alone and its output cannot depend on its prompt; its pooled vector is replaced by a learned
null pooled vector. No row is ever fully masked (attention over no keys is NaN), and a prompt with
no real token reads the null token too. ``cond=None`` is a batch of null rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dumo.conditioning import Condition, TextCondition, TextPrompts
from dumo.errors import ConfigError
from dumo.models.dit import (
    DIT_SIZES,
    DiTBlock,
    DiTHead,
    call_block,
    initialise_blocks,
    sincos_position_embedding,
)
from dumo.models.embeddings import Conditioning, modulate
from dumo.models.heads import FlowModel


@dataclass(frozen=True)
class TextDiTSize:
    hidden_dim: int
    depth: int
    num_heads: int  # self-attention heads
    text_width: int  # width of the projected prompt tokens, which the cross-attention's keys and values read
    cross_heads: int  # cross-attention heads


#: DiT's sizes, with prompt tokens projected to the model's width and as many cross- as self-attention heads.
#: TextDiT-XL/2 has PixArt-alpha's width and depth (PixArt shares one adaLN projection across blocks; here
#: each block has its own, as in DiT).
TEXT_DIT_SIZES = {
    name: TextDiTSize(size.hidden_dim, size.depth, size.num_heads, size.hidden_dim, size.num_heads)
    for name, size in DIT_SIZES.items()
}
TEXT_DIT_NAME = re.compile(r"^TextDiT-(XS|S|B|L|XL)/([124])$")


def parse_text_dit_name(name: str) -> tuple[TextDiTSize, int] | None:
    """``"TextDiT-XL/2"`` -> (size, patch size); None when ``name`` is not a TextDiT name."""
    match = TEXT_DIT_NAME.match(name)
    return (TEXT_DIT_SIZES[match.group(1)], int(match.group(2))) if match else None


class CrossAttention(nn.Module):
    """Image tokens attend to text tokens; ``mask`` (B, L) is True where a text token takes part."""

    def __init__(self, dim: int, text_width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(text_width, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, text: Tensor, mask: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        query = self.query(x).reshape(batch, tokens, heads, head_dim).transpose(1, 2)
        key_value = self.key_value(text).reshape(batch, text.shape[1], 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(query, key_value[0], key_value[1], attn_mask=mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class TextDiTBlock(DiTBlock):
    """DiT's block with cross-attention to the prompt between self-attention and the MLP."""

    def __init__(self, dim: int, num_heads: int, text_width: int, cross_heads: int, mlp_ratio: float = 4.0):
        super().__init__(dim, num_heads, mlp_ratio)
        self.norm_cross = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = CrossAttention(dim, text_width, cross_heads)

    def forward(self, x: Tensor, cond: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross_attn(self.norm_cross(x), text, text_mask)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class TextConditioner(nn.Module, TextPrompts):
    """A TextCondition -> (tokens (B, 1 + L, text_width) with the null token first, their mask (B, 1 + L),
    pooled vector (B, cond_dim)) for the blocks; a row's null prompt is its ``null`` flag."""

    def __init__(
        self,
        text_dim: int,
        text_width: int,
        cond_dim: int,
        pooled_dim: int | None = None,
        text_encoder: nn.Module | None = None,
    ):
        super().__init__()
        self.text_dim, self.pooled_dim = text_dim, pooled_dim or text_dim
        self.encoder = text_encoder
        self.projection = nn.Sequential(
            nn.Linear(text_dim, text_width),
            nn.GELU(approximate="tanh"),
            nn.Linear(text_width, text_width),
            nn.LayerNorm(text_width),
        )
        self.pooled_projection = nn.Sequential(
            nn.Linear(self.pooled_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )
        self.null_token = nn.Parameter(torch.empty(1, 1, text_width))
        self.null_pooled = nn.Parameter(torch.empty(cond_dim))
        self.initialise_embeddings()

    def initialise_embeddings(self) -> None:
        """The pooled projection like the time embeddings, the null token at the scale of the normalised tokens."""
        nn.init.normal_(self.pooled_projection[0].weight, std=0.02)
        nn.init.normal_(self.pooled_projection[2].weight, std=0.02)
        nn.init.normal_(self.null_token)
        nn.init.normal_(self.null_pooled, std=0.02)

    def forward(self, cond: TextCondition | None, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
        null_token = self.null_token.expand(batch_size, 1, -1)
        if cond is None:  # an unconditional call: every row is the null prompt
            mask = torch.ones(batch_size, 1, dtype=torch.bool, device=null_token.device)
            return null_token, mask, self.null_pooled.expand(batch_size, -1)
        tokens, mask, pooled = self.encode(cond)
        null = cond.null.to(mask.device)
        real = mask.bool() & ~null[:, None]
        dtype = self.projection[0].weight.dtype
        # Padding and the prompts of null rows are zeroed, not only masked: a NaN there would
        # otherwise reach the projection's gradient (0 * NaN).
        tokens = torch.where(real[..., None], tokens.to(dtype), 0)
        if pooled is None:
            pooled = tokens.sum(1) / real.sum(1, keepdim=True).clamp(min=1)
        pooled = torch.where(null[:, None], 0, pooled.to(dtype))
        projected = self.projection(tokens)
        text = torch.cat([null_token.to(projected.dtype), projected], dim=1)
        text_mask = torch.cat([real.new_ones(batch_size, 1), real], dim=1)
        pooled = torch.where(null[:, None], self.null_pooled, self.pooled_projection(pooled))
        return text, text_mask, pooled

    def encode(self, cond: TextCondition) -> tuple[Tensor, Tensor, Tensor | None]:
        """The encoder's (tokens, mask, pooled) for ``cond``: run on token ids, or given as embeddings."""
        if cond.tokens.dim() == 2:
            if self.encoder is None:
                raise ConfigError(
                    "the prompts are token ids but this TextDiT has no text encoder: build it with text_encoder=..., "
                    "or give the embeddings of a frozen encoder"
                )
            tokens, mask, pooled = self.encoder(cond.tokens, cond.mask)
        else:
            tokens, mask, pooled = cond.tokens, cond.mask, cond.pooled
        if tokens.shape[-1] != self.text_dim:
            raise ConfigError(
                f"the text embeddings are {tokens.shape[-1]} wide but this TextDiT was built for "
                f"text_dim={self.text_dim}"
            )
        if pooled is not None and pooled.shape[-1] != self.pooled_dim:
            raise ConfigError(
                f"the pooled text vectors are {pooled.shape[-1]} wide but this TextDiT was built for "
                f"pooled_dim={self.pooled_dim}"
            )
        return tokens, mask, pooled


class TextDiTBackbone(nn.Module):
    """Patchify, add positions, run the blocks on the prompt; returns token features and the conditioning."""

    def __init__(
        self,
        input_size: int,
        in_channels: int,
        size: TextDiTSize,
        patch_size: int,
        text_dim: int,
        time_inputs: int = 1,
        mlp_ratio: float = 4.0,
        time_scale: float = 100.0,
        text_encoder: nn.Module | None = None,
        pooled_dim: int | None = None,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by the patch size {patch_size}")
        dim = size.hidden_dim
        self.patch_size = patch_size
        self.grid = input_size // patch_size
        self.patch_embedding = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("position", sincos_position_embedding(dim, self.grid)[None], persistent=False)
        self.conditioning = Conditioning(dim, 0, time_inputs, time_scale=time_scale)
        self.text = TextConditioner(text_dim, size.text_width, dim, pooled_dim, text_encoder)
        self.blocks = nn.ModuleList(
            TextDiTBlock(dim, size.num_heads, size.text_width, size.cross_heads, mlp_ratio) for _ in range(size.depth)
        )
        self.initialise()

    def initialise(self) -> None:
        # The text encoder keeps its own (maybe pretrained) weights.
        encoder = set() if self.text.encoder is None else set(self.text.encoder.modules())
        initialise_blocks(module for module in self.modules() if module not in encoder)
        weight = self.patch_embedding.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.patch_embedding.bias)
        for embedding in (self.conditioning.time, self.conditioning.interval):
            if embedding is not None:
                nn.init.normal_(embedding.mlp[0].weight, std=0.02)
                nn.init.normal_(embedding.mlp[2].weight, std=0.02)
        self.text.initialise_embeddings()
        for block in self.blocks:  # the cross-attention adds nothing at first: each block starts as the identity
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)

    def forward(self, x: Tensor, t: Tensor, r: Tensor | None = None, cond: Condition = None) -> tuple[Tensor, Tensor]:
        prompts = prompts_of(cond, x.shape[0])
        text, text_mask, pooled = self.text(prompts, x.shape[0])
        vector = self.conditioning(t, r, None, x.shape[0]) + pooled
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2) + self.position.to(x.dtype)
        for block in self.blocks:
            tokens = call_block(block, tokens, vector, text, text_mask)
        return tokens, vector


def prompts_of(cond: object, batch_size: int) -> TextCondition | None:
    """``cond`` checked to be the prompts of the batch."""
    if cond is None:
        return None
    if not isinstance(cond, TextCondition):
        raise ConfigError(
            f"a TextDiT is conditioned on prompts (TextCondition); got {type(cond).__name__}: "
            "class labels need a DiT model"
        )
    if len(cond) != batch_size:
        raise ValueError(f"{len(cond)} prompts for a batch of {batch_size} samples")
    return cond


def build_text_dit(
    name: str,
    input_size: int,
    in_channels: int,
    text_dim: int,
    heads: tuple[str, ...] = ("v", "u"),
    time_inputs: int = 1,
    time_scale: float = 100.0,
    text_encoder: nn.Module | None = None,
    pooled_dim: int | None = None,
    mlp_ratio: float = 4.0,
    size: TextDiTSize | None = None,
) -> FlowModel:
    """The TextDiT ``name`` (e.g. ``"TextDiT-XL/2"``) on ``in_channels`` x ``input_size``^2 images or latents,
    reading prompts of width ``text_dim``, with DiT's final layer as each of ``heads``; ``size`` replaces
    the name's own width, depth and heads."""
    parsed = parse_text_dit_name(name)
    if parsed is None:
        raise ConfigError(f"{name!r} is not a TextDiT name; expected TextDiT-{{XS,S,B,L,XL}}/{{1,2,4}}")
    size, patch = size or parsed[0], parsed[1]
    if input_size % patch:
        raise ConfigError(f"{name} has patch size {patch}, which does not divide the image size {input_size}")
    backbone = TextDiTBackbone(
        input_size, in_channels, size, patch, text_dim, time_inputs, mlp_ratio, time_scale, text_encoder, pooled_dim
    )
    return FlowModel(
        backbone,
        DiTHead,
        heads,
        hidden_dim=size.hidden_dim,
        patch_size=patch,
        out_channels=in_channels,
        grid=backbone.grid,
    )


__all__ = [
    "TEXT_DIT_SIZES",
    "TextConditioner",
    "TextDiTBackbone",
    "TextDiTBlock",
    "TextDiTSize",
    "build_text_dit",
    "parse_text_dit_name",
]

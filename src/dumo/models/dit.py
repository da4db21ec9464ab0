"""Diffusion Transformer (DiT) backbone with adaLN-zero blocks, and its patch output head.

Sizes follow DiT (S, B, L, XL) with patch sizes 1, 2 or 4, named like ``DiT-XL/2``; ``DiT-XS`` is
dumo's own small preset (width 96, depth 4) for 8x8 to 28x28 data on a CPU. For DuMo the
u-head is a second copy of the final layer (adaLN modulation + linear): about 3M parameters on
DiT-XL/2. Attention uses ``scaled_dot_product_attention``, so the no-grad passes of the
finite-difference target get PyTorch's fused kernels.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dumo.conditioning import Condition
from dumo.models.embeddings import ConditionerFactory, Conditioning, LabelEmbedding, modulate


@dataclass(frozen=True)
class DiTSize:
    hidden_dim: int
    depth: int
    num_heads: int


DIT_SIZES = {
    "XS": DiTSize(96, 4, 4),  # dumo's preset for 8x8-28x28 data on a CPU (not a size of the DiT paper)
    "S": DiTSize(384, 12, 6),
    "B": DiTSize(768, 12, 12),
    "L": DiTSize(1024, 24, 16),
    "XL": DiTSize(1152, 28, 16),
}
DIT_NAME = re.compile(r"^DiT-(XS|S|B|L|XL)/([124])$")


def parse_dit_name(name: str) -> tuple[DiTSize, int] | None:
    """``"DiT-XL/2"`` -> (size, patch size); None when ``name`` is not a DiT name."""
    match = DIT_NAME.match(name)
    return (DIT_SIZES[match.group(1)], int(match.group(2))) if match else None


POSITION_ORDERS = ("rows_first", "columns_first")


def sincos_position_embedding(dim: int, grid: int, order: str = "rows_first") -> Tensor:
    """Fixed 2-D sine-cosine position embedding, shape (grid * grid, dim), tokens in row-major order.

    Each token gets [sin, cos] of its row (y) and of its column (x) coordinate, dim / 4 frequencies
    each. ``rows_first`` (dumo's own) puts the row features first; ``columns_first`` is the table of
    the official DiT/SiT code (MAE's, whose meshgrid puts x first), needed to load their weights.
    """
    if order not in POSITION_ORDERS:
        raise ValueError(f"position order must be one of {POSITION_ORDERS}; got {order!r}")
    coords = torch.arange(grid, dtype=torch.float64)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def encode(values: Tensor) -> Tensor:
        angles = values.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    halves = (encode(ys), encode(xs)) if order == "rows_first" else (encode(xs), encode(ys))
    return torch.cat(halves, dim=1).float()


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class DiTBlock(nn.Module):
    """Attention and MLP, each behind adaLN (shift, scale) and a zero-initialised gate.

    ``checkpointed`` (set by :func:`set_activation_checkpointing`): recompute the block in the
    backward pass instead of keeping its activations, when called through :func:`call_block`."""

    checkpointed: bool = False

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


_KEEP_ACTIVATIONS = False  # set inside keep_activations()


@contextlib.contextmanager
def keep_activations() -> Iterator[None]:
    """Blocks called inside store their activations even where checkpointing is on: forward-mode AD
    (torch.func.jvp) saves other tensors than a recomputation would, which checkpoint refuses."""
    global _KEEP_ACTIVATIONS
    before, _KEEP_ACTIVATIONS = _KEEP_ACTIVATIONS, True
    try:
        yield
    finally:
        _KEEP_ACTIVATIONS = before


def call_block(block: nn.Module, *inputs: Tensor) -> Tensor:
    """``block(*inputs)``; with activation checkpointing on (``block.checkpointed``) and gradients
    being recorded, its activations are recomputed in the backward pass instead of stored. The
    no-grad target passes store nothing anyway and run the block as it is."""
    if getattr(block, "checkpointed", False) and torch.is_grad_enabled() and not _KEEP_ACTIVATIONS:
        return checkpoint(block, *inputs, use_reentrant=False)
    return block(*inputs)


def transformer_blocks(model: nn.Module) -> list[DiTBlock]:
    """The repeated transformer blocks of ``model`` (the trunk's and the heads' own; text DiT blocks
    too), in module order; empty for a network without them (mlp, unet)."""
    return [module for module in model.modules() if isinstance(module, DiTBlock)]


def set_activation_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Turn activation checkpointing of every transformer block of ``model`` on or off; returns
    how many blocks there are (0: the network has none, so nothing changed)."""
    own = getattr(model, "set_activation_checkpointing", None)
    if own is not None:  # a network that checkpoints its own blocks (a diffusers transformer)
        own(enabled)
        return 1
    blocks = transformer_blocks(model)
    for block in blocks:
        block.checkpointed = enabled
    return len(blocks)


def initialise_blocks(modules: Iterable[nn.Module]) -> None:
    """DiT's initialisation: Xavier linear layers, and adaLN-zero (each block starts as the identity)."""
    modules = list(modules)
    for module in modules:
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    for block in modules:
        if isinstance(block, DiTBlock):
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)


class DiTBackbone(nn.Module):
    """Patchify, add positions, run the blocks; returns token features and the conditioning."""

    def __init__(
        self,
        input_size: int,
        in_channels: int,
        size: DiTSize,
        patch_size: int,
        num_classes: int = 0,
        time_inputs: int = 1,
        mlp_ratio: float = 4.0,
        time_scale: float = 100.0,
        position_order: str = "rows_first",
        conditioner: ConditionerFactory | None = None,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by the patch size {patch_size}")
        dim = size.hidden_dim
        self.patch_size = patch_size
        self.grid = input_size // patch_size
        self.patch_embedding = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        position = sincos_position_embedding(dim, self.grid, position_order)
        self.register_buffer("position", position[None], persistent=False)
        self.conditioning = Conditioning(dim, num_classes, time_inputs, time_scale=time_scale, conditioner=conditioner)
        self.blocks = nn.ModuleList(DiTBlock(dim, size.num_heads, mlp_ratio) for _ in range(size.depth))
        self.initialise()

    def initialise(self) -> None:
        initialise_blocks(self.modules())
        weight = self.patch_embedding.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.patch_embedding.bias)
        for embedding in (self.conditioning.time, self.conditioning.interval):
            if embedding is not None:
                nn.init.normal_(embedding.mlp[0].weight, std=0.02)
                nn.init.normal_(embedding.mlp[2].weight, std=0.02)
        if isinstance(self.conditioning.label, LabelEmbedding):
            nn.init.normal_(self.conditioning.label.table.weight, std=0.02)

    def forward(self, x: Tensor, t: Tensor, r: Tensor | None = None, cond: Condition = None) -> tuple[Tensor, Tensor]:
        vector = self.conditioning(t, r, cond, x.shape[0])
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2) + self.position.to(x.dtype)
        for block in self.blocks:
            tokens = call_block(block, tokens, vector)
        return tokens, vector


class DiTHead(nn.Module):
    """DiT's final layer (adaLN + linear to patch pixels, zero-initialised) and unpatchify.

    ``blocks``: transformer blocks of this head's own (model.head_blocks; none in the paper's DiT).
    FlowModel runs them on the trunk's tokens before calling the head, under the run's autocast,
    and the final layer in fp32."""

    def __init__(
        self,
        hidden_dim: int,
        patch_size: int,
        out_channels: int,
        grid: int,
        blocks: int = 0,
        num_heads: int = 1,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.patch_size, self.out_channels, self.grid = patch_size, out_channels, grid
        self.blocks = nn.ModuleList(DiTBlock(hidden_dim, num_heads, mlp_ratio) for _ in range(blocks))
        initialise_blocks(self.blocks.modules())
        self.norm = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, 2 * hidden_dim))
        self.linear = nn.Linear(hidden_dim, patch_size * patch_size * out_channels)
        for layer in (self.modulation[-1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, tokens: Tensor, cond: Tensor) -> Tensor:
        shift, scale = self.modulation(cond)[:, None].chunk(2, dim=-1)
        patches = self.linear(modulate(self.norm(tokens), shift, scale))
        p, c, g = self.patch_size, self.out_channels, self.grid
        patches = patches.reshape(-1, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", patches).reshape(-1, c, g * p, g * p)


__all__ = [
    "DIT_SIZES",
    "POSITION_ORDERS",
    "DiTBackbone",
    "DiTHead",
    "DiTSize",
    "call_block",
    "keep_activations",
    "parse_dit_name",
    "set_activation_checkpointing",
    "sincos_position_embedding",
    "transformer_blocks",
]

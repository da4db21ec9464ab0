"""A U-Net for pixel-space images (DDPM++-style residual blocks, FiLM conditioning).

With the defaults (128 channels, multipliers 2-2-2, 4 blocks per level, attention at 16x16)
it has about 58M parameters on 32x32 images, near the ~55M the paper uses on CIFAR-10; every width
and depth is a config key, so it shrinks to something that trains on a laptop CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dumo.conditioning import Condition
from dumo.models.embeddings import ConditionerFactory, Conditioning


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4) if channels >= 4 else 1, channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the conditioning as a per-channel scale and shift."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.modulation = nn.Linear(cond_dim, 2 * out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.modulation(cond)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(self.dropout(h))


class SelfAttention(nn.Module):
    def __init__(self, channels: int, head_dim: int = 64):
        super().__init__()
        self.num_heads = max(1, channels // head_dim)
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Level(nn.Module):
    """Residual blocks (and attention) at one resolution."""

    def __init__(self, channels: Sequence[tuple[int, int]], cond_dim: int, dropout: float, attention: bool):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(i, o, cond_dim, dropout) for i, o in channels)
        self.attention = nn.ModuleList(SelfAttention(o) if attention else nn.Identity() for _, o in channels)


class UNetBackbone(nn.Module):
    """Encoder-decoder with skip connections; returns the last feature map and the conditioning."""

    def __init__(
        self,
        input_size: int,
        in_channels: int,
        channels: int = 128,
        channel_mult: Sequence[int] = (2, 2, 2),
        num_res_blocks: int = 4,
        attention_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        num_classes: int = 0,
        time_inputs: int = 1,
        time_scale: float = 100.0,
        conditioner: ConditionerFactory | None = None,
    ):
        super().__init__()
        cond_dim = 4 * channels
        self.out_channels = channels
        self.conditioning = Conditioning(
            cond_dim, num_classes, time_inputs, time_scale=time_scale, conditioner=conditioner
        )
        self.input = nn.Conv2d(in_channels, channels, 3, padding=1)

        widths = [channels * m for m in channel_mult]
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skips, current, resolution = [channels], channels, input_size
        for level, width in enumerate(widths):
            pairs = []
            for _ in range(num_res_blocks):
                pairs.append((current, width))
                current = width
                skips.append(width)
            self.down.append(Level(pairs, cond_dim, dropout, resolution in attention_resolutions))
            last = level == len(widths) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(current, current, 3, stride=2, padding=1))
            if not last:
                skips.append(current)
                resolution //= 2
        self.middle = nn.ModuleList(
            [ResBlock(current, current, cond_dim, dropout), ResBlock(current, current, cond_dim, dropout)]
        )
        self.middle_attention = SelfAttention(current)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            pairs = []
            for _ in range(num_res_blocks + 1):
                pairs.append((current + skips.pop(), width))
                current = width
            self.up.append(Level(pairs, cond_dim, dropout, resolution in attention_resolutions))
            first = level == 0
            self.upsample.append(nn.Identity() if first else nn.Conv2d(current, current, 3, padding=1))
            if not first:
                resolution *= 2
        self.output_channels = current

    def forward(self, x: Tensor, t: Tensor, r: Tensor | None = None, cond: Condition = None) -> tuple[Tensor, Tensor]:
        vector = F.silu(self.conditioning(t, r, cond, x.shape[0]))
        h = self.input(x)
        skips = [h]
        for level, down in zip(self.down, self.downsample):
            for block, attention in zip(level.blocks, level.attention):
                h = attention(block(h, vector))
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)
        h = self.middle_attention(self.middle[0](h, vector))
        h = self.middle[1](h, vector)
        for level, up in zip(self.up, self.upsample):
            for block, attention in zip(level.blocks, level.attention):
                h = attention(block(torch.cat([h, skips.pop()], dim=1), vector))
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2, mode="nearest"))
        return h, vector


class UNetHead(nn.Module):
    """GroupNorm, conditioning scale/shift, SiLU, 3x3 conv to the output channels (zero-initialised)."""

    def __init__(self, channels: int, cond_dim: int, out_channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.modulation = nn.Linear(cond_dim, 2 * channels)
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        for layer in (self.modulation, self.conv):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, features: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.modulation(cond)[:, :, None, None].chunk(2, dim=1)
        return self.conv(F.silu(self.norm(features) * (1 + scale) + shift))

"""Output heads and the model that joins a backbone to the heads an objective names."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from dumo.conditioning import Condition, find_conditioner
from dumo.models.dit import call_block
from dumo.models.embeddings import modulate
from dumo.models.output import ModelOutput

#: the name of a velocity head v(x_t, t): what a Flow Matching teacher has, and what guidance and the
#: velocity samplers read
VELOCITY_HEAD = "v"


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in fp32, or as it is when it is already fp32 or wider (fp64 in tests)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class OutputHead(nn.Module):
    """adaLN final layer: normalise, modulate by the conditioning, project (zero-initialised)."""

    def __init__(self, hidden_dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, 2 * hidden_dim))
        self.linear = nn.Linear(hidden_dim, out_dim)
        for layer in (self.modulation[-1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, features: Tensor, cond: Tensor) -> Tensor:
        shift, scale = self.modulation(cond).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(features), shift, scale))


class FlowModel(nn.Module):
    """A backbone shared by the heads named in ``heads`` (DuMo's "v": velocity, "u": flow map; any
    name an objective declares).

    ``backbone(x, t, r, cond)`` returns (features, conditioning vector); every head reads both,
    so a dual-head model costs one backbone pass for v and u together.
    """

    def __init__(self, backbone: nn.Module, head: type[nn.Module] | None, heads: tuple[str, ...], **head_kwargs):
        super().__init__()
        check_head_names(heads)
        self.backbone = backbone
        head = OutputHead if head is None else head
        self.heads = nn.ModuleDict({name: head(**head_kwargs) for name in heads})
        # head name -> name of the sampler that reads it (filled by dumo.network.build_network)
        self.head_samplers: dict[str, str] = {}
        # head name -> every sampler that may draw it (filled by dumo.network.build_network)
        self.head_methods: dict[str, tuple[str, ...]] = {}

    @property
    def head_names(self) -> tuple[str, ...]:
        return tuple(self.heads.keys())

    @property
    def condition_kind(self) -> str | None:
        """What the network is conditioned on: ``"class"`` (labels), ``"text"`` (prompts), another
        conditioner's kind, or None (unconditional)."""
        conditioner = find_conditioner(self.backbone)
        return None if conditioner is None else conditioner.condition_kind

    def forward(self, x: Tensor, t: Tensor, r: Tensor | None = None, cond: Condition = None) -> ModelOutput:
        features, vector = self.backbone(x, t, r=r, cond=cond)
        # A head's own transformer blocks (DiT model.head_blocks) run like the trunk, under the caller's autocast.
        per_head = {
            name: run_blocks(getattr(head, "blocks", ()), features, vector) for name, head in self.heads.items()
        }
        # The output layers run in fp32 even under bf16 autocast: the finite-difference target divides the
        # difference of two head outputs by 2e ~ 0.01, which would magnify bf16 rounding ~100x.
        # They are a small share of the compute (one linear layer per head).
        with torch.autocast(device_type=x.device.type, enabled=False):
            vector = at_least_fp32(vector)
            return ModelOutput({name: head(at_least_fp32(per_head[name]), vector) for name, head in self.heads.items()})


def run_blocks(blocks: Iterable[nn.Module], features: Tensor, cond: Tensor) -> Tensor:
    for block in blocks:
        features = call_block(block, features, cond)
    return features


def check_head_names(heads: tuple[str, ...]) -> None:
    """Head names become ``ModelOutput`` attributes and state-dict keys (``heads.<name>.``): they must
    be distinct Python identifiers that do not shadow an attribute of the output."""
    if not heads or len(set(heads)) != len(heads):
        raise ValueError(f"heads must be a non-empty tuple of distinct names; got {heads}")
    for name in heads:
        reserved = name == "outputs" or hasattr(ModelOutput, name)
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_") or reserved:
            raise ValueError(f"head name {name!r} must be an identifier, not starting with _ nor 'outputs' or 'split'")

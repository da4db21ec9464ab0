"""What an objective declares about its heads beyond their names: how each starts from a teacher
(:class:`HeadInit`, read by ``train.init_from``), and the term that trains a head of its kind inside
a multi-head model (:class:`HeadTerm`, looked up through :data:`dumo.objectives.OBJECTIVES`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from dumo.conditioning import Condition
from dumo.models.heads import VELOCITY_HEAD
from dumo.models.output import ModelOutput
from dumo.objectives.base import TimeSampler


@dataclass(frozen=True)
class HeadInit:
    """How a head starts when the teacher (``train.init_from``) lacks it: as a copy of the teacher's
    head ``source``.

    ``zero_allowed``: ``model.u_head_init: zero`` keeps the head's own (zero) initialisation instead
    where the model also trains ``source`` (the copy is then a choice, not the only start).
    ``zero_interval``: the head reads the interval t - r; a new interval embedding gets a zero output
    layer, so at step 0 the head gives the teacher's output for every r.
    """

    source: str = VELOCITY_HEAD
    zero_allowed: bool = False
    zero_interval: bool = False


@dataclass
class TargetContext:
    """What every term's target may read: the batch point, theta^- and the shared velocity target."""

    x_t: Tensor
    t: Tensor
    r: Tensor
    cond: Condition
    path_velocity: Tensor  # z - x (fp32)
    v_target: Tensor  # the (guided) velocity target (fp32)
    out: ModelOutput  # the pass with gradients (read it detached)
    target_model: nn.Module
    guided: bool


@dataclass
class DerivativeNeed:
    """d(head)/dt from theta^- along ``tangent`` (dx/dt), with the difference stencil kept in [lower, 1].

    ``tangent_key`` names the tangent tensor: needs with the same key share their passes.
    ``used`` marks the rows whose derivative enters the target (None: all); on the others any
    finite value will do (MeanFlow multiplies dm/dt by t - r = 0 there)."""

    head: str
    tangent_key: str
    tangent: Tensor
    lower: Tensor | float
    used: Tensor | None = None


class HeadTerm(ABC):
    """The objective term of one head kind (``objective.heads.<name>.kind`` of a multi-head model).

    ``config`` is the multi-head config (:class:`dumo.objectives.multihead.MultiHeadConfig`); a term
    reads the keys of its kind there."""

    kind: str = ""
    sampler: str = ""  # name in dumo.samplers.SAMPLERS of the sampler for a head of this kind
    methods: tuple[str, ...] = ()  # every sampler a head of this kind can be drawn with (empty: ``sampler``)
    uses_r: bool = False  # the head's target depends on r, and the term draws (t, r)
    is_velocity: bool = False  # the head is the velocity v(x_t, t) (guidance, the v_head tangent)
    init: HeadInit | None = None  # how a head of this kind starts from a teacher that lacks it

    def __init__(self, head: str, config: Any):
        self.head, self.config = head, config

    def draw_times(self, time_sampler: TimeSampler, n: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """(t, r) for a batch of ``n`` (only asked of a term that ``uses_r``)."""
        raise NotImplementedError

    def derivative_need(self, context: TargetContext, tangents: dict[str, Tensor]) -> DerivativeNeed | None:
        """The time derivative the target needs, or None."""
        return None

    @abstractmethod
    def target(self, context: TargetContext, derivative: Tensor | None) -> Tensor:
        """The (no-grad, fp32) regression target of the head."""


def rows_where(mask: Tensor, count_if_unknown: int) -> Tensor:
    """Indices of the rows where ``mask`` holds. On fake tensors (``dumo plan``'s FLOP count runs
    the objective on them) the values are unknown and the count cannot be data-dependent: the
    first ``count_if_unknown`` rows stand in."""
    if is_fake(mask):
        return torch.arange(count_if_unknown, device=mask.device)
    return mask.nonzero().squeeze(1)

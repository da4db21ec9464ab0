"""The interface shared by all objectives, and the small pieces they have in common.

An objective takes the model and a :class:`~dumo.data.batch.Batch` and returns an
:class:`ObjectiveOutput`: the scalar loss to minimise plus named, detached parts for logging.
"""

from __future__ import annotations

import contextlib
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dumo.conditioning import (
    ClassLabels,
    Condition,
    Conditioner,
    TextCondition,
    TextPrompts,
    cat_conditions,
    find_conditioner,
)
from dumo.data.batch import Batch
from dumo.models import keep_activations
from dumo.models.heads import at_least_fp32
from dumo.models.output import ModelOutput
from dumo.paths import PATHS, AffinePath, expand_time
from dumo.schema import require

if TYPE_CHECKING:
    from dumo.objectives.terms import HeadInit, HeadTerm


@dataclass
class TimeConfig:
    """Distribution of the training time t (data at 0, noise at 1)."""

    distribution: Literal["beta", "logit_normal", "uniform"] = "beta"
    theta1: float = 2.4  # Beta(theta1, theta2); the paper's ImageNet-256 setting
    theta2: float = 2.4
    mean: float = -0.4  # logit-normal: sigmoid(N(mean, std^2))
    std: float = 1.0

    def validate(self, prefix: str) -> None:
        require(self.theta1 > 0 and self.theta2 > 0, f"{prefix}.theta1 and {prefix}.theta2 must be > 0")
        require(self.std > 0, f"{prefix}.std must be > 0; got {self.std}")


class TimeSampler:
    """Draws per-sample times in [0, 1] from the configured distribution (global torch RNG)."""

    def __init__(self, config: TimeConfig):
        self.config = config

    def sample(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        c = self.config
        if c.distribution == "uniform":
            return torch.rand(n, device=device)
        if c.distribution == "logit_normal":
            return torch.sigmoid(c.mean + c.std * torch.randn(n, device=device))
        concentration = torch.tensor([c.theta1, c.theta2], device=device)
        return torch.distributions.Beta(concentration[0], concentration[1]).sample((n,))


@dataclass
class ObjectiveConfig:
    """Keys shared by every objective."""

    name: str = ""
    path: Literal["linear"] = "linear"
    time: TimeConfig = field(default_factory=TimeConfig)
    label_dropout: float = 0.1  # fraction of conditions (labels, prompts) replaced by the null condition (guidance)

    def validate(self, prefix: str) -> None:
        require(0.0 <= self.label_dropout <= 1.0, f"{prefix}.label_dropout must be in [0, 1]; got {self.label_dropout}")


@dataclass
class FewStepConfig(ObjectiveConfig):
    """Keys shared by the flow-map objectives (DuMo, MeanFlow)."""

    derivative: Literal["finite_difference", "jvp"] = "finite_difference"
    # Half-width of the central difference in t. The paper uses 0.005; dumo's default is 0.05: a mode
    # of u oscillating in t at frequency w enters the difference as sin(w e) / e instead of w, so a
    # wider stencil caps how much fast wiggles of u are fed back into its own target (t du/dt), which
    # made plain-L2 training blow up at 0.005 (README "Make your flow model one-step").
    epsilon: float = 0.05
    dudt_clamp: float | None = None  # clamp |du/dt| elementwise; null = off
    # theta^- for the derivative (and guidance) passes: the stop-gradient online weights, their
    # EMA, or the frozen initial weights of a run started with train.init_from (the teacher).
    target_network: Literal["online", "ema", "teacher"] = "online"
    zeta: float = 0.0  # training-time guidance (enhancement ratio); 0 = off
    # The network of the unconditional term of the guided velocity: theta^- or the frozen teacher.
    guidance_network: Literal["target", "teacher"] = "target"
    guidance_t_min: float = 0.0  # guidance only where guidance_t_min <= t <= guidance_t_max
    guidance_t_max: float = 1.0
    adaptive_p: float = 0.0  # per-sample loss / sg(loss + adaptive_c)^p; 0 = plain MSE
    adaptive_c: float = 1e-3
    batch_target_passes: bool = True  # run the independent no-grad passes as one batched call
    # Precision of the no-grad target passes (see derivative_precision): fp32 outside autocast,
    # tf32 (fp32 storage, TF32 matmuls on CUDA; exactly fp32 on the CPU), or bf16 (the run's
    # autocast). tf32 by default: measured on an H100 (DiT-B/2, e 0.05) it adds 0.4% rounding error
    # to du/dt (bf16: 1.6%) and makes a DiT-XL/2 DuMo step 2.5x faster than fp32 passes.
    target_precision: Literal["fp32", "tf32", "bf16"] = "tf32"

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        require(0.0 < self.epsilon < 0.5, f"{prefix}.epsilon must be in (0, 0.5); got {self.epsilon}")
        require(self.dudt_clamp is None or self.dudt_clamp > 0, f"{prefix}.dudt_clamp must be > 0 or null")
        require(self.zeta >= 0.0, f"{prefix}.zeta must be >= 0; got {self.zeta}")
        require(
            0.0 <= self.guidance_t_min <= self.guidance_t_max <= 1.0,
            f"{prefix}.guidance_t_min and guidance_t_max must satisfy 0 <= min <= max <= 1",
        )
        require(self.adaptive_p >= 0.0, f"{prefix}.adaptive_p must be >= 0; got {self.adaptive_p}")
        require(self.adaptive_c > 0.0, f"{prefix}.adaptive_c must be > 0; got {self.adaptive_c}")


@dataclass
class ObjectiveOutput:
    """The loss to minimise, detached scalar parts for logging and detached targets for inspection."""

    loss: Tensor
    parts: dict[str, Tensor]
    targets: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class ModelInput:
    """Arguments of one network call: ``model(x, t, r=r, cond=cond)``."""

    x: Tensor
    t: Tensor
    r: Tensor | None = None
    cond: Condition = None


class Objective(ABC):
    """A training objective: ``objective(model, batch) -> ObjectiveOutput``.

    ``target_model`` is theta^- where the trainer keeps a separate copy (EMA, or the unwrapped
    module under DDP); ``teacher_model`` the frozen initial weights of a run started from a checkpoint.

    Everything the rest of dumo needs to know about an objective is declared here: the network it
    trains (``heads``, ``time_inputs``), how its heads start from a teacher (``head_inits``), the head
    kinds it brings to multi-head models (``head_terms``), how its model samples (``default_sampler``,
    ``sampling_methods``) and what the trainer must provide (``target_network``, ``wants_teacher``,
    ``needs_forward_ad``, ``target_precision``). A new objective is a subclass in its own module plus
    one line in :data:`dumo.objectives.OBJECTIVES`.
    """

    heads: tuple[str, ...] = ()  # heads the network must have (names of ModelOutput attributes)
    time_inputs: int = 1  # 2 when the network also takes the second time r (MeanFlow)
    #: name in :data:`dumo.samplers.SAMPLERS` of the sampler this objective's model is meant for
    default_sampler: str = ""
    #: every sampler its model can be drawn with (``sample.method``, ``--method``); any other is
    #: refused by name. Empty: ``default_sampler`` alone.
    sampling_methods: tuple[str, ...] = ()

    def __init__(self, config: ObjectiveConfig, num_classes: int = 0):
        self.config = config
        self.path: AffinePath = PATHS[config.path]()
        self.time_sampler = TimeSampler(config.time)
        self.num_classes = num_classes

    def head_samplers(self) -> dict[str, str]:
        """The sampler of each head of this objective's model, by head name (``sample.head``):
        ``default_sampler`` for the head it reads, first, then the velocity sampler for a v-head."""
        from dumo.samplers import SAMPLERS, VELOCITY_SAMPLER

        samplers = {SAMPLERS[self.default_sampler].head: self.default_sampler} if self.default_sampler else {}
        if "v" in self.heads and "v" not in samplers:
            samplers["v"] = VELOCITY_SAMPLER
        return samplers

    @classmethod
    def supported_samplers(cls) -> tuple[str, ...]:
        """``sampling_methods``, or ``default_sampler`` alone where none are declared."""
        return cls.sampling_methods or ((cls.default_sampler,) if cls.default_sampler else ())

    def head_methods(self) -> dict[str, tuple[str, ...]]:
        """The samplers each head of this objective's model can be drawn with, by head name: each
        supported sampler under the head it reads."""
        return methods_by_head(self.supported_samplers())

    @classmethod
    def head_terms(cls) -> tuple[type[HeadTerm], ...]:
        """The term of each head kind this objective brings to multi-head models: a kind
        (``objective.heads.<name>.kind``) is registered by the objective that declares it here."""
        return ()

    def head_inits(self) -> dict[str, HeadInit]:
        """How heads start from a teacher that lacks them (``train.init_from``), by head name; a head
        not named here must be in the teacher."""
        return {}

    def wants_teacher(self) -> bool:
        """Whether the objective uses a frozen teacher (the trainer keeps one only when asked)."""
        return False

    def target_network(self) -> Literal["online", "ema", "teacher"] | None:
        """Which network serves as theta^- in the no-grad target passes: the stop-gradient online
        weights, their EMA, or the frozen teacher; None when the objective has no target passes."""
        return None

    def needs_forward_ad(self) -> bool:
        """Whether the loss runs forward-mode AD (torch.func.jvp) through the network, which FSDP's
        parameter gathering cannot do."""
        return False

    def target_precision(self) -> Literal["fp32", "tf32", "bf16"] | None:
        """Precision of the no-grad target passes (see :func:`derivative_precision`); None when
        there are none."""
        return None

    @abstractmethod
    def __call__(
        self,
        model: nn.Module,
        batch: Batch,
        target_model: nn.Module | None = None,
        teacher_model: nn.Module | None = None,
    ) -> ObjectiveOutput:
        """Loss for one batch. ``target_model`` is theta^- (defaults to ``model`` under no_grad)."""

    def conditioner(self, model: nn.Module, cond: Condition) -> Conditioner:
        """What the null condition of ``model`` is: its conditioner's. A network without one (a
        hand-written field) gets the null of the condition's kind: the class index ``num_classes``
        for labels, the prompts' null flags for a TextCondition."""
        found = find_conditioner(model)
        if found is not None:
            return found
        return TextPrompts() if isinstance(cond, TextCondition) else ClassLabels(self.num_classes)

    def keep_rows(self, cond: Condition) -> Tensor | None:
        """The rows that keep their condition, each with probability ``1 - label_dropout`` (None
        without a condition).

        An independent coin per sample, so the expected fraction is right for any batch size
        (rounding a count would drop none or all of a small batch).
        """
        if cond is None:
            return None
        return torch.rand(len(cond), device=cond.device) >= self.config.label_dropout

    def drop_condition(self, cond: Condition, conditioner: Conditioner) -> tuple[Condition, Tensor | None]:
        """Replace each row's condition by the null condition with probability ``label_dropout``.
        Returns the condition and the mask of rows that kept theirs."""
        kept = self.keep_rows(cond)
        return (None, None) if kept is None else (conditioner.drop(cond, ~kept), kept)


def methods_by_head(methods: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Sampler names grouped by the head each reads (``{"u": ("flow_map",), "v": ("euler", "heun")}``)."""
    from dumo.samplers import SAMPLERS

    by_head: dict[str, tuple[str, ...]] = {}
    for method in methods:
        head = SAMPLERS[method].head
        by_head[head] = (*by_head.get(head, ()), method)
    return by_head


def squared_error(prediction: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean squared error in (at least) fp32, shape (B,)."""
    return (at_least_fp32(prediction) - at_least_fp32(target)).square().flatten(1).mean(dim=1)


def adaptive_weighting(per_sample_loss: Tensor, p: float, c: float) -> Tensor:
    """``loss / sg(loss + c)^p`` (MeanFlow's adaptive weight); the identity for p = 0."""
    if p == 0:
        return per_sample_loss
    return per_sample_loss / (per_sample_loss.detach() + c).pow(p)


def central_difference_times(t: Tensor, epsilon: float, lower: Tensor | float, upper: float) -> tuple[Tensor, Tensor]:
    """The stencil (t - e, t + e), shrunk to stay inside [lower, upper].

    Near a boundary the difference becomes one-sided rather than querying the network at times
    it never trained on (t > 1 would extrapolate past pure noise); the quotient divides by the
    actual width ``t_high - t_low``.
    """
    lower_t = torch.as_tensor(lower, dtype=t.dtype, device=t.device)
    t_low = torch.maximum(t - epsilon, lower_t)
    t_high = torch.clamp(t + epsilon, max=upper)
    return t_low, t_high


def difference_quotient(high: Tensor, low: Tensor, t_high: Tensor, t_low: Tensor) -> Tensor:
    """(high - low) / (t_high - t_low) in fp32; rows of zero width give 0.

    fp32 because dividing by 2e (about 0.01) amplifies the rounding error of low precision
    outputs about a hundredfold.
    """
    high, low = at_least_fp32(high), at_least_fp32(low)
    width = expand_time(t_high - t_low, high)
    safe = torch.where(width > 0, width, torch.ones_like(width))
    return torch.where(width > 0, (high - low) / safe, torch.zeros_like(high))


def derivative_precision(config: FewStepConfig, x: Tensor) -> contextlib.AbstractContextManager:
    """Context for the no-grad target passes, following ``config.target_precision``.

    Under bf16 autocast a trunk's rounding differs between t + e and t - e; divided by 2e it gave
    a ~12% error in du/dt on a small DiT even with fp32 heads (70% with bf16 heads). ``fp32`` and
    ``tf32`` turn autocast off; ``tf32`` then lets CUDA matmuls round their inputs to TF32 (10-bit
    mantissa, fp32 accumulation), ``fp32`` forbids it even where the run enables TF32 elsewhere.
    ``bf16`` leaves the run's autocast as it is. README "Target-pass precision" has the measured errors.
    """
    if config.target_precision == "bf16":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device_type=x.device.type, enabled=False))
    if x.device.type == "cuda":
        stack.enter_context(float32_matmul_precision("high" if config.target_precision == "tf32" else "highest"))
    return stack


@contextlib.contextmanager
def float32_matmul_precision(precision: str):
    """Run the block with ``torch.set_float32_matmul_precision(precision)``, restoring it afterwards."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def guidance_weight(kept: Tensor, t: Tensor, t_min: float, t_max: float) -> Tensor:
    """1 for rows that get training-time guidance (a real condition, t inside the range), else 0."""
    return (kept & (t >= t_min) & (t <= t_max)).float()


def forward_many(model: nn.Module, requests: list[ModelInput], batched: bool) -> list[ModelOutput]:
    """Evaluate several independent network calls, as one concatenated call when ``batched``."""
    if not requests:
        return []
    if not batched or len(requests) == 1:
        return [model(q.x, q.t, r=q.r, cond=q.cond) for q in requests]

    def cat(values: list[Tensor | None]) -> Tensor | None:
        return None if values[0] is None else torch.cat(values)

    joined = model(
        cat([q.x for q in requests]),
        cat([q.t for q in requests]),
        r=cat([q.r for q in requests]),
        cond=cat_conditions([q.cond for q in requests]),
    )
    return joined.split([q.x.shape[0] for q in requests])


def time_derivative_jvp(function, x_t: Tensor, t: Tensor, dx_dt: Tensor, *extra_primals: Tensor):
    """d/dt of ``function(x_t, t, *extra)`` along dx/dt = ``dx_dt``, with forward-mode AD.

    Extra primals (MeanFlow's r) get a zero tangent. Returns (value, derivative).
    Forward-mode AD has no fused attention kernel (the flash kernel raises under it), so
    attention falls back to the math kernel here, and only here.
    """
    primals = (x_t, t, *extra_primals)
    tangents = (dx_dt, torch.ones_like(t), *(torch.zeros_like(p) for p in extra_primals))
    note_math_attention()
    # Blocks keep their activations here: checkpoint's recomputation cannot replay forward-mode AD.
    with sdpa_kernel([SDPBackend.MATH]), keep_activations():
        return torch.func.jvp(function, primals, tangents)


_NOTED_MATH_ATTENTION = False


def note_math_attention() -> None:
    """Say once per process that the exact JVP runs attention on the math kernel (and outside
    torch.compile's graphs: dynamo falls back to eager inside torch.func.jvp), so that a slower
    step is not a mystery."""
    global _NOTED_MATH_ATTENTION
    if not _NOTED_MATH_ATTENTION:
        _NOTED_MATH_ATTENTION = True
        print(
            "dumo: note: the exact JVP (objective.derivative=jvp) runs attention on the math kernel, and eagerly "
            "under train.compile, inside the JVP only; objective.derivative=finite_difference keeps the fused kernels",
            file=sys.stderr,
            flush=True,
        )


class FewStepObjective(Objective):
    """What DuMo and MeanFlow share: the choice of theta^- and of the guidance network, the guided
    velocity target, and the optional clamp of du/dt."""

    config: FewStepConfig

    def target_network(self) -> Literal["online", "ema", "teacher"]:
        return self.config.target_network

    def needs_forward_ad(self) -> bool:
        return self.config.derivative == "jvp"

    def target_precision(self) -> Literal["fp32", "tf32", "bf16"]:
        return self.config.target_precision

    def wants_teacher(self) -> bool:
        return self.config.target_network == "teacher" or (
            self.config.zeta > 0 and self.config.guidance_network == "teacher"
        )

    def networks(
        self, model: nn.Module, target_model: nn.Module | None, teacher_model: nn.Module | None
    ) -> tuple[nn.Module, nn.Module]:
        """(theta^-, the network of the unconditional guidance term)."""
        if self.wants_teacher() and teacher_model is None:
            raise ValueError("this objective needs the frozen teacher (train.init_from) but none was given")
        if self.config.target_network == "teacher":
            target_model = teacher_model
        target_model = model if target_model is None else target_model
        guidance_model = teacher_model if self.config.guidance_network == "teacher" else target_model
        return target_model, guidance_model

    def guide(self, velocity: Tensor, conditional: Tensor, unconditional: Tensor, kept: Tensor, t: Tensor) -> Tensor:
        """``velocity + zeta * (conditional - unconditional)`` on rows with a real condition and t in range."""
        cfg = self.config
        weight = expand_time(guidance_weight(kept, t, cfg.guidance_t_min, cfg.guidance_t_max), velocity)
        return velocity + cfg.zeta * weight * (at_least_fp32(conditional) - at_least_fp32(unconditional))

    def clamp(self, du_dt: Tensor) -> Tensor:
        limit = self.config.dudt_clamp
        return du_dt if limit is None else du_dt.clamp(-limit, limit)

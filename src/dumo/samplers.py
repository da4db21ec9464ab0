"""Samplers: from noise at t = 1 to data at t = 0 in a given number of network evaluations (NFE).

- :func:`flow_map_sample` - DuMo's u-head: 1 NFE ``x_0 = x_1 - u(x_1, 1)``; k NFE re-noise
  the prediction to the next time (consistency-style multistep).
- :func:`meanflow_sample` - MeanFlow: ``x_r = x_t - (t - r) u(x_t, r, t)`` over a time grid.
- :func:`ode_sample` - Euler or Heun on the velocity head (Flow Matching, or DuMo's v-head).

:data:`SAMPLERS` is the registry of sampler names (``sample.method``, ``--method``, an objective's
``default_sampler``); :func:`register_sampler` adds one.

Each takes an optional ``path`` list that receives the sampler's states in order: the noise, the
state at each later time of its grid, and last the returned sample (:func:`sample_path` stacks them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dumo.conditioning import Condition, Conditioner, cat_conditions, find_conditioner
from dumo.models.output import ModelOutput


class GuidedModel(nn.Module):
    """Classifier-free guidance at sampling time: every head's output becomes
    ``uncond + scale * (cond - uncond)``, from one batched call on (cond, the null condition).

    The null condition is the ``conditioner``'s, by default the one inside ``model``. Each
    evaluation of this wrapper costs two network passes. A scale of 1 gives the conditional model
    back; rows whose condition is already null come out unguided (both passes agree).
    """

    def __init__(self, model: nn.Module, scale: float, conditioner: Conditioner | None = None):
        super().__init__()
        check_guidance_scale(scale)
        conditioner = find_conditioner(model) if conditioner is None else conditioner
        if conditioner is None:
            raise ValueError("guidance needs a conditional model; this one has no conditioner")
        self.model, self.scale = model, scale
        # its method, not the conditioner: a module inside ``model`` must not be registered twice
        self.null_like = conditioner.null_like

    def forward(self, x: Tensor, t: Tensor, r: Tensor | None = None, cond: Condition = None):
        if cond is None:
            return self.model(x, t, r=r, cond=cond)
        rows = x.shape[0]
        both = self.model(
            torch.cat([x, x]),
            torch.cat([t, t]),
            r=None if r is None else torch.cat([r, r]),
            cond=cat_conditions([cond, self.null_like(cond)]),
        )
        conditional, unconditional = both.split([rows, rows])
        return ModelOutput(
            {
                name: unconditional.outputs[name] + self.scale * (cond - unconditional.outputs[name])
                for name, cond in conditional.outputs.items()
            }
        )


class HeadView(nn.Module):
    """One head of a model under the name a sampler reads: ``HeadView(model, "m", "u")`` lets
    MeanFlow's sampler (which reads ``u``) draw the head ``m`` of a multi-head model."""

    def __init__(self, model: nn.Module, head: str, shown_as: str):
        super().__init__()
        self.model, self.head, self.shown_as = model, head, shown_as

    def forward(self, x: Tensor, t: Tensor, r: Tensor | None = None, cond: Condition = None) -> ModelOutput:
        return ModelOutput({self.shown_as: self.model(x, t, r=r, cond=cond).outputs[self.head]})


def check_guidance_scale(scale: float, name: str = "the guidance scale") -> None:
    """A guidance scale must be a finite number >= 0 (NaN or inf would turn every sample into NaN)."""
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {scale}")


def uniform_times(nfe: int, t_start: float = 1.0) -> list[float]:
    """The default k-step schedule: ``nfe`` times evenly spaced from t_start down (0 excluded)."""
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1; got {nfe}")
    return [t_start * (1 - i / nfe) for i in range(nfe)]


def check_times(times: Sequence[float]) -> list[float]:
    """Times must be strictly decreasing inside (0, 1]."""
    times = [float(t) for t in times]
    if not times:
        raise ValueError("at least one time is needed")
    if any(not 0 < t <= 1 for t in times):
        raise ValueError(f"times must lie in (0, 1]; got {times}")
    if any(a <= b for a, b in zip(times, times[1:])):
        raise ValueError(f"times must be strictly decreasing; got {times}")
    return times


def _time(value: float, like: Tensor) -> Tensor:
    return torch.full((like.shape[0],), value, dtype=torch.float32, device=like.device)


@torch.no_grad()
def flow_map_sample(
    model: nn.Module,
    noise: Tensor,
    times: Sequence[float],
    cond: Condition = None,
    stochasticity: float = 1.0,
    generator: torch.Generator | None = None,
    path: list[Tensor] | None = None,
) -> Tensor:
    """Consistency-style sampling with the u-head at ``times`` (t_0 > t_1 > ... > 0).

    At each time the clean estimate is ``x0 = x_t - t u``; the next point is
    ``t' z' + (1 - t') x0`` with ``z' = s * fresh + sqrt(1 - s^2) * z_hat``, where
    ``z_hat = x_t + (1 - t) u`` is the noise the prediction implies and s = ``stochasticity``
    (1: fresh noise, the usual multistep consistency sampler; 0: deterministic).
    ``path``, if given, receives x at each of ``times`` (the noise first), then the sample.
    """
    times = check_times(times)
    x = noise
    for i, t in enumerate(times):
        if path is not None:
            path.append(x)
        u = model(x, _time(t, x), cond=cond).u.to(x.dtype)
        x0 = x - t * u
        if i + 1 == len(times):
            if path is not None:
                path.append(x0)
            return x0
        implied_noise = x + (1 - t) * u
        fresh = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        z = stochasticity * fresh + (1 - stochasticity**2) ** 0.5 * implied_noise
        t_next = times[i + 1]
        x = t_next * z + (1 - t_next) * x0
    return x


@torch.no_grad()
def meanflow_sample(
    model: nn.Module,
    noise: Tensor,
    times: Sequence[float],
    cond: Condition = None,
    path: list[Tensor] | None = None,
) -> Tensor:
    """MeanFlow's deterministic k-step map over ``times`` then 0 (``path``: x at each of those times)."""
    grid = check_times(times) + [0.0]
    x = noise
    if path is not None:
        path.append(x)
    for t, r in zip(grid[:-1], grid[1:]):
        u = model(x, _time(t, x), r=_time(r, x), cond=cond).u.to(x.dtype)
        x = x - (t - r) * u
        if path is not None:
            path.append(x)
    return x


@torch.no_grad()
def ode_sample(
    model: nn.Module,
    noise: Tensor,
    steps: int,
    method: str = "euler",
    cond: Condition = None,
    t_start: float = 1.0,
    path: list[Tensor] | None = None,
) -> Tensor:
    """Integrate dx/dt = v(x, t) from t_start to 0 in ``steps`` uniform steps.

    Euler costs ``steps`` NFE; Heun (trapezoidal correction, none on the last step onto t = 0)
    costs 2 * steps - 1. ``path``, if given, receives x at each of the ``steps + 1`` grid times.
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown ODE method {method!r}")
    grid = torch.linspace(t_start, 0.0, steps + 1).tolist()
    x = noise
    if path is not None:
        path.append(x)
    for t, t_next in zip(grid[:-1], grid[1:]):
        dt = t_next - t
        v = model(x, _time(t, x), cond=cond).v.to(x.dtype)
        if method == "heun" and t_next > 0:
            v_next = model(x + dt * v, _time(t_next, x), cond=cond).v.to(x.dtype)
            v = 0.5 * (v + v_next)
        x = x + dt * v
        if path is not None:
            path.append(x)
    return x


def heun_steps_for_nfe(nfe: int) -> int:
    """The number of Heun steps whose cost is at most ``nfe`` evaluations."""
    return max(1, (nfe + 1) // 2)


def sampler_cost(method: str, nfe: int) -> tuple[int, int]:
    """(steps, network evaluations) of sampling with ``method`` and a budget of ``nfe`` evaluations."""
    if method == "heun":
        steps = heun_steps_for_nfe(nfe)
        return steps, 2 * steps - 1  # no correction on the last step onto t = 0
    return nfe, nfe


def network_passes(nfe: int, method: str, guided: bool) -> int:
    """Network passes per sample: each evaluation of a :class:`GuidedModel` is two."""
    return sampler_cost(method, nfe)[1] * (2 if guided else 1)


def cost_label(nfe: int, method: str, guided: bool) -> str:
    """A draw's cost as shown to people: ``"2 NFE"`` (the evaluations run: ``"3 NFE (2 steps)"`` for
    Heun with a budget of 4); under guidance each evaluation is two network
    passes, so its steps and passes instead: ``"1 step (2 passes with guidance)"``."""
    steps, evaluations = sampler_cost(method, nfe)
    if not guided:
        # Heun spends 2 steps - 1 evaluations: a budget of 4 runs 2 steps, 3 evaluations
        return f"{evaluations} NFE" if evaluations == nfe else f"{evaluations} NFE ({steps} steps)"
    return f"{steps} step{'' if steps == 1 else 's'} ({network_passes(nfe, method, guided)} passes with guidance)"


#: ``run(model, noise, nfe, cond, times, t_start, stochasticity, generator, path) -> samples``
SamplerFunction = Callable[..., Tensor]


@dataclass(frozen=True)
class Sampler:
    """A sampler under its registry name.

    ``head``: the head it reads (a model without it cannot use it). ``scheduled``: it takes one
    time per NFE (``times``, default :func:`uniform_times`); otherwise it integrates a uniform grid.
    """

    name: str
    head: str
    run: SamplerFunction
    scheduled: bool = False


#: every sampler by name; the one place the names are listed
SAMPLERS: dict[str, Sampler] = {}


def register_sampler(name: str, head: str, scheduled: bool = False) -> Callable[[SamplerFunction], SamplerFunction]:
    """Decorator: register ``run`` as the sampler ``name`` (see :class:`Sampler`)."""

    def register(run: SamplerFunction) -> SamplerFunction:
        if name in SAMPLERS:
            raise ValueError(f"a sampler named {name!r} is already registered")
        SAMPLERS[name] = Sampler(name, head, run, scheduled)
        return run

    return register


def sampler_named(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


@register_sampler("flow_map", head="u", scheduled=True)
def _flow_map(model, noise, nfe, cond, times, t_start, stochasticity, generator, path) -> Tensor:
    schedule = times if times is not None else uniform_times(nfe, t_start)
    return flow_map_sample(model, noise, schedule, cond, stochasticity, generator, path)


@register_sampler("meanflow", head="u", scheduled=True)
def _meanflow(model, noise, nfe, cond, times, t_start, stochasticity, generator, path) -> Tensor:
    schedule = times if times is not None else uniform_times(nfe, t_start)
    return meanflow_sample(model, noise, schedule, cond, path)


@register_sampler("euler", head="v")
def _euler(model, noise, nfe, cond, times, t_start, stochasticity, generator, path) -> Tensor:
    return ode_sample(model, noise, nfe, "euler", cond, t_start, path)


@register_sampler("heun", head="v")
def _heun(model, noise, nfe, cond, times, t_start, stochasticity, generator, path) -> Tensor:
    return ode_sample(model, noise, heun_steps_for_nfe(nfe), "heun", cond, t_start, path)


#: the sampler of a velocity head (a v-head drawn next to an objective's own sampler)
VELOCITY_SAMPLER = "euler"


def sample(
    model: nn.Module,
    noise: Tensor,
    nfe: int,
    method: str,
    cond: Condition = None,
    times: Sequence[float] | None = None,
    t_start: float = 1.0,
    stochasticity: float = 1.0,
    generator: torch.Generator | None = None,
    path: list[Tensor] | None = None,
) -> Tensor:
    """Dispatch to a sampler by name with a budget of ``nfe`` network evaluations.

    ``path``, if given, receives the sampler's states in order (see :func:`sample_path`).
    """
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1; got {nfe}")
    sampler = sampler_named(method)
    if times is not None and len(times) != nfe and sampler.scheduled:
        raise ValueError(f"{len(times)} times given for nfe={nfe}")
    return sampler.run(model, noise, nfe, cond, times, t_start, stochasticity, generator, path)


def sample_path(
    model: nn.Module,
    noise: Tensor,
    nfe: int,
    method: str,
    cond: Condition = None,
    times: Sequence[float] | None = None,
    t_start: float = 1.0,
    stochasticity: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The states a sampler passes through, stacked: shape ``(S, *noise.shape)``.

    ``[0]`` is the noise and ``[-1]`` the sample :func:`sample` returns for the same arguments (and
    generator state). Between them: Euler/Heun, x at each time of the uniform grid (S = steps + 1);
    flow_map, x at each later time of the schedule, after the re-noising, (S = k + 1); meanflow,
    x at each later time (S = k + 1).
    """
    states: list[Tensor] = []
    sample(model, noise, nfe, method, cond, times, t_start, stochasticity, generator, path=states)
    return torch.stack(states)

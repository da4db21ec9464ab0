"""Each mathematical claim of the objectives, checked against an independent computation."""

import math

import pytest
import torch
from conftest import PointMassOracle, batch_of, small_model

from dumo.conditioning import ClassLabels
from dumo.data.batch import Batch
from dumo.errors import ConfigError
from dumo.models.output import ModelOutput
from dumo.objectives import (
    DuMoConfig,
    DuMoObjective,
    FlowMatchingConfig,
    FlowMatchingObjective,
    MeanFlowConfig,
    MeanFlowObjective,
    TimeConfig,
)
from dumo.objectives.base import adaptive_weighting, central_difference_times, difference_quotient

MIDDLE = TimeConfig(distribution="beta", theta1=20.0, theta2=20.0)  # t well inside (0, 1)


def run(objective, model, batch, seed=0, **kwargs):
    torch.manual_seed(seed)
    return objective(model, batch, **kwargs)


# -- the derivative du/dt ------------------------------------------------------------------------


def test_finite_difference_matches_jvp_and_converges_at_second_order():
    """Central difference vs torch.func.jvp on a small fp32 model (errors shrink ~4x per halving)."""
    model = small_model().double()
    batch = Batch(x=torch.randn(64, 2, dtype=torch.float64))
    exact = run(DuMoObjective(DuMoConfig(derivative="jvp", time=MIDDLE)), model, batch).targets["du_dt"]
    errors = []
    for eps in (0.004, 0.002, 0.001):
        approx = run(DuMoObjective(DuMoConfig(epsilon=eps, time=MIDDLE)), model, batch).targets["du_dt"]
        errors.append(((approx - exact).norm() / exact.norm()).item())
    assert errors[0] < 5e-2, errors  # stated tolerance: 5% at the default scale of epsilon
    assert errors[1] < errors[0] / 3 and errors[2] < errors[1] / 3, errors


def test_finite_difference_matches_jvp_in_float32_at_the_papers_epsilon():
    model = small_model()
    batch = batch_of(64)
    exact = run(DuMoObjective(DuMoConfig(derivative="jvp", time=MIDDLE)), model, batch).targets["du_dt"]
    approx = run(DuMoObjective(DuMoConfig(epsilon=0.005, time=MIDDLE)), model, batch).targets["du_dt"]
    assert ((approx - exact).norm() / exact.norm()).item() < 5e-2


class OscillatingInTime(torch.nn.Module):
    """u(x, t) = sin(w t) in every coordinate: du/dt = w cos(w t), whatever the direction in x."""

    def __init__(self, frequency):
        super().__init__()
        self.frequency = frequency

    def forward(self, x, t, r=None, cond=None):
        wave = torch.sin(self.frequency * t.reshape(-1, 1).to(x.dtype)).expand_as(x)
        return ModelOutput(v=torch.zeros_like(x), u=wave)


@pytest.mark.parametrize("epsilon", [0.005, 0.05])
def test_the_stencil_sees_a_fast_mode_as_sin_we_over_e(epsilon):
    """The central difference returns cos(w t) sin(w e) / e: at most 1/e, however fast u varies in t,
    while the exact derivative grows with w (what makes a narrow stencil feed fast wiggles back)."""
    batch = Batch(x=torch.randn(256, 2, dtype=torch.float64))
    for frequency in (3.0, 400.0):
        model = OscillatingInTime(frequency)
        out = run(DuMoObjective(DuMoConfig(epsilon=epsilon, time=MIDDLE)), model, batch)
        t = out.targets["t"].double()
        expected = torch.cos(frequency * t) * math.sin(frequency * epsilon) / epsilon
        # the stencil's times are fp32: a relative 1e-7 in t, magnified by w / e
        assert torch.allclose(out.targets["du_dt"][:, 0].double(), expected, rtol=1e-4, atol=1e-3)
        exact = run(DuMoObjective(DuMoConfig(derivative="jvp", time=MIDDLE)), model, batch).targets["du_dt"]
        assert torch.allclose(exact[:, 0].double(), frequency * torch.cos(frequency * t), rtol=1e-4, atol=1e-3)
    assert out.targets["du_dt"].abs().max() <= 1 / epsilon + 1e-9  # the cap, for the fast mode


class AnalyticFlowMap(torch.nn.Module):
    """u(x, t) = sin(3t) * x and v(x, t) = cos(t) * x: du/dt along x_t is known in closed form."""

    def forward(self, x, t, r=None, cond=None):
        t = t.reshape(-1, 1).to(x.dtype)
        return ModelOutput(v=torch.cos(t) * x, u=torch.sin(3 * t) * x)


@pytest.mark.parametrize("derivative,tolerance", [("jvp", 1e-10), ("finite_difference", 1e-3)])
def test_dumo_targets_on_an_analytic_model(derivative, tolerance):
    x = torch.randn(32, 2, dtype=torch.float64)
    # the paper's narrow stencil: the tolerance below is the difference's second-order error at e = 0.005
    config = DuMoConfig(derivative=derivative, epsilon=0.005, time=TimeConfig(distribution="uniform"))
    objective = DuMoObjective(config)
    torch.manual_seed(0)
    out = objective(AnalyticFlowMap(), Batch(x=x))
    torch.manual_seed(0)
    z = torch.randn_like(x)  # the objective draws z first, then t
    t = out.targets["t"].reshape(-1, 1).double()
    x_t = t * z + (1 - t) * x
    du_dt = 3 * torch.cos(3 * t) * x_t + torch.sin(3 * t) * (z - x)  # product rule along dx_t/dt = z - x
    assert torch.allclose(out.targets["v"], z - x)
    interior = ((t > 0.005) & (t < 0.995)).squeeze(1)  # the stencil is one-sided at the ends
    assert torch.allclose(out.targets["du_dt"][interior], du_dt[interior], atol=tolerance, rtol=0)
    assert torch.allclose(out.targets["u"][interior], (z - x - t * du_dt)[interior], atol=tolerance, rtol=0)


class LinearODE(torch.nn.Module):
    """v(x, t) = a x, and u(x, t) = x (1 - exp(-b t)) / t: the exact flow map to t = 0 of dx/dt = b x
    (x_0 = exp(-b t) x_t), so u is the flow map of its own v-head when a = b."""

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x, t, r=None, cond=None):
        t = t.reshape(-1, 1).to(x.dtype)
        return ModelOutput(v=self.a * x, u=-torch.expm1(-self.b * t) / t * x)


@pytest.mark.parametrize("derivative,tolerance", [("jvp", 1e-10), ("finite_difference", 1e-4)])
def test_u_velocity_v_head_makes_the_v_heads_flow_map_a_fixed_point(derivative, tolerance):
    """With u_velocity v_head the target of u is the v-head's ODE flow map, exactly, for any data:
    no conditional noise z - x enters it (with the paper's conditional velocity it does)."""
    batch = Batch(x=torch.randn(64, 3, dtype=torch.float64))
    config = dict(derivative=derivative, epsilon=0.005, time=MIDDLE)
    out = run(DuMoObjective(DuMoConfig(u_velocity="v_head", **config)), LinearODE(0.7, 0.7), batch)
    x_t, t = out.targets["x_t"], out.targets["t"].reshape(-1, 1).double()
    flow_map = -torch.expm1(-0.7 * t) / t * x_t
    assert torch.allclose(out.targets["u"], flow_map, atol=tolerance, rtol=0)
    conditional = run(DuMoObjective(DuMoConfig(**config)), LinearODE(0.7, 0.7), batch)
    assert (conditional.targets["u"] - flow_map).abs().max() > 0.1
    # the v-loss still regresses on the conditional velocity z - x, whatever u_velocity is
    assert torch.equal(out.targets["v"], conditional.targets["v"])


@pytest.mark.parametrize("derivative,tolerance", [("jvp", 1e-10), ("finite_difference", 1e-4)])
def test_u_velocity_teacher_distils_the_teachers_ode_not_the_v_head(derivative, tolerance):
    batch = Batch(x=torch.randn(64, 3, dtype=torch.float64))
    config = DuMoConfig(u_velocity="teacher", derivative=derivative, epsilon=0.005, time=MIDDLE)
    student = LinearODE(a=0.2, b=0.7)  # its u is the flow map of the teacher's field, not of its own v
    out = run(DuMoObjective(config), student, batch, teacher_model=LinearODE(a=0.7, b=0.0))
    x_t, t = out.targets["x_t"], out.targets["t"].reshape(-1, 1).double()
    assert torch.allclose(out.targets["u"], -torch.expm1(-0.7 * t) / t * x_t, atol=tolerance, rtol=0)
    own = run(DuMoObjective(DuMoConfig(u_velocity="v_head", derivative=derivative, time=MIDDLE)), student, batch)
    assert (own.targets["u"] - out.targets["u"]).abs().max() > 0.1


def test_u_velocity_options_are_checked():
    assert DuMoObjective(DuMoConfig(u_velocity="teacher")).wants_teacher()
    assert not DuMoObjective(DuMoConfig(u_velocity="v_head")).wants_teacher()
    with pytest.raises(ValueError, match="needs the frozen teacher"):
        run(DuMoObjective(DuMoConfig(u_velocity="teacher")), small_model(), batch_of(8))
    with pytest.raises(ConfigError, match="derivative_direction applies to u_velocity conditional only"):
        DuMoConfig(u_velocity="v_head", derivative_direction="guided").validate("objective")
    with pytest.raises(ConfigError, match="zeta must be 0 with u_velocity teacher"):
        DuMoConfig(u_velocity="teacher", zeta=0.5).validate("objective")


def test_stencil_stays_inside_the_interval_and_is_exact_for_linear_functions():
    t = torch.tensor([0.0, 0.002, 0.5, 0.998, 1.0])
    low, high = central_difference_times(t, 0.005, 0.0, 1.0)
    assert (low >= 0).all() and (high <= 1).all() and (high > low).all()
    f = lambda s: 2.0 + 7.0 * s  # noqa: E731
    quotient = difference_quotient(f(high)[:, None], f(low)[:, None], high, low)
    assert torch.allclose(quotient, torch.full((5, 1), 7.0))
    # a lower bound per row (MeanFlow's r) and a zero-width row give 0, not a division by zero
    low, high = central_difference_times(torch.tensor([1.0]), 0.005, torch.tensor([1.0]), 1.0)
    assert difference_quotient(torch.ones(1, 1), torch.zeros(1, 1), high, low).item() == 0.0


# -- analytic targets: point-mass data --------------------------------------------------------------


@pytest.mark.parametrize("derivative", ["finite_difference", "jvp"])
def test_dumo_oracle_has_zero_loss_on_point_mass(derivative):
    a = torch.tensor([[1.5, -0.5]])
    x = a.expand(64, 2).clone()
    # The oracle divides by t, so it cannot be queried at t = 0, where the stencil of any t < e ends;
    # e = 0.005 keeps the 64 uniform draws of this seed clear of it.
    config = DuMoConfig(derivative=derivative, epsilon=0.005, time=TimeConfig(distribution="uniform"))
    objective = DuMoObjective(config)
    torch.manual_seed(0)
    out = objective(PointMassOracle(a), Batch(x=x))
    torch.manual_seed(0)
    z = torch.randn_like(x)
    assert torch.allclose(out.targets["v"], z - a, atol=1e-5)
    assert torch.allclose(out.targets["u"], z - a, atol=1e-4)
    assert out.parts["loss_u"].item() < 1e-8 and out.parts["loss_v"].item() < 1e-8


@pytest.mark.parametrize("derivative", ["finite_difference", "jvp"])
def test_meanflow_oracle_has_zero_loss_on_point_mass(derivative):
    a = torch.tensor([[-1.0, 2.0]])
    x = a.expand(64, 2).clone()
    objective = MeanFlowObjective(MeanFlowConfig(derivative=derivative, rho=0.25))
    out = run(objective, PointMassOracle(a), Batch(x=x))
    torch.manual_seed(0)
    z = torch.randn_like(x)
    assert torch.allclose(out.targets["u"], z - a, atol=1e-4)
    assert out.loss.item() < 1e-8


def test_dumo_targets_from_a_wrong_model_are_not_zero_loss():
    """The zero-loss checks above can fail: a model off by a constant gets a positive loss."""
    a = torch.tensor([[1.5, -0.5]])
    oracle = PointMassOracle(a)

    class Off(torch.nn.Module):
        def forward(self, x, t, r=None, cond=None):
            out = oracle(x, t)
            return ModelOutput(v=out.v + 0.1, u=out.u - 0.1)

    out = run(DuMoObjective(DuMoConfig()), Off(), Batch(x=a.expand(8, 2).clone()))
    assert math.isclose(out.parts["loss_u"].item(), 0.01, rel_tol=1e-3)


# -- gradients -----------------------------------------------------------------------------------


def test_gradients_reach_both_heads_and_the_trunk_and_not_the_targets():
    model = small_model()
    out = run(DuMoObjective(DuMoConfig()), model, batch_of(32))
    assert all(not value.requires_grad for value in out.targets.values())
    out.loss.backward()
    for part in ("heads.v", "heads.u", "backbone.blocks.0", "backbone.input", "backbone.conditioning.time"):
        grads = [p.grad for name, p in model.named_parameters() if name.startswith(part)]
        assert grads and all(g is not None for g in grads), part
        assert sum(g.abs().sum() for g in grads) > 0, part


def test_each_head_is_trained_only_by_its_own_loss():
    model = small_model()
    out = run(DuMoObjective(DuMoConfig(beta=1.0)), model, batch_of(32))  # velocity loss only
    out.loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.heads["u"].parameters())
    assert sum(p.grad.abs().sum() for p in model.heads["v"].parameters()) > 0


def test_loss_is_beta_weighted_sum_of_parts():
    model = small_model()
    out = run(DuMoObjective(DuMoConfig(beta=0.3)), model, batch_of(32))
    expected = 0.3 * out.parts["loss_v"] + 0.7 * out.parts["loss_u"]
    assert torch.allclose(out.loss.detach(), expected)


def test_adaptive_weighting():
    loss = torch.tensor([0.5, 2.0, 8.0], requires_grad=True)
    assert torch.equal(adaptive_weighting(loss, 0.0, 1e-3), loss)
    weighted = adaptive_weighting(loss, 1.0, 1e-3)
    weighted.sum().backward()
    assert torch.allclose(loss.grad, 1 / (loss.detach() + 1e-3))  # sg() in the denominator


# -- labels and guidance ---------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", range(1, 9))
def test_label_dropout_rate_for_every_batch_size(batch_size):
    objective = DuMoObjective(DuMoConfig(label_dropout=0.1), num_classes=10)
    labels = torch.arange(batch_size) % 10
    classes = ClassLabels(10)
    dropped = total = 0
    for _ in range(2000):
        out, kept = objective.drop_condition(labels, classes)
        assert torch.equal(out == 10, ~kept)
        assert torch.equal(out[kept], labels[kept])
        dropped += int((~kept).sum())
        total += batch_size
    assert abs(dropped / total - 0.1) < 0.02  # never "all of a small batch"
    assert objective.drop_condition(labels, classes)[0] is not None
    none = DuMoObjective(DuMoConfig(label_dropout=0.0), num_classes=10).drop_condition(labels, classes)[1]
    every = DuMoObjective(DuMoConfig(label_dropout=1.0), num_classes=10).drop_condition(labels, classes)[1]
    assert none.all() and not every.any()


def labelled_batch(n=64, classes=3):
    return batch_of(n, cond=torch.arange(n) % classes)


def test_zero_guidance_leaves_targets_unchanged():
    model = small_model(num_classes=3)
    batch = labelled_batch()
    out = run(DuMoObjective(DuMoConfig(zeta=0.0), num_classes=3), model, batch)
    torch.manual_seed(0)
    z = torch.randn_like(batch.x)
    assert torch.equal(out.targets["v"], z - batch.x)


def test_guided_velocity_target_matches_formula():
    model = small_model(num_classes=3)
    batch = labelled_batch()
    cfg = DuMoConfig(zeta=0.5, label_dropout=0.3, guidance_t_min=0.2, guidance_t_max=0.8, time=TimeConfig("uniform"))
    objective = DuMoObjective(cfg, num_classes=3)
    out = run(objective, model, batch)
    # Independent recomputation with the same random draws (z, t, dropout coins, in that order).
    torch.manual_seed(0)
    z = torch.randn_like(batch.x)
    t = torch.rand(64)
    kept = torch.rand(64) >= 0.3
    labels = torch.where(kept, batch.cond, torch.full_like(batch.cond, 3))
    x_t = t[:, None] * z + (1 - t[:, None]) * batch.x
    with torch.no_grad():
        v_cond = model(x_t, t, cond=labels).v
        v_uncond = model(x_t, t, cond=torch.full_like(labels, 3)).v
    on = (kept & (t >= 0.2) & (t <= 0.8)).float()[:, None]
    expected = (z - batch.x) + 0.5 * on * (v_cond - v_uncond)
    assert torch.allclose(out.targets["t"], t)
    assert torch.allclose(out.targets["v"], expected, atol=1e-6)
    assert 0 < on.sum() < 64  # both kinds of rows were exercised


def test_batched_and_separate_target_passes_agree():
    model = small_model(num_classes=3)
    batch = labelled_batch()
    outs = [
        run(DuMoObjective(DuMoConfig(zeta=0.5, batch_target_passes=b), num_classes=3), model, batch)
        for b in (True, False)
    ]
    for key in ("v", "u", "du_dt"):
        assert torch.allclose(outs[0].targets[key], outs[1].targets[key], atol=1e-5)


def test_dudt_clamp_bounds_the_derivative():
    model = small_model()
    out = run(DuMoObjective(DuMoConfig(dudt_clamp=0.01)), model, batch_of(32))
    assert out.targets["du_dt"].abs().max() <= 0.01 + 1e-7


def test_ema_target_network_is_used_for_the_derivative():
    model, other = small_model(), small_model()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    batch = batch_of(32)
    own = run(DuMoObjective(DuMoConfig()), model, batch).targets["du_dt"]
    with_target = run(DuMoObjective(DuMoConfig()), model, batch, target_model=other).targets["du_dt"]
    direct = run(DuMoObjective(DuMoConfig()), other, batch).targets["du_dt"]
    assert not torch.allclose(own, with_target)
    assert torch.allclose(with_target, direct)


# -- MeanFlow and Flow Matching -----------------------------------------------------------------


def test_meanflow_time_pairs():
    for rho in (0.0, 0.8, 1.0):
        t, r = MeanFlowObjective(MeanFlowConfig(rho=rho)).sample_times(20_000, "cpu")
        assert (r <= t).all() and (r >= 0).all() and (t <= 1).all()
        assert abs((t == r).float().mean().item() - rho) < 0.02


def test_meanflow_finite_difference_matches_jvp():
    model = small_model(heads=("u",), time_inputs=2)
    batch = batch_of(64)
    cfg = dict(rho=0.0, time=MIDDLE, epsilon=0.005)
    exact = run(MeanFlowObjective(MeanFlowConfig(derivative="jvp", **cfg)), model, batch)
    approx = run(MeanFlowObjective(MeanFlowConfig(derivative="finite_difference", **cfg)), model, batch)
    rel = (approx.targets["du_dt"] - exact.targets["du_dt"]).norm() / exact.targets["du_dt"].norm()
    assert rel.item() < 5e-2
    assert torch.allclose(approx.loss, exact.loss, rtol=5e-2)


class AnalyticAverageVelocity(torch.nn.Module):
    """u(x, r, t | c) = (1 + c / 2) sin(3t + r) x + t^2, with c the label (0 without labels).

    Along the tangent (dx/dt, dr/dt, dt/dt) = (w, 0, 1) its total derivative is
    du/dt = (1 + c / 2) (3 cos(3t + r) x + sin(3t + r) w) + 2t: nonzero, and different from its
    partial derivative in t, so both the (t - r) factor and the direction of the derivative show.
    """

    @staticmethod
    def gain(labels, like):
        return 1.0 if labels is None else 1.0 + 0.5 * labels.reshape(-1, 1).to(like.dtype)

    def forward(self, x, t, r=None, cond=None):
        t, r = t.reshape(-1, 1).to(x.dtype), r.reshape(-1, 1).to(x.dtype)
        return ModelOutput(u=self.gain(cond, x) * torch.sin(3 * t + r) * x + t**2)

    def total_derivative(self, x, t, r, direction, labels=None):
        t, r = t.reshape(-1, 1), r.reshape(-1, 1)
        gain = self.gain(labels, x)
        return gain * (3 * torch.cos(3 * t + r) * x + torch.sin(3 * t + r) * direction) + 2 * t


def meanflow_inputs(n=48, seed=0):
    """Data, noise and times with r != t and the central stencil (e = 0.005) inside [r, 1]."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    t = 0.1 + 0.8 * torch.rand(n, generator=generator, dtype=torch.float64)
    r = t * torch.rand(n, generator=generator, dtype=torch.float64).clamp(0.05, 0.9)
    return x, z, t, r


# the exact JVP agrees to rounding; the central difference at e = 0.005 to its second-order error
MEANFLOW_DERIVATIVES = [("jvp", 1e-10), ("finite_difference", 2e-3)]


@pytest.mark.parametrize("derivative,tolerance", MEANFLOW_DERIVATIVES)
def test_meanflow_target_subtracts_t_minus_r_times_du_dt_on_an_analytic_flow_map(derivative, tolerance):
    x, z, t, r = meanflow_inputs()
    assert (t - r > 0.01).all()  # the (t - r) du/dt term is in play on every row
    model = AnalyticAverageVelocity()
    objective = MeanFlowObjective(MeanFlowConfig(derivative=derivative, epsilon=0.005))
    out = objective.loss(model, x, z, t, r)
    x_t = t[:, None] * z + (1 - t[:, None]) * x
    v = z - x
    du_dt = model.total_derivative(x_t, t, r, v)  # along (v, 0, 1)
    u_target = v - (t - r)[:, None] * du_dt
    assert torch.allclose(out.targets["v"], v)
    assert torch.allclose(out.targets["du_dt"], du_dt, atol=tolerance, rtol=0)
    assert torch.allclose(out.targets["u"], u_target, atol=tolerance, rtol=0)
    u = model(x_t, t, r=r).u
    expected_loss = (u - u_target).square().mean()
    assert torch.allclose(out.loss.detach(), expected_loss, atol=tolerance, rtol=1e-3)
    assert (out.targets["u"] - v).abs().max() > 0.1  # the correction is not negligible


@pytest.mark.parametrize("derivative,tolerance", MEANFLOW_DERIVATIVES)
def test_meanflow_guided_target_matches_formula(derivative, tolerance):
    """v_g = (z - x) + zeta * w * (u(x_t, t, t | c) - u(x_t, t, t | null)), w = 1 on rows with a real
    label and t in [t_min, t_max]; u_tgt = v_g - (t - r) du/dt with du/dt along (v_g, 0, 1)."""
    x, z, t, r = meanflow_inputs(seed=1)
    classes, zeta, t_min, t_max = 3, 0.7, 0.3, 0.7
    labels = torch.arange(x.shape[0]) % (classes + 1)  # every fourth row has the null label (3)
    model = AnalyticAverageVelocity()
    config = MeanFlowConfig(derivative=derivative, epsilon=0.005, zeta=zeta, guidance_t_min=t_min, guidance_t_max=t_max)
    out = MeanFlowObjective(config, num_classes=classes).loss(model, x, z, t, r, labels)

    x_t = t[:, None] * z + (1 - t[:, None]) * x
    null = torch.full_like(labels, classes)
    conditional = (1 + 0.5 * labels[:, None]) * torch.sin(4 * t[:, None]) * x_t + t[:, None] ** 2  # r = t
    unconditional = (1 + 0.5 * null[:, None]) * torch.sin(4 * t[:, None]) * x_t + t[:, None] ** 2
    weight = ((labels != classes) & (t >= t_min) & (t <= t_max)).double()[:, None]
    v_guided = (z - x) + zeta * weight * (conditional - unconditional)
    du_dt = model.total_derivative(x_t, t, r, v_guided, labels)
    u_target = v_guided - (t - r)[:, None] * du_dt

    assert 0 < weight.sum() < len(weight)  # some rows guided, some not
    assert torch.allclose(out.targets["v"], v_guided, atol=1e-12, rtol=0)
    assert not torch.allclose(out.targets["v"], z - x)
    assert torch.allclose(out.targets["du_dt"], du_dt, atol=tolerance, rtol=0)
    assert torch.allclose(out.targets["u"], u_target, atol=tolerance, rtol=0)


class LinearAverageVelocity(torch.nn.Module):
    """u(x, t, r) = x (1 - exp(-b (t - r))) / (t - r), b x on the diagonal: the exact average
    velocity from t to r of dx/dt = b x."""

    def __init__(self, b):
        super().__init__()
        self.b = b

    def forward(self, x, t, r=None, cond=None):
        gap = (t - r).reshape(-1, 1).to(x.dtype)
        safe = torch.where(gap > 0, gap, torch.ones_like(gap))
        return ModelOutput(u=torch.where(gap > 0, -torch.expm1(-self.b * safe) / safe, self.b) * x)


@pytest.mark.parametrize("derivative,tolerance", [("jvp", 1e-10), ("finite_difference", 1e-4)])
def test_meanflow_u_velocity_teacher_makes_the_teachers_average_velocity_a_fixed_point(derivative, tolerance):
    """Distilled from a teacher whose velocity is b x, the exact average velocity of that field is its
    own target on and off the diagonal, for any data; with the conditional velocity it is not."""
    batch = Batch(x=torch.randn(64, 3, dtype=torch.float64))
    config = dict(derivative=derivative, epsilon=0.005, rho=0.5, time=MIDDLE)
    student, teacher = LinearAverageVelocity(0.7), LinearAverageVelocity(0.7)
    objective = MeanFlowObjective(MeanFlowConfig(u_velocity="teacher", **config))
    out = run(objective, student, batch, teacher_model=teacher)
    t, r = out.targets["t"].double(), out.targets["r"].double()
    expected = student(out.targets["x_t"], t, r).u
    assert (t > r).any() and (t == r).any()
    assert torch.allclose(out.targets["u"], expected, atol=tolerance, rtol=0)
    conditional = run(MeanFlowObjective(MeanFlowConfig(**config)), student, batch)
    assert (conditional.targets["u"] - expected).abs().max() > 0.1
    assert objective.wants_teacher() and not MeanFlowObjective(MeanFlowConfig(**config)).wants_teacher()
    with pytest.raises(ConfigError, match="zeta must be 0 with u_velocity teacher"):
        MeanFlowConfig(u_velocity="teacher", zeta=0.5).validate("objective")


def test_meanflow_with_rho_one_is_flow_matching_on_the_u_head():
    model = small_model(heads=("u",), time_inputs=2)
    batch = batch_of(32)
    out = run(MeanFlowObjective(MeanFlowConfig(rho=1.0)), model, batch)
    t = out.targets["t"]
    with torch.no_grad():
        u = model(out.targets["x_t"], t, r=t).u
    assert torch.allclose(out.loss.detach(), (u - out.targets["v"]).square().mean(), rtol=1e-5)


def test_meanflow_jvp_gradients_flow_to_the_model():
    model = small_model(heads=("u",), time_inputs=2)
    out = run(MeanFlowObjective(MeanFlowConfig(derivative="jvp", rho=0.5)), model, batch_of(32))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert not out.targets["du_dt"].requires_grad


def test_flow_matching_target_and_loss():
    model = small_model(heads=("v",))
    batch = batch_of(32)
    out = run(FlowMatchingObjective(FlowMatchingConfig()), model, batch)
    torch.manual_seed(0)
    z = torch.randn_like(batch.x)
    assert torch.allclose(out.targets["v"], z - batch.x)
    with torch.no_grad():
        v = model(out.targets["x_t"], out.targets["t"]).v
    assert torch.allclose(out.loss.detach(), (v - (z - batch.x)).square().mean(), rtol=1e-5)

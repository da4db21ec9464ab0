import re

import pytest
import torch
from conftest import PointMassOracle
from hypothesis import given
from hypothesis import strategies as st

from dumo.samplers import (
    check_times,
    flow_map_sample,
    meanflow_sample,
    ode_sample,
    sample,
    sample_path,
    uniform_times,
)

POINT = torch.tensor([[0.7, -1.2]])


def noise(n=16):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["flow_map", "meanflow", "euler", "heun"])
def test_one_step_of_an_oracle_returns_the_data_point(method):
    out = sample(PointMassOracle(POINT), noise(), nfe=1, method=method)
    assert torch.allclose(out, POINT.expand(16, 2), atol=1e-5)


@pytest.mark.parametrize("stochasticity", [0.0, 0.5, 1.0])
def test_k_step_flow_map_visits_the_configured_times_and_lands_on_the_point(stochasticity):
    oracle = PointMassOracle(POINT)
    times = [1.0, 0.6, 0.25]
    out = flow_map_sample(oracle, noise(), times, stochasticity=stochasticity, generator=torch.Generator())
    assert [c[0].item() for c in oracle.calls] == pytest.approx(times)
    assert torch.allclose(out, POINT.expand(16, 2), atol=1e-5)


def test_deterministic_flow_map_step_keeps_the_implied_noise():
    # A constant flow map u = c is self-consistent: x_0 = x_1 - c from any time on the line.
    # With stochasticity 0 the re-noised point stays on that line, so 2 steps equal 1 step;
    # with fresh noise (stochasticity 1) they do not.
    c = torch.tensor([0.3, -0.4])

    class Constant(torch.nn.Module):
        def forward(self, x, t, r=None, cond=None):
            return type("Out", (), {"u": c.expand_as(x)})()

    x1 = noise()
    deterministic = flow_map_sample(Constant(), x1, [1.0, 0.5], stochasticity=0.0)
    assert torch.allclose(deterministic, x1 - c, atol=1e-6)
    fresh = flow_map_sample(Constant(), x1, [1.0, 0.5], stochasticity=1.0, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(fresh, x1 - c, atol=1e-2)


def test_meanflow_sampler_time_grid():
    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pairs = []

        def forward(self, x, t, r=None, cond=None):
            self.pairs.append((t[0].item(), r[0].item()))
            return PointMassOracle(POINT)(x, t)

    model = Recorder()
    out = meanflow_sample(model, noise(), [1.0, 0.5])
    assert model.pairs == [(1.0, 0.5), (0.5, 0.0)]
    assert torch.allclose(out, POINT.expand(16, 2), atol=1e-5)


def test_euler_integrates_a_known_velocity_field():
    # v(x, t) = x has the solution x(0) = x(1) * e^{-1}; Euler with n steps gives (1 - 1/n)^n.
    class Linear(torch.nn.Module):
        def forward(self, x, t, r=None, cond=None):
            return type("Out", (), {"v": x})()

    x1 = noise()
    for steps in (1, 4, 64):
        assert torch.allclose(ode_sample(Linear(), x1, steps, "euler"), x1 * (1 - 1 / steps) ** steps, atol=1e-5)
    heun = ode_sample(Linear(), x1, 64, "heun")
    assert torch.allclose(heun, x1 * torch.exp(torch.tensor(-1.0)), atol=1e-4)


def test_uniform_times():
    assert uniform_times(1) == [1.0]
    assert uniform_times(2) == [1.0, 0.5]
    assert uniform_times(4, t_start=0.8) == pytest.approx([0.8, 0.6, 0.4, 0.2])


@pytest.mark.parametrize("bad", [[], [0.5, 0.5], [0.3, 0.6], [1.2], [0.0], [1.0, -0.1]])
def test_invalid_times_are_refused(bad):
    with pytest.raises(ValueError):
        check_times(bad)


@given(st.integers(min_value=1, max_value=64), st.floats(min_value=0.05, max_value=1.0))
def test_uniform_schedules_are_valid(nfe, t_start):
    times = uniform_times(nfe, t_start)
    assert len(times) == nfe and times[0] == pytest.approx(t_start)
    check_times(times)


@given(st.lists(st.floats(min_value=1e-3, max_value=1.0), min_size=1, max_size=8, unique=True))
def test_any_decreasing_schedule_samples_an_oracle_exactly(values):
    times = sorted(values, reverse=True)
    out = flow_map_sample(PointMassOracle(POINT), noise(4), times, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, POINT.expand(4, 2), atol=1e-4)


class ConstantField(torch.nn.Module):
    """v = u = c everywhere: Euler paths are straight lines x_1 - (1 - t) c with known points."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x, t, r=None, cond=None):
        return type("Out", (), {"u": self.c.expand_as(x), "v": self.c.expand_as(x)})()


C = torch.tensor([0.8, -0.5])


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_ode_path_holds_the_state_at_every_grid_time(method):
    x1 = noise()
    states = []
    out = ode_sample(ConstantField(C), x1, 4, method, path=states)
    # dx/dt = c from t = 1 down: at t_j = 1 - j/4 the state is x_1 - (j / 4) c
    assert len(states) == 5
    for j, state in enumerate(states):
        assert torch.allclose(state, x1 - (j / 4) * C, atol=1e-6), j
    assert torch.equal(states[-1], out)


def test_flow_map_and_meanflow_paths_hold_the_state_at_each_time():
    x1 = noise()
    # deterministic flow map with u = c: x0 = x_1 - c, implied noise x_1, so x at 0.5 is x_1 - 0.5 c
    states = sample_path(ConstantField(C), x1, 2, "flow_map", times=[1.0, 0.5], stochasticity=0.0)
    expected = torch.stack([x1, x1 - 0.5 * C, x1 - C])
    assert states.shape == (3, 16, 2) and torch.allclose(states, expected, atol=1e-6)
    states = sample_path(ConstantField(C), x1, 3, "meanflow", times=[1.0, 0.6, 0.2])
    expected = torch.stack([x1 - (1 - t) * C for t in (1.0, 0.6, 0.2, 0.0)])
    assert torch.allclose(states, expected, atol=1e-6)


@pytest.mark.parametrize("method", ["flow_map", "meanflow", "euler", "heun"])
def test_asking_for_the_path_leaves_the_samples_unchanged(method):
    model = PointMassOracle(POINT)
    plain = sample(model, noise(), 3, method, generator=torch.Generator().manual_seed(5))
    states = []
    traced = sample(model, noise(), 3, method, generator=torch.Generator().manual_seed(5), path=states)
    assert torch.equal(plain, traced) and torch.equal(states[-1], plain) and torch.equal(states[0], noise())
    stacked = sample_path(model, noise(), 3, method, generator=torch.Generator().manual_seed(5))
    assert torch.equal(stacked[-1], plain)


# -- samplers that fit the objective, finite settings, sample counts, the cost of guidance --------


def toy_network(objective: str, **objective_keys):
    """A tiny untrained moons network of ``objective``, built as a run builds it."""
    from dumo.config import config_from_dict
    from dumo.network import build_network

    config = config_from_dict(
        {"objective": {"name": objective, **objective_keys}, "model": {"hidden_dim": 16, "depth": 1}}
    )
    return build_network(config, (2,))


def test_each_objective_declares_the_samplers_it_supports():
    from dumo.objectives import OBJECTIVES
    from dumo.samplers import SAMPLERS

    for name, (config_class, objective_class) in OBJECTIVES.items():
        objective = objective_class(config_class())
        declared = objective.head_methods()
        for head, methods in declared.items():
            assert head in objective.heads and methods and all(m in SAMPLERS for m in methods), name
        assert all(objective.head_samplers()[head] in declared[head] for head in objective.head_samplers()), name
        assert toy_network(name).head_methods == declared  # the network carries them to sampling
    assert OBJECTIVES["fm"][1].sampling_methods == ("euler", "heun")
    assert OBJECTIVES["meanflow"][1].sampling_methods == ("meanflow",)


@pytest.mark.parametrize(
    ("objective", "method", "known"),
    [
        ("fm", "flow_map", "euler, heun"),
        ("meanflow", "euler", "meanflow"),
        ("shortcut", "heun", "meanflow"),
        ("dumo", "meanflow", "flow_map, euler, heun"),
    ],
)
def test_a_sampler_that_does_not_fit_the_objective_is_refused_by_name(objective, method, known):
    from dumo.config import SampleConfig
    from dumo.errors import SamplingError
    from dumo.sampling import generate

    expected = f"sampler '{method}' does not fit this model (objective {objective}); it samples with {known}"
    with pytest.raises(SamplingError, match=f"^{re.escape(expected)}$"):
        generate(toy_network(objective), objective, (4, 2), 1, SampleConfig(), method=method)


def test_a_named_sampler_draws_the_head_of_its_kind_on_a_multi_head_model():
    from dumo.config import SampleConfig
    from dumo.errors import SamplingError
    from dumo.sampling import generate

    heads = {"v": {"kind": "velocity"}, "u": {"kind": "dumo_flow_map"}, "m": {"kind": "meanflow"}}
    model = toy_network("multihead", heads=heads)
    by_method = generate(model, "multihead", (8, 2), 2, SampleConfig(), method="meanflow")
    by_head = generate(model, "multihead", (8, 2), 2, SampleConfig(head="m"))
    assert torch.equal(by_method, by_head)  # the MeanFlow head m, not the flow-map head u the sampler reads
    with pytest.raises(SamplingError, match="^sampler 'euler' does not fit head 'u' of this model"):
        generate(model, "multihead", (8, 2), 2, SampleConfig(head="u"), method="euler")


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -1.0])
def test_guidance_must_be_a_finite_number_at_least_zero(scale):
    from dumo.config import SampleConfig
    from dumo.errors import ConfigError
    from dumo.samplers import GuidedModel
    from dumo.sampling import generate

    model = toy_network("dumo")
    with pytest.raises(ValueError, match="guidance scale must be a finite number >= 0"):
        GuidedModel(model, scale)
    with pytest.raises(ConfigError, match="sample.guidance_scale must be a finite number >= 0"):
        generate(model, "dumo", (4, 2), 1, SampleConfig(guidance_scale=scale), labels=torch.zeros(4, dtype=torch.long))


def test_zero_samples_or_nfe_is_refused_by_name():
    from dumo.config import SampleConfig
    from dumo.errors import SamplingError
    from dumo.sampling import generate, generate_many

    model = toy_network("dumo")
    with pytest.raises(SamplingError, match=r"^the number of samples must be >= 1; got 0$"):
        generate_many(model, "dumo", (0, 2), 1, SampleConfig(), batch_size=4)
    with pytest.raises(SamplingError, match=r"^nfe must be >= 1; got 0$"):
        generate(model, "dumo", (4, 2), 0, SampleConfig())


def test_guided_cost_shows_steps_and_network_passes():
    from dumo.samplers import cost_label, network_passes

    assert cost_label(1, "flow_map", guided=False) == "1 NFE"
    assert cost_label(4, "heun", guided=False) == "3 NFE (2 steps)"  # 2 steps, no correction on the last
    assert cost_label(3, "heun", guided=False) == "3 NFE"
    assert cost_label(1, "heun", guided=False) == "1 NFE"
    assert cost_label(1, "flow_map", guided=True) == "1 step (2 passes with guidance)"
    assert cost_label(4, "euler", guided=True) == "4 steps (8 passes with guidance)"
    assert cost_label(3, "heun", guided=True) == "2 steps (6 passes with guidance)"  # 3 evaluations, 2 passes each
    assert network_passes(3, "heun", guided=False) == 3

"""A new objective, head or sampler is a registry entry, and a new kind of condition a conditioner module:
the rest of dumo finds them through the registries and the network."""

from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from conftest import MOONS_CONFIG, TINY_MOONS, randomise_heads, small_model

from dumo.conditioning import find_conditioner
from dumo.config import SampleConfig, config_from_dict, load_config
from dumo.data.batch import Batch
from dumo.errors import ConfigError
from dumo.models import ModelConfig, build_model
from dumo.network import build_network
from dumo.objectives import (
    OBJECTIVES,
    DuMoConfig,
    DuMoObjective,
    Objective,
    ObjectiveConfig,
    ObjectiveOutput,
    build_objective,
)
from dumo.objectives.base import squared_error
from dumo.samplers import SAMPLERS, GuidedModel, Sampler, register_sampler, sample
from dumo.sampling import generate, sampler_for


def test_every_objective_declares_a_registered_sampler_that_reads_one_of_its_heads():
    for name, (config_class, objective_class) in OBJECTIVES.items():
        assert config_class().name == name
        objective = objective_class(config_class())
        for head, sampler in objective.head_samplers().items():  # what sample.head picks from
            assert head in objective.heads and sampler in SAMPLERS, name
        if not objective_class.default_sampler:  # a multi-head model's sampler is that of the head drawn
            continue
        sampler = SAMPLERS[objective_class.default_sampler]
        assert sampler.head in objective_class.heads, name
        assert sampler_for(name) == objective_class.default_sampler


def test_objectives_tell_the_trainer_what_they_need():
    dumo, meanflow, fm = (OBJECTIVES[name][1] for name in ("dumo", "meanflow", "fm"))
    dumo_config, meanflow_config, fm_config = (OBJECTIVES[name][0] for name in ("dumo", "meanflow", "fm"))
    assert not dumo(dumo_config(derivative="finite_difference")).needs_forward_ad()
    assert meanflow(meanflow_config(derivative="jvp")).needs_forward_ad()
    assert dumo(dumo_config(target_network="ema")).target_network() == "ema"
    assert dumo(dumo_config(target_precision="bf16")).target_precision() == "bf16"
    plain = fm(fm_config())
    assert plain.target_network() is None and plain.target_precision() is None and not plain.needs_forward_ad()


def test_any_identifier_names_a_head():
    model = build_model(ModelConfig(hidden_dim=16, depth=1), (2,), ("v", "shortcut"))
    out = model(torch.randn(6, 2), torch.rand(6))
    assert out.head_names == ("v", "shortcut") and out.shortcut.shape == (6, 2)
    assert out.u is None  # a head the model lacks
    first, second = out.split([4, 2])
    assert torch.equal(second.shortcut, out.shortcut[4:]) and torch.equal(first.v, out.v[:4])
    assert any(key.startswith("heads.shortcut.") for key in model.state_dict())
    for bad in ("2x", "_hidden", "outputs", "split", "a-b"):
        with pytest.raises(ValueError, match="head name"):
            build_model(ModelConfig(hidden_dim=16, depth=1), (2,), ("v", bad))


def test_build_network_gives_each_objective_its_heads_and_time_inputs():
    for name in OBJECTIVES:
        config = config_from_dict({"objective": {"name": name}, "model": {"hidden_dim": 16, "depth": 1}})
        objective = build_objective(config.objective)  # a multi-head config names its heads
        torch.manual_seed(0)
        network = build_network(config, (2,))
        torch.manual_seed(0)
        direct = build_model(config.model, (2,), objective.heads, 0, objective.time_inputs)
        assert network.head_names == objective.heads
        assert network.state_dict().keys() == direct.state_dict().keys()


def test_sampler_names_come_from_the_registry():
    with pytest.raises(ConfigError, match="sample.method' must be one of auto, flow_map"):
        config_from_dict({"sample": {"method": "nope"}})
    assert config_from_dict({"sample": {"method": "heun"}}).sample.method == "heun"
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        sample(torch.nn.Identity(), torch.zeros(2, 2), 1, "nope")


# -- a whole new objective, with its own head and sampler, registered from outside dumo ------------


@dataclass
class ShortcutLikeConfig(ObjectiveConfig):
    name: Literal["shortcut_like"] = "shortcut_like"


class ShortcutLikeObjective(Objective):
    """Flow Matching on a head named ``s``: enough to run through training, loading and sampling."""

    heads = ("s",)
    default_sampler = "s_euler"

    def __call__(self, model, batch, target_model=None, teacher_model=None):
        x = batch.x
        z = torch.randn_like(x)
        t = self.time_sampler.sample(x.shape[0], x.device)
        x_t = self.path.sample(x, z, t)
        loss = squared_error(model(x_t, t).s, self.path.velocity(x, z, t))
        return ObjectiveOutput(loss=loss.mean(), parts={"loss_s": loss.mean().detach()})


def s_euler(model, noise, nfe, cond, times, t_start, stochasticity, generator, path):
    x = noise
    for i in range(nfe):
        t = torch.full((x.shape[0],), t_start * (1 - i / nfe))
        x = x - (t_start / nfe) * model(x, t, cond=cond).s
    return x


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(OBJECTIVES, "shortcut_like", (ShortcutLikeConfig, ShortcutLikeObjective))
    monkeypatch.setitem(SAMPLERS, "s_euler", Sampler("s_euler", "s", s_euler))


def test_a_registered_objective_trains_loads_and_samples(registered, tmp_path):
    from dumo.runs.generation import generate_from_run
    from dumo.runs.loading import load_run
    from dumo.training import Trainer

    config = load_config(MOONS_CONFIG, [*TINY_MOONS, "objective={name: shortcut_like}", "train.steps=3"])
    assert isinstance(config.objective, ShortcutLikeConfig) and SampleConfig().method == "auto"
    result = Trainer(config, tmp_path / "run").run()
    assert result.step == 3
    run = load_run(tmp_path / "run")
    assert run.model.head_names == ("s",)
    labels, samples = generate_from_run(run, nfe=2, num=10)
    assert labels is None and samples.shape == (10, 2) and torch.isfinite(samples).all()
    # "auto" found the objective's own sampler: the same noise through s_euler by hand gives the same points
    points = generate(run.model, "shortcut_like", (10, 2), 2, run.config.sample, seed=5)
    noise = torch.randn((10, 2), generator=torch.Generator().manual_seed(5))
    assert torch.allclose(points, s_euler(run.model, noise, 2, None, None, 1.0, 1.0, None, None))
    assert not torch.allclose(points, noise, atol=1e-4)  # the trained s-head moved them


# -- a new kind of condition: one conditioner module, plugged into the network from outside dumo ---


class ScalarConditioner(torch.nn.Module):
    """A condition dumo does not know: one real number per sample (a brightness, a temperature),
    NaN standing for the null condition."""

    condition_kind = "scalar"

    def __init__(self, dim: int):
        super().__init__()
        self.features = torch.nn.Linear(1, dim)
        self.null = torch.nn.Parameter(torch.randn(dim))

    def forward(self, cond, batch_size, device):
        if cond is None:
            return self.null.expand(batch_size, -1)
        null = torch.isnan(cond)
        # zeroed, not only replaced: a NaN through the linear layer would reach its gradient (0 * NaN)
        value = torch.where(null, 0.0, cond)
        return torch.where(null[:, None], self.null, self.features(value[:, None]))

    def null_like(self, cond):
        return None if cond is None else torch.full_like(cond, float("nan"))

    def drop(self, cond, rows):
        return None if cond is None else torch.where(rows, float("nan"), cond)

    def is_null(self, cond):
        return torch.isnan(cond)


def test_a_new_kind_of_condition_trains_guides_and_samples_through_its_conditioner():
    network = build_model(ModelConfig(hidden_dim=16, depth=1), (2,), ("v", "u"), conditioner=ScalarConditioner)
    randomise_heads(network)
    conditioner = find_conditioner(network)
    assert isinstance(conditioner, ScalarConditioner) and network.condition_kind == "scalar"
    cond = torch.linspace(-1.0, 1.0, 16)
    # training: condition dropout and DuMo's training-time guidance take the null from the conditioner
    seen = []
    spy = network.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["cond"]), with_kwargs=True)
    objective = DuMoObjective(DuMoConfig(zeta=0.5, label_dropout=0.5))
    out = objective(network, Batch(torch.randn(16, 2), cond))
    spy.remove()
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(conditioner.features.weight.grad).all()
    assert conditioner.features.weight.grad.abs().sum() > 0
    assert 0 < seen[0].isnan().sum() < 16  # some rows dropped to the null
    assert seen[1][-16:].isnan().all()  # the unconditional pass of the guided target
    # sampling: guidance with the same null, which is also what an unconditional call reads
    x, t, w = torch.randn(16, 2), torch.rand(16), 2.0
    with torch.no_grad():
        conditional, unconditional = network(x, t, cond=cond), network(x, t, cond=conditioner.null_like(cond))
        guided = GuidedModel(network, w)(x, t, cond=cond)
        assert torch.equal(unconditional.u, network(x, t).u)
        torch.testing.assert_close(guided.u, unconditional.u + w * (conditional.u - unconditional.u))
        samples = sample(GuidedModel(network, w), torch.randn(16, 2), 2, "flow_map", cond=cond)
    assert torch.isfinite(samples).all()


def test_a_dit_takes_a_new_conditioner_too():
    network = build_model(ModelConfig(name="DiT-XS/2", depth=1), (1, 8, 8), ("v",), conditioner=ScalarConditioner)
    assert network.condition_kind == "scalar"
    out = network(torch.randn(3, 1, 8, 8), torch.rand(3), cond=torch.tensor([0.5, float("nan"), -1.0]))
    assert out.v.shape == (3, 1, 8, 8) and torch.isfinite(out.v).all()
    with pytest.raises(ValueError, match="one conditioner"):
        build_model(ModelConfig(hidden_dim=16, depth=1), (2,), ("v",), num_classes=3, conditioner=ScalarConditioner)


# -- a new sampler: one function and its registration ------------------------------------------------


def midpoint(model, noise, nfe, cond, times, t_start, stochasticity, generator, path):
    """The midpoint rule on the velocity head: two evaluations per step of size t_start / nfe."""
    x, step = noise, t_start / nfe
    for i in range(nfe):
        t = torch.full((x.shape[0],), t_start - i * step)
        half = x - 0.5 * step * model(x, t, cond=cond).v
        x = x - step * model(half, t - 0.5 * step, cond=cond).v
    return x


@pytest.fixture
def midpoint_registered():
    register_sampler("midpoint", head="v")(midpoint)
    yield
    del SAMPLERS["midpoint"]


def test_a_registered_sampler_is_found_by_name_and_draws_conditioned(midpoint_registered):
    assert config_from_dict({"sample": {"method": "midpoint"}}).sample.method == "midpoint"
    network = small_model(num_classes=3)
    labels, noise = torch.arange(6) % 3, torch.randn(6, 2)
    drawn = sample(network, noise, 2, "midpoint", cond=labels)
    assert torch.equal(drawn, midpoint(network, noise, 2, labels, None, 1.0, 1.0, None, None))
    assert not torch.allclose(drawn, sample(network, noise, 2, "euler", cond=labels), atol=1e-4)
    assert not torch.allclose(drawn, sample(network, noise, 2, "midpoint", cond=(labels + 1) % 3), atol=1e-4)
    guided = sample(GuidedModel(network, 3.0), noise, 2, "midpoint", cond=labels)
    assert torch.isfinite(guided).all() and not torch.allclose(guided, drawn, atol=1e-4)

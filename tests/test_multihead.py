"""Multi-head objective (paper Sec. 4.3): its loss is the weighted sum of the single-head terms, the
shared derivative passes change nothing, and a three-head run trains and samples every head."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MOONS, small_model
from torch import nn

from dumo.config import load_config
from dumo.errors import ConfigError
from dumo.models.output import ModelOutput
from dumo.objectives import (
    DuMoConfig,
    DuMoObjective,
    MeanFlowConfig,
    MeanFlowObjective,
    MultiHeadConfig,
    MultiHeadObjective,
    TimeConfig,
)
from dumo.objectives.shortcut import ShortcutConfig, ShortcutObjective
from dumo.schema import build

WEIGHTS = {"v": 0.5, "u": 0.3, "m": 0.2}
KINDS = {"v": "velocity", "u": "dumo_flow_map", "m": "meanflow"}


def three_heads(**keys) -> MultiHeadObjective:
    heads = {name: {"kind": KINDS[name], "weight": WEIGHTS[name]} for name in KINDS}
    config = build(MultiHeadConfig, {"heads": heads, "epsilon": 0.05, **keys}, "objective")
    return MultiHeadObjective(config, num_classes=3)


class HeadsAtR(nn.Module):
    """The three-head model seen as a single-head objective's network: ``r`` pinned to the multi-head
    draw (a batched call repeats it) and the chosen heads under the names that objective reads."""

    def __init__(self, model: nn.Module, r: torch.Tensor, names: dict[str, str]):
        super().__init__()
        self.model, self.r, self.names = model, r, names

    def forward(self, x, t, r=None, cond=None):
        pinned = self.r.repeat(x.shape[0] // self.r.shape[0])
        out = self.model(x, t, r=pinned, cond=cond)
        return ModelOutput({shown: out.outputs[head] for shown, head in self.names.items()})


class HeadsRenamed(nn.Module):
    """The model's heads under other names (its r passes through)."""

    def __init__(self, model: nn.Module, names: dict[str, str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, x, t, r=None, cond=None):
        out = self.model(x, t, r=r, cond=cond)
        return ModelOutput({shown: out.outputs[head] for shown, head in self.names.items()})


def inputs(n=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x, z = torch.randn(n, 2, generator=generator), torch.randn(n, 2, generator=generator)
    t = torch.rand(n, generator=generator)
    r = t * torch.rand(n, generator=generator)
    r[: n // 2] = t[: n // 2]  # half on the diagonal, as MeanFlow's rho draws
    r[n // 2 : n // 2 + 8] = (t[n // 2 : n // 2 + 8] - 0.01).clamp(min=0)  # t - e < r: the stencils differ
    labels = torch.randint(0, 4, (n,), generator=generator)  # class 3 is the null class
    return x, z, t, r, labels


@pytest.mark.parametrize("derivative", ["finite_difference", "jvp"])
def test_loss_is_the_weighted_sum_of_the_single_head_terms(derivative):
    torch.manual_seed(0)
    model = small_model(("v", "u", "m"), num_classes=3, time_inputs=2)
    x, z, t, r, labels = inputs()
    combined = three_heads(derivative=derivative).loss(model, x, z, t, r, labels)

    # DuMo (beta 0.5 weighs v and u alike) on the v- and u-heads; MeanFlow on the m-head; same z, t, r.
    common = {"derivative": derivative, "epsilon": 0.05, "time": TimeConfig()}
    dumo = DuMoObjective(DuMoConfig(beta=0.5, **common), num_classes=3)
    dumo_out = dumo.loss(HeadsAtR(model, r, {"v": "v", "u": "u"}), x, z, t, labels)
    meanflow = MeanFlowObjective(MeanFlowConfig(**common), num_classes=3)
    meanflow_out = meanflow.loss(HeadsAtR(model, r, {"u": "m"}), x, z, t, r, labels)

    singles = {"v": dumo_out.parts["loss_v"], "u": dumo_out.parts["loss_u"], "m": meanflow_out.parts["loss"]}
    for name, value in singles.items():
        torch.testing.assert_close(combined.parts[f"loss_{name}"], value, rtol=1e-5, atol=1e-7)
    expected = sum(WEIGHTS[name] * value for name, value in singles.items())
    torch.testing.assert_close(combined.loss.detach(), expected, rtol=1e-5, atol=1e-7)
    assert combined.loss.item() > 0.01  # a random model is far from its targets: the check has teeth


@pytest.mark.parametrize("direction", ["conditional", "guided", "v_head"])
def test_guided_velocity_and_flow_map_terms_are_dumos(direction):
    torch.manual_seed(1)
    model = small_model(("v", "u", "m"), num_classes=3, time_inputs=2)
    x, z, t, r, labels = inputs(seed=1)
    keys = {"zeta": 0.5, "derivative_direction": direction}
    combined = three_heads(**keys).loss(model, x, z, t, r, labels)
    dumo = DuMoObjective(DuMoConfig(beta=0.5, epsilon=0.05, **keys), num_classes=3)
    single = dumo.loss(HeadsAtR(model, r, {"v": "v", "u": "u"}), x, z, t, labels)
    torch.testing.assert_close(combined.targets["v"], single.targets["v"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(combined.targets["u"], single.targets["u"], rtol=1e-5, atol=1e-5)
    assert not torch.equal(combined.targets["v"], (z - x))  # guidance did change the target


@pytest.mark.parametrize("zeta", [0.0, 0.5])
@pytest.mark.parametrize("derivative", ["finite_difference", "jvp"])
def test_sharing_the_derivative_passes_changes_nothing_and_saves_passes(zeta, derivative):
    torch.manual_seed(2)
    model = small_model(("v", "u", "m"), num_classes=3, time_inputs=2)
    x, z, t, r, labels = inputs(seed=2)
    rows_seen = []
    hook = model.register_forward_pre_hook(lambda module, args: rows_seen.append(args[0].shape[0]))
    # guided: DuMo and MeanFlow both differentiate along the guided velocity target
    keys = {"zeta": zeta, "derivative": derivative, "derivative_direction": "guided"}
    shared = three_heads(share_derivative_passes=True, **keys).loss(model, x, z, t, r, labels)
    shared_rows, rows_seen[:] = sum(rows_seen), []
    separate = three_heads(share_derivative_passes=False, **keys).loss(model, x, z, t, r, labels)
    separate_rows = sum(rows_seen)
    hook.remove()
    torch.testing.assert_close(shared.loss, separate.loss, rtol=1e-6, atol=1e-8)
    for name in ("v", "u", "m", "du_dt"):
        torch.testing.assert_close(shared.targets[name], separate.targets[name], rtol=1e-6, atol=1e-6)
    used = t != r  # dm/dt enters m's target only where t - r != 0
    torch.testing.assert_close(shared.targets["dm_dt"][used], separate.targets["dm_dt"][used], rtol=1e-6, atol=1e-6)
    if derivative == "finite_difference":
        # separate: t + e and t - e for u and for m; shared: t + e once, t - e once plus the rows
        # where MeanFlow's stencil (kept in [r, 1]) ends higher than DuMo's (kept in [0, 1]) and r < t
        differing = ((t - 0.05).clamp(min=0) < r) & used
        differing[0] = True  # one row always, for the same calls on every rank
        differing = int(differing.sum())
        assert 1 < differing < 16
        assert separate_rows - shared_rows == 2 * 64 - differing
    else:
        assert shared_rows < separate_rows  # one forward-mode pass instead of two


def test_shortcut_variant_is_the_weighted_sum_of_dumo_and_shortcut_terms():
    torch.manual_seed(4)
    model = small_model(("v", "u", "s"), num_classes=3, time_inputs=2)
    heads = {"v": {"kind": "velocity", "weight": 0.5}, "u": {"kind": "dumo_flow_map"}, "s": {"kind": "shortcut"}}
    heads["u"]["weight"], heads["s"]["weight"] = 0.3, 0.2
    config = build(MultiHeadConfig, {"heads": heads, "epsilon": 0.05, "max_steps": 8}, "objective")
    objective = MultiHeadObjective(config, num_classes=3)
    x, z, _, _, labels = inputs(n=32, seed=4)
    t, r = objective.draw_times(32, "cpu")  # Shortcut's grids: d = t - r in {1/8, 1/4, 1/2, 1}
    d = t - r
    assert (d > 0.2).any() and (d < 0.2).any()  # self-consistency and Flow Matching rows
    combined = objective.loss(model, x, z, t, r, labels)

    dumo = DuMoObjective(DuMoConfig(beta=0.5, epsilon=0.05), num_classes=3)
    dumo_out = dumo.loss(HeadsAtR(model, r, {"v": "v", "u": "u"}), x, z, t, labels)
    shortcut = ShortcutObjective(ShortcutConfig(max_steps=8, target_network="online"), num_classes=3)
    shortcut_out = shortcut.loss(HeadsRenamed(model, {"u": "s"}), x, z, t, d, labels)
    singles = {"v": dumo_out.parts["loss_v"], "u": dumo_out.parts["loss_u"], "s": shortcut_out.parts["loss"]}
    for name, value in singles.items():
        torch.testing.assert_close(combined.parts[f"loss_{name}"], value, rtol=1e-5, atol=1e-7)
    expected = 0.5 * singles["v"] + 0.3 * singles["u"] + 0.2 * singles["s"]
    torch.testing.assert_close(combined.loss.detach(), expected, rtol=1e-5, atol=1e-7)
    assert combined.parts["loss_s"] > 0.01


def test_gradients_reach_every_head():
    torch.manual_seed(3)
    model = small_model(("v", "u", "m"), num_classes=3, time_inputs=2)
    x, z, t, r, labels = inputs(seed=3)
    three_heads().loss(model, x, z, t, r, labels).loss.backward()
    for name in ("v", "u", "m"):
        assert model.heads[name].linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("heads", "message"),
    [
        (
            {"v": {"kind": "velocty"}},
            "objective.heads.v.kind must be one of velocity, dumo_flow_map, meanflow, shortcut",
        ),
        ({"split": {"kind": "velocity"}}, "head name 'split' must be an identifier"),
        ({}, "objective.heads must name at least one head"),
    ],
)
def test_bad_heads_are_one_line_config_errors(heads, message):
    with pytest.raises(ConfigError, match=message) as error:
        build(MultiHeadConfig, {"heads": heads}, "objective")
    assert "\n" not in str(error.value)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def dumo(*args):
    return subprocess.run([sys.executable, "-m", "dumo", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize(
    ("config", "third"), [("moons-three-heads-meanflow.yaml", "m"), ("moons-three-heads-shortcut.yaml", "s")]
)
def test_three_head_run_trains_and_samples_each_head_through_the_cli(tmp_path, config, third):
    run = tmp_path / "run"
    overrides = [item for o in [*TINY_MOONS, "train.steps=3"] for item in ("--set", o)]
    result = dumo("train", CONFIGS / "toy" / config, "--out", run, *overrides)
    assert result.returncode == 0, result.stderr
    header = (run / "train_log.csv").read_text().splitlines()[0].split(",")
    assert {"loss", "loss_v", "loss_u", f"loss_{third}"} <= set(header)  # one logged term per head
    samples = {}
    for head in ("u", third, "v"):
        out = tmp_path / f"{head}.npy"
        result = dumo("sample", run, "--head", head, "--nfe", 2, "-n", 50, "--out", out)
        assert result.returncode == 0, result.stderr
        samples[head] = np.load(out)
        assert samples[head].shape == (50, 2) and np.isfinite(samples[head]).all()
    # each head through its own sampler: the same noise gives three different sample sets
    assert not np.allclose(samples["u"], samples[third]) and not np.allclose(samples["u"], samples["v"])
    default = tmp_path / "default.npy"
    assert dumo("sample", run, "--nfe", 2, "-n", 50, "--out", default).returncode == 0
    np.testing.assert_array_equal(np.load(default), samples["u"])  # the config's sample.head
    result = dumo("sample", run, "--head", "w", "--nfe", 1, "--out", tmp_path / "w.npy")
    assert result.returncode != 0
    assert result.stderr.strip() == f"dumo: error: --head w: this model has no such head (its heads: v, u, {third})"


@pytest.mark.parametrize(
    ("path", "third"),
    [
        ("toy/moons-three-heads-meanflow.yaml", "m"),
        ("digits/three-heads-meanflow.yaml", "m"),
        ("toy/moons-three-heads-shortcut.yaml", "s"),
        ("digits/three-heads-shortcut.yaml", "s"),
    ],
)
def test_three_head_configs_build_the_three_heads(path, third):
    objective = MultiHeadObjective(load_config(CONFIGS / path).objective)
    assert objective.heads == ("v", "u", third) and objective.time_inputs == 2
    assert objective.head_samplers() == {"v": "euler", "u": "flow_map", third: "meanflow"}


def test_step_cost_is_counted_for_both_variants():
    from dumo.training.throughput import count_step_cost

    dumo_cost = count_step_cost(load_config(CONFIGS / "toy/moons-dumo.yaml"), (2,), 0).flops_per_image
    for name in ("moons-three-heads-meanflow.yaml", "moons-three-heads-shortcut.yaml"):
        cost = count_step_cost(load_config(CONFIGS / "toy" / name), (2,), 0).flops_per_image
        assert cost > dumo_cost  # a third head and its target passes on top of DuMo's step

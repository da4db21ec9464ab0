"""Shortcut models: the self-consistency target, the rows each batch draws, the clip, sampling with
d = 1/k, and a run through the command line."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MOONS, PointMassOracle, small_model

from dumo.conditioning import ClassLabels
from dumo.config import SampleConfig, config_from_dict
from dumo.data.batch import Batch
from dumo.errors import ConfigError
from dumo.files import load_checkpoint
from dumo.models.output import ModelOutput
from dumo.objectives import OBJECTIVES, build_objective
from dumo.objectives.shortcut import ShortcutConfig, ShortcutObjective, bootstrap_rows, shortcut_target
from dumo.runs.layout import list_checkpoints
from dumo.sampling import generate

CLASSES = 3


class LinearField(torch.nn.Module):
    """u(x, t, r) = a * x whatever the times; records every call's (x, t, r, labels)."""

    def __init__(self, a: float):
        super().__init__()
        self.a = a
        self.calls: list[tuple] = []

    def forward(self, x, t, r=None, cond=None):
        self.calls.append((x.clone(), t.clone(), None if r is None else r.clone(), cond))
        return ModelOutput(u=self.a * x)


def column(values):
    return torch.tensor(values, dtype=torch.float32)


# -- (1) the self-consistency target on analytic fields ------------------------------------------


def test_target_of_a_field_whose_two_half_steps_make_the_full_step_is_that_field():
    """Data at one point a: u = (x_t - a) / t is the average velocity over any interval, so both half
    steps read the same velocity and the target is it, exactly."""
    point = torch.tensor([0.7, -1.2])
    oracle = PointMassOracle(point)
    x_t = torch.randn(6, 2)
    t, d = column([1.0, 1.0, 0.5, 0.75, 0.25, 0.125]), column([1.0, 0.5, 0.5, 0.25, 0.125, 0.125])
    target = shortcut_target(oracle, x_t, t, d, clip=None)
    assert torch.allclose(target, (x_t - point) / t[:, None], atol=1e-6)
    assert torch.allclose(oracle.calls[1], t - d / 2)  # the second half step starts at t - d/2


def test_target_of_a_linear_field_is_the_average_of_the_two_half_steps():
    """u = a x: v1 = a x, x' = (1 - a d/2) x, v2 = a x', so the target is a x (1 - a d / 4)."""
    a = 1.5
    field = LinearField(a)
    x_t = torch.randn(5, 3)
    t, d = column([1.0, 0.5, 1.0, 0.75, 0.5]), column([1.0, 0.5, 0.5, 0.25, 0.25])
    labels = torch.arange(5) % CLASSES
    target = shortcut_target(field, x_t, t, d, labels, clip=None)
    expected = a * x_t * (1 - a * d[:, None] / 4)
    assert torch.allclose(target, expected, atol=1e-6)
    assert not torch.allclose(target, a * x_t, atol=1e-3)  # not the first half step alone
    (x1, t1, r1, l1), (x2, t2, r2, l2) = field.calls
    assert torch.equal(x1, x_t) and torch.equal(t1, t) and torch.allclose(t1 - r1, d / 2)
    assert torch.allclose(x2, x_t * (1 - a * d[:, None] / 2)) and torch.allclose(t2, t - d / 2)
    assert torch.allclose(t2 - r2, d / 2) and torch.equal(l1, labels) and torch.equal(l2, labels)


class LabelShiftField(torch.nn.Module):
    """u(x, t, r, c) = a x + b(c), b(c) = c + 1 for a real class and 0 for the null class (index
    ``CLASSES``); records the (rows, labels) of every call."""

    def __init__(self, a: float):
        super().__init__()
        self.a = a
        self.calls: list[tuple[int, torch.Tensor]] = []

    def forward(self, x, t, r=None, cond=None):
        self.calls.append((x.shape[0], cond.clone()))
        shift = torch.where(cond == CLASSES, 0.0, cond.float() + 1)
        return ModelOutput(u=self.a * x + shift[:, None])


def test_guided_target_of_a_label_shifted_linear_field_by_hand():
    """u = a x + b: the guided velocity is a x + w b (null: a x), so with h = d/2
    v1 = a x + w b,  x' = x - h v1,  v2 = a x' + w b = (a x + w b)(1 - a h),
    target = (v1 + v2) / 2 = (a x + w b)(1 - a d / 4); unguided rows: (a x + b)(1 - a d / 4)."""
    from dumo.objectives.shortcut import Guidance

    a, w = 0.6, 1.5
    field = LabelShiftField(a)
    x_t = torch.randn(4, 3)
    t, d = column([0.5, 1.0, 0.75, 1.0]), column([0.25, 0.25, 0.5, 1.0])
    labels = torch.tensor([0, 2, 1, 0])
    b = (labels.float() + 1)[:, None]
    guidance = Guidance(torch.arange(3), torch.tensor([True, True, False]), w, ClassLabels(CLASSES))
    target = shortcut_target(field, x_t, t, d, labels, clip=None, guidance=guidance)
    guided = (a * x_t + w * b) * (1 - a * d[:, None] / 4)
    plain = (a * x_t + b) * (1 - a * d[:, None] / 4)
    expected = torch.where(torch.tensor([True, True, False, False])[:, None], guided, plain)
    assert torch.allclose(target, expected, atol=1e-6)
    assert not torch.allclose(guided[:2], plain[:2], atol=1e-2)
    # one call per half step: the 4 conditional rows and the 3 candidates' null-class rows together
    assert [rows for rows, _ in field.calls] == [7, 7]
    assert torch.equal(field.calls[0][1], torch.tensor([0, 2, 1, 0, CLASSES, CLASSES, CLASSES]))
    unguided = shortcut_target(LabelShiftField(a), x_t, t, d, labels, clip=None)
    assert torch.allclose(unguided, plain, atol=1e-6)


def test_bootstrap_cfg_guides_the_smallest_level_of_the_loss_and_nothing_else():
    """M = 8, 16 rows, 2 self-consistency rows per level: the first two (d = 2/M) get the guided target,
    the next four the plain one, the rest z - x; and the same from a model with no labels (no effect)."""
    a, w = -0.7, 2.0
    objective = ShortcutObjective(ShortcutConfig(max_steps=8, target_clip=None, bootstrap_cfg=w), num_classes=CLASSES)
    torch.manual_seed(0)
    n, count = 48, 6
    t, d = objective.sample_times(n, "cpu")
    assert d[:count].tolist() == [0.25, 0.25, 0.5, 0.5, 1.0, 1.0]
    x, z, labels = torch.randn(n, 2), torch.randn(n, 2), torch.arange(n) % CLASSES
    field = LabelShiftField(a)
    out = objective.loss(LinearField(0.1), x, z, t, d, labels, target_model=field, bootstrap=count)
    x_t = t[:, None] * z + (1 - t[:, None]) * x
    b = (labels.float() + 1)[:, None]
    scale = torch.tensor([w, w, 1, 1, 1, 1])[:, None]
    expected = (a * x_t[:count] + scale * b[:count]) * (1 - a * d[:count, None] / 4)
    assert torch.allclose(out.targets["u"][:count], expected, atol=1e-5)
    assert torch.allclose(out.targets["u"][count:], (z - x)[count:], atol=1e-6)
    assert [rows for rows, _ in field.calls] == [count + 2, count + 2]  # the guided block's null rows only
    # rows found from d (no count): the same targets
    again = objective.loss(LinearField(0.1), x, z, t, d, labels, target_model=LabelShiftField(a))
    assert torch.allclose(again.targets["u"], out.targets["u"], atol=1e-6)
    off = ShortcutObjective(ShortcutConfig(max_steps=8, target_clip=None), num_classes=CLASSES)
    plain = off.loss(LinearField(0.1), x, z, t, d, labels, target_model=LabelShiftField(a), bootstrap=count)
    assert torch.allclose(plain.targets["u"][2:], out.targets["u"][2:], atol=1e-6)
    assert not torch.allclose(plain.targets["u"][:2], out.targets["u"][:2], atol=1e-2)


def test_bootstrap_cfg_with_fewer_rows_than_levels_guides_the_rows_drawn_at_the_smallest_level():
    objective = ShortcutObjective(ShortcutConfig(max_steps=8, target_clip=None, bootstrap_cfg=3.0), num_classes=CLASSES)
    x, z, labels = torch.randn(4, 2), torch.randn(4, 2), torch.tensor([1, 2, 0, 1])
    t, d = column([0.5, 1.0, 0.375, 0.125]), column([0.25, 1.0, 0.125, 0.125])  # 2 rows: d = 2/M and d = 1
    out = objective.loss(LinearField(0.1), x, z, t, d, labels, target_model=LabelShiftField(0.5), bootstrap=2)
    x_t = t[:, None] * z + (1 - t[:, None]) * x
    b = (labels.float() + 1)[:, None]
    expected = (0.5 * x_t[:2] + torch.tensor([[3.0], [1.0]]) * b[:2]) * (1 - 0.5 * d[:2, None] / 4)
    assert torch.allclose(out.targets["u"][:2], expected, atol=1e-6)


def test_loss_puts_the_self_consistency_target_on_large_steps_and_z_minus_x_on_d_one_over_m():
    a = -0.8
    objective = ShortcutObjective(ShortcutConfig(max_steps=8, target_clip=None))
    model, target_network = LinearField(0.3), LinearField(a)
    x, z = torch.randn(4, 2), torch.randn(4, 2)
    t, d = column([0.5, 0.375, 1.0, 0.5]), column([0.5, 0.125, 1.0, 0.125])
    out = objective.loss(model, x, z, t, d, target_model=target_network)
    x_t = t[:, None] * z + (1 - t[:, None]) * x
    expected = z - x
    for row in (0, 2):  # d > 1/M: two half steps of theta^-
        expected[row] = a * x_t[row] * (1 - a * d[row] / 4)
    assert torch.allclose(out.targets["u"], expected, atol=1e-6)
    assert out.targets["bootstrap"].tolist() == [True, False, True, False]
    ((x_in, t_in, r_in, _),) = model.calls  # one pass with gradients, on every row, conditioned on d
    assert torch.allclose(x_in, x_t) and torch.equal(t_in, t) and torch.allclose(t_in - r_in, d)
    per_row = (0.3 * x_t - expected).square().mean(dim=1)
    assert out.loss.item() == pytest.approx(per_row.mean().item(), rel=1e-5)
    assert out.parts["loss_bootstrap"].item() == pytest.approx(per_row[[0, 2]].mean().item(), rel=1e-5)
    assert out.parts["loss_flow"].item() == pytest.approx(per_row[[1, 3]].mean().item(), rel=1e-5)


def test_online_target_defaults_to_the_model_itself_without_gradient():
    objective = ShortcutObjective(ShortcutConfig(max_steps=4, target_network="online"))
    model = small_model(heads=("u",), time_inputs=2)
    x, z = torch.randn(4, 2), torch.randn(4, 2)
    t, d = column([1.0, 0.5, 1.0, 0.75]), column([1.0, 0.5, 0.5, 0.25])  # M = 4: d = 1/4 is a flow-matching row
    out = objective.loss(model, x, z, t, d)
    x_t = t[:, None] * z + (1 - t[:, None]) * x
    expected = shortcut_target(model, x_t[:3], t[:3], d[:3], clip=4.0)
    assert torch.allclose(out.targets["u"][:3], expected, atol=1e-6) and not out.targets["u"].requires_grad
    assert torch.allclose(out.targets["u"][3], z[3] - x[3])
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# -- (2) the rows each batch draws ---------------------------------------------------------------


def original_layout(count, levels):
    """The original's steps for ``count`` self-consistency rows (kvfrans/shortcut-models, get_targets
    with bootstrap_dt_bias 0), restated: count // levels rows per level from the smallest step 2^-(levels-1)
    up to d = 1, then d = 1 for the rest."""
    per_level = count // levels
    steps = [2.0 ** -(levels - 1 - i) for i in range(levels) for _ in range(per_level)]
    return steps + [1.0] * (count - len(steps))


@pytest.mark.parametrize(
    ("n", "fraction", "max_steps", "count"),
    [(64, 0.125, 8, 8), (256, 0.125, 128, 32), (10, 0.3, 8, 3), (64, 0.125, 128, 8), (40, 0.25, 4, 10)],
)
def test_rows_grids_and_steps_are_laid_out_as_the_original(n, fraction, max_steps, count):
    objective = ShortcutObjective(ShortcutConfig(max_steps=max_steps, bootstrap_fraction=fraction))
    levels = int(np.log2(max_steps))
    assert bootstrap_rows(n, fraction) == count
    assert original_layout(8, 3) == [0.25, 0.25, 0.5, 0.5, 1, 1, 1, 1]  # the rule, by hand
    seen_times = set()
    for _ in range(200):
        t, d = objective.sample_times(n, "cpu")
        assert objective.is_bootstrap(d).tolist() == [True] * count + [False] * (n - count)
        assert torch.all(d[count:] == 1 / max_steps)  # flow-matching rows: the smallest step
        assert d[:count].tolist() == original_layout(count, levels)
        grid = t / d  # t on each row's own grid {d, 2d, ..., 1}
        assert torch.equal(grid, grid.round()) and torch.all((grid >= 1) & (t <= 1))
        seen_times |= {(dd, tt) for dd, tt in zip(d.tolist(), t.tolist())}
    if max_steps == 8:
        fine, half, quarter = ({(d, i * d) for i in range(1, int(1 / d) + 1)} for d in (1 / 8, 1 / 2, 1 / 4))
        assert fine | half | quarter | {(1.0, 1.0)} <= seen_times  # every point of every grid, 1 included


@pytest.mark.parametrize(("n", "count"), [(4, 1), (16, 2)])
def test_fewer_rows_than_levels_go_round_robin_so_every_level_is_trained(n, count):
    """The original gives every row d = 1 here; dumo spreads them over the levels (a documented deviation)."""
    objective = ShortcutObjective(ShortcutConfig(max_steps=8))
    seen = torch.zeros(3)
    for _ in range(200):
        _, d = objective.sample_times(n, "cpu")
        levels = torch.log2(1 / d[:count]).round().long()
        assert len(set(levels.tolist())) == count  # consecutive levels, no repeats
        seen += torch.bincount(levels, minlength=3)
    assert torch.all(seen > 0)


def test_leading_row_count_and_rows_found_from_d_give_the_same_loss():
    objective = ShortcutObjective(ShortcutConfig(max_steps=8))
    model, target_network = small_model(heads=("u",), time_inputs=2), LinearField(0.7)
    x, z = torch.randn(16, 2), torch.randn(16, 2)
    t, d = objective.sample_times(16, "cpu")
    by_count = objective.loss(model, x, z, t, d, target_model=target_network, bootstrap=2)
    from_d = objective.loss(model, x, z, t, d, target_model=target_network)
    assert torch.equal(by_count.targets["u"], from_d.targets["u"]) and torch.equal(by_count.loss, from_d.loss)
    assert by_count.targets["bootstrap"].sum() == 2


def test_zero_fraction_is_flow_matching_on_the_grid():
    objective = ShortcutObjective(ShortcutConfig(max_steps=4, bootstrap_fraction=0.0))
    t, d = objective.sample_times(32, "cpu")
    assert not objective.is_bootstrap(d).any() and torch.all(d == 0.25) and torch.equal(t * 4, (t * 4).round())


def test_labels_are_dropped_on_flow_matching_rows_only():
    objective = ShortcutObjective(ShortcutConfig(max_steps=8, label_dropout=1.0), num_classes=CLASSES)
    model = LinearField(0.5)
    labels = torch.arange(64) % CLASSES
    out = objective(model, Batch(x=torch.randn(64, 2), cond=labels), target_model=LinearField(0.1))
    bootstrap = out.targets["bootstrap"]
    trained_labels = model.calls[-1][3]
    assert bootstrap.sum() == 8
    assert torch.equal(trained_labels[bootstrap], labels[bootstrap])  # self-consistency rows keep theirs
    assert torch.all(trained_labels[~bootstrap] == CLASSES)  # all dropped at label_dropout 1


def test_labels_keep_their_dropout_rate_on_flow_matching_rows():
    objective = ShortcutObjective(ShortcutConfig(max_steps=8, label_dropout=0.5), num_classes=CLASSES)
    model = LinearField(0.5)
    labels = torch.zeros(4096, dtype=torch.long)
    out = objective(model, Batch(x=torch.randn(4096, 2), cond=labels), target_model=LinearField(0.1))
    trained_labels, bootstrap = model.calls[-1][3], out.targets["bootstrap"]
    assert torch.all(trained_labels[bootstrap] == 0)
    assert (trained_labels[~bootstrap] == CLASSES).float().mean().item() == pytest.approx(0.5, abs=0.03)


# -- (3) the clip --------------------------------------------------------------------------------


def test_clip_of_the_half_step_point_and_of_the_target():
    x_t, t, d = torch.tensor([[6.0]]), column([1.0]), column([1.0])
    # u = x / 2: v1 = 3, x' = 6 - 1.5 = 4.5, clipped to 4, so v2 = 2 (unclipped 2.25)
    assert shortcut_target(LinearField(0.5), x_t, t, d, clip=4.0).item() == pytest.approx(2.5)
    assert shortcut_target(LinearField(0.5), x_t, t, d, clip=None).item() == pytest.approx(2.625)
    # u = 2 x: v1 = 12, x' = 0, v2 = 0, target 6, clipped to 4
    assert shortcut_target(LinearField(2.0), x_t, t, d, clip=4.0).item() == pytest.approx(4.0)
    assert shortcut_target(LinearField(2.0), x_t, t, d, clip=None).item() == pytest.approx(6.0)
    assert shortcut_target(LinearField(-2.0), x_t, t, d, clip=4.0).item() == pytest.approx(-4.0)


def test_config_errors_are_one_line():
    for key, value, message in [
        ("max_steps", 96, "objective.max_steps must be a power of two"),
        ("max_steps", 1, "objective.max_steps must be a power of two"),
        ("bootstrap_fraction", 1.0, r"objective.bootstrap_fraction must be in \[0, 1\)"),
        ("target_clip", 0.0, "objective.target_clip must be > 0 or null"),
        ("target_network", "teacher", "objective.target_network"),
        ("bootstrap_cfg", -1.0, "objective.bootstrap_cfg must be >= 0 or null"),
    ]:
        with pytest.raises(ConfigError, match=message) as error:
            config_from_dict({"objective": {"name": "shortcut", key: value}})
        assert "\n" not in str(error.value)
    config = config_from_dict({"objective": {"name": "shortcut", "target_clip": None}})
    assert config.objective.target_clip is None and config.objective.target_network == "ema"
    objective = build_objective(config.objective)
    assert objective.target_network() == "ema" and objective.target_precision() == "bf16"
    assert OBJECTIVES["shortcut"] == (ShortcutConfig, ShortcutObjective)


#: the original's ImageNet recipe: kvfrans/shortcut-models train.py defaults with its README's DiT-XL
#: ImageNet command (batch 256, 810k steps, cfg_scale 1.5, bootstrap_cfg 1), in dumo's keys; its few-step
#: samples are scored without sampling-time guidance
ORIGINAL_IMAGENET = {
    "objective.max_steps": 128,
    "objective.bootstrap_fraction": 1 / 8,
    "objective.target_network": "ema",
    "objective.target_clip": 4.0,
    "objective.label_dropout": 0.1,
    "objective.bootstrap_cfg": 1.5,
    "train.ema_decay": 0.999,
    "train.ema_warmup": False,
    "data.batch_size": 256,
    "train.steps": 810_000,
    "optim.lr": 1e-4,
    "optim.betas": (0.9, 0.999),
    "optim.weight_decay": 0.1,
    "sample.guidance_scale": 1.0,
}


def test_imagenet_config_follows_the_original_recipe_or_its_header_names_each_difference():
    from dumo.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / "imagenet256" / "shortcut-xl2.yaml"
    config = load_config(path)
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    differences = []
    for key, original in ORIGINAL_IMAGENET.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        value = tuple(value) if isinstance(value, list) else value
        if value != original:
            differences.append(key)
            assert key in header, f"{key} is {value} here, {original} in the original, and the header does not say"
    assert set(differences) == {"data.batch_size", "train.steps", "optim.betas", "optim.weight_decay"}


# -- (5) sampling: k steps of size 1/k conditioned on d = 1/k -------------------------------------


class RecordingOracle(PointMassOracle):
    """The point-mass field that also records each call's (t, d = t - r)."""

    def __init__(self, point: torch.Tensor):
        super().__init__(point)
        self.steps: list[tuple[float, float]] = []

    def forward(self, x, t, r=None, cond=None):
        self.steps.append((t[0].item(), (t - r)[0].item()))
        return super().forward(x, t, r, cond)


@pytest.mark.parametrize("nfe", [1, 2, 4, 3])
def test_sampler_takes_k_steps_of_one_over_k_and_is_exact_where_euler_is(nfe):
    """The point-mass field is constant along its straight paths, so Euler with any step lands on a."""
    point = torch.tensor([0.4, -0.9])
    oracle = RecordingOracle(point)
    samples = generate(oracle, "shortcut", (16, 2), nfe, SampleConfig(), seed=2)
    assert torch.allclose(samples, point.expand(16, 2), atol=1e-5)
    assert [t for t, _ in oracle.steps] == pytest.approx([1 - i / nfe for i in range(nfe)])
    assert [d for _, d in oracle.steps] == pytest.approx([1 / nfe] * nfe, abs=1e-6)


def test_sampler_matches_the_euler_update_by_hand_and_guidance_mixes_the_heads():
    torch.manual_seed(3)
    model = small_model(heads=("u",), num_classes=CLASSES, time_inputs=2)
    labels = torch.arange(8) % CLASSES
    noise = torch.randn((8, 2), generator=torch.Generator().manual_seed(4))
    w = 2.5
    guided = generate(model, "shortcut", (8, 2), 2, SampleConfig(guidance_scale=w), seed=4, labels=labels)
    null = torch.full_like(labels, CLASSES)
    x = noise
    for t in (1.0, 0.5):  # two steps of d = 1/2
        tt, rr = torch.full((8,), t), torch.full((8,), t - 0.5)
        cond, uncond = model(x, tt, r=rr, cond=labels).u, model(x, tt, r=rr, cond=null).u
        x = x - 0.5 * (uncond + w * (cond - uncond))
    assert torch.allclose(guided, x, atol=1e-5)
    plain = generate(model, "shortcut", (8, 2), 2, SampleConfig(), seed=4, labels=labels)
    assert not torch.allclose(plain, guided, atol=1e-3)


# -- (4) a tiny run through the command line -----------------------------------------------------


def test_train_and_sample_through_the_cli(tmp_path, capsys):
    from dumo.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "toy" / "moons-shortcut.yaml"
    run = tmp_path / "run"
    overrides = [item for o in [*TINY_MOONS, "train.steps=4", "train.checkpoint_every=4"] for item in ("--set", o)]
    assert main(["train", str(config), "--out", str(run), *overrides]) == 0
    assert "finished at step 4" in capsys.readouterr().out
    header = (run / "train_log.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["step", "loss", "loss_flow", "loss_bootstrap"]
    points = {}
    for nfe in (1, 2, 4):
        out = tmp_path / f"nfe{nfe}.npy"
        assert main(["sample", str(run), "--nfe", str(nfe), "--num", "64", "--seed", "1", "--out", str(out)]) == 0
        points[nfe] = np.load(out)
        assert points[nfe].shape == (64, 2) and np.isfinite(points[nfe]).all()
    assert not np.allclose(points[1], points[4])  # d = 1 and d = 1/4 are different steps


def test_fsdp_on_two_ranks_matches_one_process_with_the_ema_target(tmp_path):
    """Two gloo ranks under FSDP2 run the same target passes (the row count depends on the batch size
    only) and update the EMA that served as theta^-; 6 steps equal one process with 2 accumulation shards."""
    root = Path(__file__).resolve().parents[1]
    path = root / "configs" / "toy" / "moons-shortcut.yaml"
    tiny = [
        "model.hidden_dim=32",
        "model.depth=2",
        "data.batch_size=32",
        "train.steps=6",
        "train.progress=false",
        "train.eval_samples=50",
        "train.checkpoint_every=0",
        "optim.lr=0.001",
    ]
    runs = {}
    for name, launcher, extra in [
        ("fsdp", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], ["train.parallel=fsdp"]),
        ("one", [], ["train.grad_accumulation=2"]),
    ]:
        overrides = [item for o in [*tiny, *extra] for item in ("--set", o)]
        command = [sys.executable, *launcher, "-m", "dumo", "train", str(path), "--out", str(tmp_path / name)]
        result = subprocess.run([*command, *overrides], capture_output=True, text=True, cwd=root, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        tensors, metadata = load_checkpoint(list_checkpoints(tmp_path / name)[-1])
        assert metadata["step"] == "6"
        runs[name] = {k: v.float() for k, v in tensors.items() if k.startswith(("model.", "ema.", "optimizer."))}
    assert runs["fsdp"].keys() == runs["one"].keys()
    worst = max((runs["fsdp"][k] - runs["one"][k]).abs().max().item() for k in runs["one"])
    assert worst < 1e-5, worst  # float32 reduction order only

"""Starting from a pretrained flow model: weight mapping, teacher networks, the derivative direction
under guidance, and classifier-free guidance at sampling time."""

from pathlib import Path

import pytest
import torch
from conftest import small_model
from safetensors.torch import save_file

from dumo.config import SampleConfig, config_from_dict
from dumo.data.batch import Batch
from dumo.errors import CheckpointError, ConfigError
from dumo.files import load_checkpoint
from dumo.objectives import DuMoConfig, DuMoObjective, MeanFlowConfig, MeanFlowObjective, TimeConfig
from dumo.runs.layout import list_checkpoints
from dumo.runs.loading import export_run
from dumo.samplers import GuidedModel
from dumo.sampling import generate
from dumo.training import Trainer
from dumo.training.initialise import fit_weights, initial_weights

CLASSES = 3
MIDDLE = TimeConfig(distribution="beta", theta1=20.0, theta2=20.0)


def labelled(n=64, dim=2, seed=5):
    generator = torch.Generator().manual_seed(seed)
    return Batch(x=torch.randn(n, dim, generator=generator), cond=torch.randint(0, CLASSES, (n,), generator=generator))


def points(n=32, dim=2):
    return torch.randn(n, dim), torch.rand(n) * 0.9 + 0.05


# -- fitting weights of one objective's network to another's ----------------------------------


def test_flow_matching_to_dumo_copies_the_v_head_into_the_u_head():
    teacher = small_model(heads=("v",), num_classes=CLASSES)
    student = small_model(heads=("v", "u"), num_classes=CLASSES)
    weights = fit_weights(teacher.state_dict(), student, "copy_v")
    student.load_state_dict(weights.state)
    x, t = points()
    labels = torch.randint(0, CLASSES, (32,))
    out, expected = student(x, t, cond=labels), teacher(x, t, cond=labels).v
    assert torch.equal(out.v, expected) and torch.equal(out.u, expected)
    assert "u-head copied from the v-head" in weights.summary()


def test_flow_matching_to_dumo_with_a_zero_u_head():
    teacher = small_model(heads=("v",))
    student = build_fresh(("v", "u"))
    weights = fit_weights(teacher.state_dict(), student, "zero")
    student.load_state_dict(weights.state)
    x, t = points()
    out = student(x, t)
    assert torch.equal(out.v, teacher(x, t).v)
    assert torch.count_nonzero(out.u) == 0


def build_fresh(heads, time_inputs=1):
    from dumo.models import ModelConfig, build_model

    return build_model(ModelConfig(hidden_dim=32, depth=2), (2,), heads, 0, time_inputs)


def test_flow_matching_to_meanflow_gives_the_teacher_velocity_for_every_r():
    teacher = small_model(heads=("v",), num_classes=CLASSES)
    student = small_model(heads=("u",), num_classes=CLASSES, time_inputs=2)  # random interval weights
    student.load_state_dict(fit_weights(teacher.state_dict(), student).state)
    x, t = points()
    labels = torch.randint(0, CLASSES, (32,))
    for r in (torch.zeros(32), t * torch.rand(32), t):
        assert torch.allclose(student(x, t, r=r, cond=labels).u, teacher(x, t, cond=labels).v, atol=1e-6)


def test_same_architecture_is_copied_exactly():
    source, target = small_model(), build_fresh(("v", "u"))
    target.load_state_dict(fit_weights(source.state_dict(), target).state)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


def test_dumo_to_flow_matching_drops_the_u_head_and_says_so():
    weights = fit_weights(small_model().state_dict(), build_fresh(("v",)))
    assert weights.dropped == ["head u"]


def tiny_dit(heads, head_blocks=0, seed=0):
    from dumo.models import ModelConfig, build_model

    torch.manual_seed(seed)
    config = ModelConfig(name="DiT-XS/4", hidden_dim=32, depth=3, num_heads=2, head_blocks=head_blocks)
    model = build_model(config, (1, 8, 8), heads, CLASSES)
    with torch.no_grad():  # away from the zero initialisation, so every tensor matters
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("head_blocks", [1, 3])
def test_a_shared_trunk_maps_onto_heads_with_their_own_blocks(head_blocks):
    """model.head_blocks k: the teacher's last k blocks become each head's own, so both heads of the
    student compute the teacher's velocity at step 0; the trunk keeps the first 3 - k blocks."""
    teacher, student = tiny_dit(("v",)), tiny_dit(("v", "u"), head_blocks, seed=1)
    weights = fit_weights(teacher.state_dict(), student, "copy_v")
    student.load_state_dict(weights.state)
    assert len(student.backbone.blocks) == 3 - head_blocks and len(student.heads["u"].blocks) == head_blocks
    last_block = teacher.state_dict()["backbone.blocks.2.attn.qkv.weight"]
    for head in ("v", "u"):
        assert torch.equal(student.state_dict()[f"heads.{head}.blocks.{head_blocks - 1}.attn.qkv.weight"], last_block)
    x, t, labels = torch.randn(4, 1, 8, 8), torch.rand(4), torch.arange(4) % CLASSES
    expected, out = teacher(x, t, cond=labels).v, student(x, t, cond=labels)
    assert torch.allclose(out.v, expected, atol=1e-6) and torch.allclose(out.u, expected, atol=1e-6)
    # the heads' blocks are separate parameters: training one head leaves the other's path alone
    assert student.heads["v"].blocks[0].mlp[0].weight is not student.heads["u"].blocks[0].mlp[0].weight
    # continuation of a model with its own head blocks copies every tensor
    again = tiny_dit(("v", "u"), head_blocks, seed=2)
    again.load_state_dict(fit_weights(student.state_dict(), again).state)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), again.state_dict().values()))


def test_head_blocks_are_checked():
    from dumo.models import ModelConfig

    with pytest.raises(ConfigError, match=r"model.head_blocks must be in \[0, depth = 4\]; got 5"):
        ModelConfig(name="DiT-XS/4", head_blocks=5).validate("model")
    with pytest.raises(ConfigError, match="model.head_blocks applies to DiT models only"):
        ModelConfig(name="mlp", head_blocks=1).validate("model")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("backbone.input.weight"), "has no tensor backbone.input.weight"),
        (lambda s: s.update({"backbone.input.weight": torch.zeros(7, 7)}), "shape of backbone.input.weight is (7, 7)"),
        (lambda s: s.update({"backbone.extra": torch.zeros(1)}), "has tensor backbone.extra, which this model"),
    ],
)
def test_mismatches_name_the_first_tensor(change, message):
    state = dict(small_model(heads=("v",)).state_dict())
    assert "backbone.input.weight" in state
    change(state)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fit_weights(state, build_fresh(("v", "u")))


def test_sources_run_export_and_files(tmp_path):
    run = tmp_path / "run"
    Trainer(tiny_toy("fm", steps=2), run).run()
    ema = {k[4:]: v for k, v in load_checkpoint(list_checkpoints(run)[-1])[0].items() if k.startswith("ema.")}
    export_run(run, tmp_path / "export")
    plain = tmp_path / "plain.safetensors"
    save_file(ema, str(plain))
    for source in (run, tmp_path / "export", list_checkpoints(run)[-1], plain):
        state = initial_weights(source, toy_model(("v", "u"))).state
        assert torch.equal(state["heads.v.linear.weight"], ema["heads.v.linear.weight"]), source
    torch.save(ema, tmp_path / "weights.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    cases = {
        tmp_path / "weights.pt": "dumo import-weights",
        tmp_path / "junk.safetensors": "not a readable safetensors file",
        tmp_path / "nothing": "not found",
        tmp_path: "not a dumo run or export directory",
    }
    for path, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            initial_weights(path, toy_model(("v", "u")))


def toy_model(heads):
    from dumo.models import ModelConfig, build_model

    return build_model(ModelConfig(hidden_dim=16, depth=1), (2,), heads)


def tiny_toy(name, steps, **extra):
    raw = {
        "data": {"name": "moons", "batch_size": 32},
        "model": {"name": "mlp", "hidden_dim": 16, "depth": 1},
        "objective": {"name": name},
        "train": {"steps": steps, "progress": False, "eval_samples": 100, "checkpoint_every": 2, "log_every": 1},
    }
    for key, value in extra.items():
        section, name_ = key.split("__")
        raw.setdefault(section, {})[name_] = value
    return config_from_dict(raw)


# -- training from a teacher ---------------------------------------------------------------------


def test_a_run_starts_from_the_teacher_and_resumes_exactly(tmp_path):
    teacher_run = tmp_path / "teacher"
    Trainer(tiny_toy("fm", steps=4), teacher_run).run()
    teacher_ema = initial_weights(teacher_run, toy_model(("v",))).state

    start = Trainer(tiny_toy("dumo", steps=0, train__init_from=str(teacher_run)), tmp_path / "zero")
    start.run()
    for module in (start.model, start.ema.model):
        state = module.state_dict()
        assert torch.equal(state["heads.v.linear.weight"], teacher_ema["heads.v.linear.weight"])
        assert torch.equal(state["heads.u.linear.weight"], teacher_ema["heads.v.linear.weight"])

    extra = {"train__init_from": str(teacher_run), "objective__target_network": "teacher"}
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    Trainer(tiny_toy("dumo", steps=4, **extra), straight).run()
    Trainer(tiny_toy("dumo", steps=2, **extra), stopped).run()
    # The teacher is kept in the run folder: the resumed run no longer needs init_from's path.
    teacher_run.rename(tmp_path / "teacher-moved")
    Trainer(tiny_toy("dumo", steps=4, **extra), stopped).run()
    a, b = (load_checkpoint(list_checkpoints(run)[-1])[0] for run in (straight, stopped))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (stopped / "teacher.safetensors").is_file()


def test_a_source_with_another_time_scale_is_refused(tmp_path):
    teacher_run = tmp_path / "teacher"
    Trainer(tiny_toy("fm", steps=2, model__time_embedding_scale=1.0), teacher_run).run()
    with pytest.raises(CheckpointError, match="model.time_embedding_scale=1.0, this config has 100.0"):
        Trainer(tiny_toy("dumo", steps=2, train__init_from=str(teacher_run)), tmp_path / "student").run()
    Trainer(
        tiny_toy("dumo", steps=2, train__init_from=str(teacher_run), model__time_embedding_scale=1.0), tmp_path / "ok"
    ).run()


def test_the_source_checkpoints_own_config_counts_over_an_edited_config_yaml(tmp_path):
    teacher_run = tmp_path / "teacher"
    Trainer(tiny_toy("fm", steps=2, model__time_embedding_scale=1.0), teacher_run).run()
    edited = (
        (teacher_run / "config.yaml").read_text().replace("time_embedding_scale: 1.0", "time_embedding_scale: 100.0")
    )
    (teacher_run / "config.yaml").write_text(edited)  # now claims this config's scale; the weights were not
    with pytest.raises(CheckpointError, match="model.time_embedding_scale=1.0, this config has 100.0"):
        Trainer(tiny_toy("dumo", steps=2, train__init_from=str(teacher_run)), tmp_path / "student").run()


@pytest.mark.parametrize("key", ["target_network", "u_velocity"])
def test_teacher_networks_need_init_from(tmp_path, key):
    with pytest.raises(ConfigError, match=f"objective.{key}=teacher needs train.init_from"):
        Trainer(tiny_toy("dumo", steps=1, **{f"objective__{key}": "teacher"}), tmp_path / "run")


# -- the objectives with a teacher and with the guided direction -------------------------------


def guided_config(**kwargs):
    return DuMoConfig(zeta=0.5, label_dropout=0.25, time=MIDDLE, **kwargs)


def draws(batch, seed=0):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch.x.shape, generator=generator)
    t = torch.rand(batch.x.shape[0], generator=generator) * 0.8 + 0.1
    kept = torch.rand(batch.x.shape[0], generator=generator) >= 0.25
    labels = torch.where(kept, batch.cond, torch.full_like(batch.cond, CLASSES))
    return z, t, labels, kept


def test_without_guidance_both_directions_agree():
    model, batch = small_model(num_classes=CLASSES), labelled()
    z, t, labels, kept = draws(batch)
    targets = [
        DuMoObjective(DuMoConfig(derivative_direction=d), CLASSES).loss(model, batch.x, z, t, labels, kept).targets
        for d in ("conditional", "guided")
    ]
    assert torch.equal(targets[0]["du_dt"], targets[1]["du_dt"])


@pytest.mark.parametrize("derivative, tolerance", [("jvp", 1e-5), ("finite_difference", 5e-2)])
def test_guided_direction_differentiates_along_the_guided_velocity(derivative, tolerance):
    model, batch = small_model(num_classes=CLASSES), labelled()
    z, t, labels, kept = draws(batch)
    # e = 0.005: the finite difference's tolerance is its accuracy at the paper's narrow stencil
    objective = DuMoObjective(
        guided_config(derivative=derivative, derivative_direction="guided", epsilon=0.005), CLASSES
    )
    out = objective.loss(model, batch.x, z, t, labels, kept)
    # Independent: the guided velocity from its formula, then an exact JVP along it.
    x_t = t[:, None] * z + (1 - t[:, None]) * batch.x
    with torch.no_grad():
        conditional = model(x_t, t, cond=labels).v
        unconditional = model(x_t, t, cond=torch.full_like(labels, CLASSES)).v
        v_guided = (z - batch.x) + 0.5 * kept.float()[:, None] * (conditional - unconditional)
        _, expected = torch.func.jvp(
            lambda x_in, t_in: model(x_in, t_in, cond=labels).u, (x_t, t), (v_guided, torch.ones_like(t))
        )
    assert torch.allclose(out.targets["v"], v_guided, atol=1e-6)
    error = ((out.targets["du_dt"] - expected).norm() / expected.norm()).item()
    assert error < tolerance, error
    conditional_direction = DuMoObjective(guided_config(derivative=derivative, epsilon=0.005), CLASSES).loss(
        model, batch.x, z, t, labels, kept
    )
    assert not torch.allclose(conditional_direction.targets["du_dt"], out.targets["du_dt"], atol=1e-3)


@pytest.mark.parametrize("zeta", [0.0, 0.5])
@pytest.mark.parametrize("derivative, tolerance", [("jvp", 1e-5), ("finite_difference", 5e-2)])
def test_v_head_direction_differentiates_along_the_networks_own_velocity(zeta, derivative, tolerance):
    model, batch = small_model(num_classes=CLASSES), labelled()
    z, t, labels, kept = draws(batch)
    config = DuMoConfig(zeta=zeta, time=MIDDLE, derivative=derivative, derivative_direction="v_head", epsilon=0.005)
    out = DuMoObjective(config, CLASSES).loss(model, batch.x, z, t, labels, kept)
    x_t = t[:, None] * z + (1 - t[:, None]) * batch.x
    with torch.no_grad():
        conditional = model(x_t, t, cond=labels).v
        unconditional = model(x_t, t, cond=torch.full_like(labels, CLASSES)).v
        direction = conditional + zeta * kept.float()[:, None] * (conditional - unconditional)
        _, expected = torch.func.jvp(
            lambda x_in, t_in: model(x_in, t_in, cond=labels).u, (x_t, t), (direction, torch.ones_like(t))
        )
    error = ((out.targets["du_dt"] - expected).norm() / expected.norm()).item()
    assert error < tolerance, error
    # The velocity target itself is unchanged by the choice of direction.
    expected_v = (z - batch.x) + zeta * kept.float()[:, None] * (conditional - unconditional)
    assert torch.allclose(out.targets["v"], expected_v, atol=1e-6)


def scaled_copy(model, factor):
    other = small_model(num_classes=CLASSES)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(factor)
    return other


def test_teacher_guidance_takes_the_unconditional_term_from_the_teacher():
    model, batch = small_model(num_classes=CLASSES), labelled()
    teacher = scaled_copy(model, 1.3)
    z, t, labels, kept = draws(batch)
    objective = DuMoObjective(guided_config(guidance_network="teacher"), CLASSES)
    out = objective.loss(model, batch.x, z, t, labels, kept, teacher_model=teacher)
    x_t = t[:, None] * z + (1 - t[:, None]) * batch.x
    with torch.no_grad():
        conditional = model(x_t, t, cond=labels).v
        unconditional = teacher(x_t, t, cond=torch.full_like(labels, CLASSES)).v
    expected = (z - batch.x) + 0.5 * kept.float()[:, None] * (conditional - unconditional)
    assert torch.allclose(out.targets["v"], expected, atol=1e-6)
    # du/dt still comes from theta^- (the online model), not from the teacher.
    own = DuMoObjective(guided_config(), CLASSES).loss(model, batch.x, z, t, labels, kept)
    assert torch.allclose(out.targets["du_dt"], own.targets["du_dt"])


def test_teacher_as_target_network_gives_the_teachers_derivative():
    model, batch = small_model(num_classes=CLASSES), labelled()
    teacher = scaled_copy(model, 1.3)
    z, t, labels, kept = draws(batch)
    config = DuMoConfig(time=MIDDLE, target_network="teacher")
    with_teacher = DuMoObjective(config, CLASSES).loss(model, batch.x, z, t, labels, kept, teacher_model=teacher)
    direct = DuMoObjective(DuMoConfig(time=MIDDLE), CLASSES).loss(teacher, batch.x, z, t, labels, kept)
    assert torch.allclose(with_teacher.targets["du_dt"], direct.targets["du_dt"])
    with pytest.raises(ValueError, match="frozen teacher"):
        DuMoObjective(config, CLASSES).loss(model, batch.x, z, t, labels, kept)


def test_meanflow_teacher_guidance():
    model = small_model(heads=("u",), num_classes=CLASSES, time_inputs=2)
    teacher = small_model(heads=("u",), num_classes=CLASSES, time_inputs=2)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(0.7)
    batch = labelled()
    z, t, labels, kept = draws(batch)
    r = t * 0.5
    config = MeanFlowConfig(zeta=0.5, derivative="finite_difference", guidance_network="teacher")
    out = MeanFlowObjective(config, CLASSES).loss(model, batch.x, z, t, r, labels, kept, teacher_model=teacher)
    x_t = t[:, None] * z + (1 - t[:, None]) * batch.x
    with torch.no_grad():
        conditional = model(x_t, t, r=t, cond=labels).u
        unconditional = teacher(x_t, t, r=t, cond=torch.full_like(labels, CLASSES)).u
    expected = (z - batch.x) + 0.5 * kept.float()[:, None] * (conditional - unconditional)
    assert torch.allclose(out.targets["v"], expected, atol=1e-6)


# -- guidance at sampling time -------------------------------------------------------------------


def test_guided_model_combines_conditional_and_unconditional_passes():
    model = small_model(num_classes=CLASSES)
    x, t = points()
    labels = torch.randint(0, CLASSES, (32,))
    labels[:4] = CLASSES  # already unconditional rows stay as they are
    null = torch.full_like(labels, CLASSES)
    conditional, unconditional = model(x, t, cond=labels), model(x, t, cond=null)
    guided = GuidedModel(model, 2.5)(x, t, cond=labels)
    for head in ("v", "u"):
        expected = getattr(unconditional, head) + 2.5 * (getattr(conditional, head) - getattr(unconditional, head))
        assert torch.allclose(getattr(guided, head), expected, atol=1e-6)
        assert torch.allclose(getattr(guided, head)[:4], getattr(conditional, head)[:4], atol=1e-6)
    plain = GuidedModel(model, 1.0)(x, t, cond=labels)
    assert torch.allclose(plain.u, conditional.u, atol=1e-6)


def test_sampling_guidance_scale_changes_samples_and_one_is_off():
    model = small_model(num_classes=CLASSES)
    labels = torch.arange(12) % CLASSES
    base = generate(model, "dumo", (12, 2), 2, SampleConfig(), labels=labels)
    same = generate(model, "dumo", (12, 2), 2, SampleConfig(guidance_scale=1.0), labels=labels)
    guided = generate(model, "dumo", (12, 2), 2, SampleConfig(guidance_scale=3.0), labels=labels)
    assert torch.equal(base, same) and not torch.allclose(base, guided)


def test_cli_guidance_flag(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    Trainer(tiny_toy("dumo", steps=2), run).run()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dumo",
            "sample",
            str(run),
            "-n",
            "4",
            "--nfe",
            "1",
            "--guidance",
            "2",
            "--out",
            str(tmp_path / "x.npy"),
        ],
        capture_output=True,
        text=True,
    )
    expected = "dumo: error: --guidance needs a conditional model (class labels or prompts)"
    assert result.returncode == 2 and result.stderr.strip() == expected
    assert Path(run).is_dir()

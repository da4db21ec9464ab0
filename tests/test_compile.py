"""train.compile (whole network or regional, per transformer block) and
train.activation_checkpointing: the same losses, gradients and resumed runs as eager training.

The fast tests compile with the aot_eager backend (dynamo's graphs and AOTAutograd, no code
generation: seconds instead of minutes on a busy CPU); the inductor check is marked slow.
"""

import pytest
import torch
from test_images import TINY_DIGITS

from dumo.config import config_from_dict
from dumo.data.batch import Batch
from dumo.errors import ConfigError
from dumo.files import load_checkpoint
from dumo.models import ModelConfig, build_model, set_activation_checkpointing
from dumo.objectives import DuMoConfig, DuMoObjective
from dumo.runs.layout import list_checkpoints
from dumo.training import Trainer, compiling

OBJECTIVES = {
    "fm": {"name": "fm"},
    "meanflow-fd": {"name": "meanflow", "derivative": "finite_difference", "zeta": 0.5, "rho": 0.5},
    "dumo": {"name": "dumo", "zeta": 0.5},
    "meanflow-jvp": {"name": "meanflow", "derivative": "jvp", "rho": 0.5},
}


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    monkeypatch.setattr(compiling, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def config(objective="dumo", steps=3, **train):
    cfg = {
        **TINY_DIGITS,
        "model": {**TINY_DIGITS["model"], "depth": 2},
        "objective": OBJECTIVES[objective],
        "train": {**TINY_DIGITS["train"], "steps": steps, "checkpoint_every": 0, **train},
    }
    return config_from_dict(cfg)


def one_step(cfg, run_dir):
    """The logged loss and the gradients of one training step (the gradients before the update)."""
    trainer = Trainer(cfg, run_dir)
    torch.manual_seed(0)
    logged = trainer.train_step()
    return logged, [p.grad.clone() for p in trainer.model.parameters()], trainer


def assert_same_step(reference, other, tolerance=1e-5):
    (logged_a, grads_a, _), (logged_b, grads_b, _) = reference, other
    assert logged_b["loss"] == pytest.approx(logged_a["loss"], rel=tolerance)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("objective", ["fm", "meanflow-fd", "dumo"])
@pytest.mark.parametrize("mode", [True, "blocks"])
def test_compiled_step_matches_eager(tmp_path, objective, mode):
    eager = one_step(config(objective), tmp_path / "eager")
    compiled = one_step(config(objective, compile=mode), tmp_path / "compiled")
    assert_same_step(eager, compiled)
    trainer = compiled[2]
    assert (trainer.step_model is not trainer.model) == (mode is True)
    # the plain module keeps its state-dict names: checkpoints never see the compiled wrapper
    assert not any(name.startswith("_orig_mod") for name in trainer.model.state_dict())


def test_ema_target_passes_are_compiled_too(tmp_path):
    cfg = config("dumo", compile=True)
    cfg.objective.target_network = "ema"
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.target_model is not trainer.ema.model
    assert trainer.target_model._orig_mod is trainer.ema.model


def test_finite_difference_step_has_no_graph_break_and_no_recompilation():
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="DiT-S/2", hidden_dim=32, depth=2, num_heads=2), (1, 8, 8), ("v", "u"), 3)
    # fullgraph: any graph break in the gradient pass or the batched no-grad target pass raises
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    objective = DuMoObjective(DuMoConfig(zeta=0.5), num_classes=3)
    batch = Batch(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0]))
    objective(compiled, batch).loss.backward()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for _ in range(2):
        objective(compiled, batch).loss.backward()
    assert graphs == 2  # the gradient pass and the batched no-grad pass (another grad mode and batch)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # later steps reuse them
    explained = torch._dynamo.explain(model)(torch.randn(12, 1, 8, 8), torch.rand(12), cond=torch.arange(12) % 3)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_compiled_run_resumes_exactly(tmp_path):
    straight = Trainer(config("dumo", steps=4, compile=True), tmp_path / "straight")
    straight.run()
    Trainer(config("dumo", steps=2, compile=True), tmp_path / "split").run()
    Trainer(config("dumo", steps=4, compile=True), tmp_path / "split").run()  # resumes at step 2
    a, meta_a = load_checkpoint(list_checkpoints(tmp_path / "straight")[-1])
    b, meta_b = load_checkpoint(list_checkpoints(tmp_path / "split")[-1])
    assert meta_a["step"] == meta_b["step"] == "4"
    assert a.keys() == b.keys() and not any("_orig_mod" in key for key in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def test_regional_compile_and_checkpointing_need_transformer_blocks(tmp_path):
    mlp = {"data": {"name": "moons", "batch_size": 8}, "model": {"name": "mlp"}, "train": {"progress": False}}
    with pytest.raises(ConfigError, match="train.compile=blocks .* has none: use train.compile=true"):
        Trainer(config_from_dict({**mlp, "train": {**mlp["train"], "compile": "blocks"}}), tmp_path / "a")
    with pytest.raises(ConfigError, match="train.activation_checkpointing .* has none"):
        Trainer(config_from_dict({**mlp, "train": {**mlp["train"], "activation_checkpointing": True}}), tmp_path / "b")
    with pytest.raises(ConfigError, match="train.compile"):
        config_from_dict({"train": {"compile": "everything"}})


@pytest.mark.parametrize("objective", ["dumo", "meanflow-jvp"])
def test_activation_checkpointing_gives_the_same_gradients_and_saves_less(tmp_path, objective):
    eager = one_step(config(objective), tmp_path / "eager")
    checkpointed = one_step(config(objective, activation_checkpointing=True), tmp_path / "checkpointed")
    assert_same_step(eager, checkpointed, tolerance=1e-6)
    model = checkpointed[2].model
    assert all(block.checkpointed for block in model.backbone.blocks)

    def saved_bytes() -> int:
        saved = []
        x = torch.randn(16, 1, 8, 8)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            model(x, torch.rand(16), cond=torch.arange(16) % 10)
        return sum(saved)

    with_checkpoints = saved_bytes()
    set_activation_checkpointing(model, False)
    assert with_checkpoints < saved_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("mode", [True, "blocks"])
def test_inductor_compiled_step_matches_eager(tmp_path, monkeypatch, mode):
    monkeypatch.setattr(compiling, "BACKEND", "inductor")
    eager = one_step(config("dumo"), tmp_path / "eager")
    assert_same_step(eager, one_step(config("dumo", compile=mode), tmp_path / "compiled"), tolerance=1e-4)


@pytest.mark.parametrize("mode", [True, "blocks"])
def test_compiled_and_checkpointed_step_matches_eager(tmp_path, mode):
    eager = one_step(config("dumo"), tmp_path / "eager")
    both = one_step(config("dumo", compile=mode, activation_checkpointing=True), tmp_path / "both")
    assert_same_step(eager, both)

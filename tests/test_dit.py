import pytest
import torch
import torch.nn.functional as F
from conftest import jvp_vs_difference_error

from dumo.data.batch import Batch
from dumo.models import ModelConfig, build_model, count_parameters
from dumo.models.dit import DIT_SIZES, parse_dit_name
from dumo.objectives import DuMoConfig, DuMoObjective, MeanFlowConfig, MeanFlowObjective, TimeConfig


def meta_model(name, heads, num_classes=1000, shape=(4, 32, 32), time_inputs=1):
    with torch.device("meta"):
        return build_model(ModelConfig(name=name), shape, heads, num_classes, time_inputs)


def test_dit_xl2_parameter_counts_without_allocating():
    single = meta_model("DiT-XL/2", ("v",))
    dual = meta_model("DiT-XL/2", ("v", "u"))
    assert all(p.is_meta for p in dual.parameters())
    n_single, n_dual = count_parameters(single), count_parameters(dual)
    assert abs(n_single - 675e6) / 675e6 < 0.01, n_single  # DiT-XL/2 is published as 675M
    extra = n_dual - n_single
    assert 2.5e6 < extra < 3.2e6 and extra / n_single < 0.005, extra  # "about 3M, < 0.5%"


@pytest.mark.parametrize("size", sorted(DIT_SIZES))
@pytest.mark.parametrize("patch", [1, 2, 4])
def test_every_dit_name_builds(size, patch):
    name = f"DiT-{size}/{patch}"
    assert parse_dit_name(name) == (DIT_SIZES[size], patch)
    model = meta_model(name, ("v", "u"), shape=(4, 32, 32))
    assert count_parameters(model.heads["u"]) == count_parameters(model.heads["v"])


def tiny_dit(heads=("v", "u"), num_classes=3, time_inputs=1):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="DiT-S/2"), (1, 8, 8), heads, num_classes, time_inputs)
    # DiT-S is wide for a test; cut it to two blocks and give the zero-initialised layers weights
    model.backbone.blocks = model.backbone.blocks[:2]
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model


def test_dual_head_dit_outputs_images():
    model = tiny_dit()
    out = model(torch.randn(2, 1, 8, 8), torch.rand(2), cond=torch.tensor([0, 3]))
    assert out.v.shape == out.u.shape == (2, 1, 8, 8)
    assert not torch.allclose(out.v, out.u)


def test_finite_difference_target_uses_fused_attention(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    model = tiny_dit()
    batch = Batch(x=torch.randn(4, 1, 8, 8), cond=torch.tensor([0, 1, 2, 0]))
    DuMoObjective(DuMoConfig(zeta=0.5), num_classes=3)(model, batch)
    assert calls.count(True) == 2 and calls.count(False) == 2  # 2 blocks: the grad pass, one batched no-grad pass


def test_jvp_through_attention_needs_and_gets_the_math_kernel():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(NotImplementedError):  # the CPU flash kernel has no forward-mode AD
        torch.func.jvp(lambda a: F.scaled_dot_product_attention(a, a, a), (q,), (torch.ones_like(q),))
    model = tiny_dit().double()
    batch = Batch(x=torch.randn(4, 1, 8, 8, dtype=torch.float64), cond=torch.tensor([0, 1, 2, 0]))
    assert jvp_vs_difference_error(model, batch) < 1e-2


def test_meanflow_on_dit_uses_the_second_time():
    model = tiny_dit(heads=("u",), time_inputs=2)
    batch = Batch(x=torch.randn(4, 1, 8, 8), cond=torch.tensor([0, 1, 2, 0]))
    out = MeanFlowObjective(MeanFlowConfig(rho=0.5), num_classes=3)(model, batch)
    out.loss.backward()
    assert model.backbone.conditioning.interval.mlp[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_finite_difference_under_bf16_autocast(precision):
    model = tiny_dit()
    batch = Batch(x=torch.randn(16, 1, 8, 8), cond=torch.arange(16) % 3)
    cfg = DuMoConfig(time=TimeConfig(theta1=20.0, theta2=20.0), target_precision=precision)
    torch.manual_seed(0)
    reference = DuMoObjective(cfg, 3)(model, batch).targets["du_dt"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(0)
        out = DuMoObjective(cfg, 3)(model, batch)
    assert out.targets["du_dt"].dtype == torch.float32 and out.loss.dtype == torch.float32
    error = ((out.targets["du_dt"] - reference).norm() / reference.norm()).item()
    if precision != "bf16":  # tf32 rounds only CUDA matmuls: on the CPU it is fp32
        assert error < 1e-5
    else:
        assert error > 1e-2  # what the default avoids: bf16 rounding magnified by 1 / (2 epsilon)


def kernel_states(monkeypatch) -> list[bool]:
    """For each attention call from now on: whether the fused (flash) kernel was allowed."""
    states = []
    real = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        states.append(torch.backends.cuda.flash_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    return states


@pytest.mark.parametrize(
    ("objective", "heads", "time_inputs"),
    [
        (DuMoObjective(DuMoConfig(zeta=0.5), 3), ("v", "u"), 1),
        (MeanFlowObjective(MeanFlowConfig(derivative="finite_difference", zeta=0.5), 3), ("u",), 2),
    ],
)
def test_finite_difference_objectives_never_force_the_math_kernel(monkeypatch, objective, heads, time_inputs):
    states = kernel_states(monkeypatch)
    model = tiny_dit(heads=heads, time_inputs=time_inputs)
    objective(model, Batch(x=torch.randn(4, 1, 8, 8), cond=torch.tensor([0, 1, 2, 0]))).loss.backward()
    assert states and all(states)


@pytest.mark.parametrize(
    ("objective", "heads", "time_inputs"),
    [
        (DuMoObjective(DuMoConfig(derivative="jvp", zeta=0.5), 3), ("v", "u"), 1),
        (MeanFlowObjective(MeanFlowConfig(derivative="jvp", zeta=0.5), 3), ("u",), 2),
    ],
)
def test_exact_jvp_uses_the_math_kernel_inside_the_jvp_only_and_says_so_once(
    monkeypatch, capsys, objective, heads, time_inputs
):
    from dumo.objectives import base

    monkeypatch.setattr(base, "_NOTED_MATH_ATTENTION", False)
    states = kernel_states(monkeypatch)
    model = tiny_dit(heads=heads, time_inputs=time_inputs)
    batch = Batch(x=torch.randn(4, 1, 8, 8), cond=torch.tensor([0, 1, 2, 0]))
    for _ in range(2):
        objective(model, batch).loss.backward()
    assert set(states) == {True, False}  # the guidance (and DuMo's gradient) pass keeps the fused kernels
    assert torch.backends.cuda.flash_sdp_enabled()  # restored after the JVP
    assert capsys.readouterr().err.count("runs attention on the math kernel") == 1


def test_meanflow_exact_jvp_under_bf16_autocast_backpropagates_through_a_plain_pass(monkeypatch):
    grad_inside_jvp = []
    real = torch.func.jvp

    def recording(*args, **kwargs):
        grad_inside_jvp.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.func, "jvp", recording)
    model = tiny_dit(heads=("u",), time_inputs=2)
    batch = Batch(x=torch.randn(16, 1, 8, 8), cond=torch.arange(16) % 3)
    objective = MeanFlowObjective(MeanFlowConfig(derivative="jvp", rho=0.25), 3)

    def step(bf16: bool):
        model.zero_grad()
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = objective(model, batch).loss
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    loss, grads = step(bf16=False)
    assert grad_inside_jvp == [True]  # fp32: one forward-mode pass gives u (with gradients) and du/dt
    loss_bf16, grads_bf16 = step(bf16=True)
    # bf16: the backward pass never goes through the JVP (on CUDA its dtypes did not match)
    assert grad_inside_jvp == [True, False]
    assert torch.isfinite(grads_bf16).all()
    assert abs(loss_bf16 - loss) / loss < 0.05
    assert ((grads_bf16 - grads).norm() / grads.norm()).item() < 0.1

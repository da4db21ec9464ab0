import torch
from conftest import jvp_vs_difference_error

from dumo.data.batch import Batch
from dumo.models import ModelConfig, build_model, count_parameters
from dumo.objectives import DuMoConfig, DuMoObjective, MeanFlowConfig, MeanFlowObjective

TINY = ModelConfig(
    name="unet", channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), dropout=0
)


def tiny_unet(heads=("v", "u"), time_inputs=1):
    torch.manual_seed(0)
    model = build_model(TINY, (1, 8, 8), heads, num_classes=3, time_inputs=time_inputs)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model


def test_cifar_sized_unet_is_about_the_papers_size():
    with torch.device("meta"):
        single = build_model(ModelConfig(name="unet"), (3, 32, 32), ("v",))
        dual = build_model(ModelConfig(name="unet"), (3, 32, 32), ("v", "u"))
    assert 50e6 < count_parameters(single) < 60e6
    assert count_parameters(dual) - count_parameters(single) < 0.01 * count_parameters(single)


def test_dual_head_unet_shapes_and_gradients():
    model = tiny_unet()
    out = DuMoObjective(DuMoConfig(zeta=0.3), num_classes=3)(model, Batch(torch.randn(4, 1, 8, 8), torch.arange(4) % 3))
    out.loss.backward()
    assert out.targets["u"].shape == (4, 1, 8, 8)
    for part in ("heads.v", "heads.u", "backbone.input", "backbone.middle"):
        assert sum(p.grad.abs().sum() for n, p in model.named_parameters() if n.startswith(part)) > 0, part


def test_unet_finite_difference_matches_jvp():
    model = tiny_unet().double()
    batch = Batch(torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.arange(4) % 3)
    assert jvp_vs_difference_error(model, batch) < 1e-2


def test_meanflow_on_unet():
    model = tiny_unet(heads=("u",), time_inputs=2)
    out = MeanFlowObjective(MeanFlowConfig(rho=0.5), num_classes=3)(
        model, Batch(torch.randn(4, 1, 8, 8), torch.arange(4))
    )
    out.loss.backward()
    assert model.backbone.conditioning.interval.mlp[0].weight.grad.abs().sum() > 0

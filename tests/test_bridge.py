"""The diffusers bridge: each family's call in dumo's convention, checked against the family's own
pipeline; the two heads from one pass; reading pipeline folders (tiny random models, nothing downloaded)."""

import json

import pytest
import torch

pytest.importorskip("diffusers")

from helpers.diffusers_tiny import (  # noqa: E402
    random_latents,
    random_prompts,
    run_stock_pipeline,
    save_sana_pipeline,
    stock_pipeline,
    tiny_transformer,
)

from dumo.bridge import DualHeadTransformer, family_of  # noqa: E402
from dumo.bridge.folder import load_transformer, read_pipeline_folder  # noqa: E402
from dumo.conditioning import TextCondition  # noqa: E402
from dumo.errors import CheckpointError  # noqa: E402

FAMILIES = ("sana", "sd3", "flux")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_velocity_is_the_pipelines_euler_direction(family):
    """dumo's Euler steps on the family's velocity (t from 1 to 0.6 to 0) land where the family's
    own pipeline does with sigmas [1, 0.6]: same time scale, same sign, same layout."""
    transformer = tiny_transformer(family).eval()
    model = DualHeadTransformer(transformer)
    x, cond = random_latents(2), random_prompts(2)
    with torch.no_grad():
        x_mid = x - 0.4 * model(x, torch.ones(2), cond=cond).v
        expected = x_mid - 0.6 * model(x_mid, torch.full((2,), 0.6), cond=cond).v
        produced = run_stock_pipeline(family, stock_pipeline(family, transformer), x, cond, [1.0, 0.6])
    assert produced.shape == x.shape
    assert (produced - expected).abs().max() < 1e-5 * expected.abs().max()
    assert (produced - x).abs().mean() > 0.1  # the steps moved the latents


@pytest.mark.parametrize("family", FAMILIES)
def test_u_head_starts_as_the_v_heads_euler_step_and_is_its_own_copy(family):
    model = DualHeadTransformer(tiny_transformer(family)).eval()
    x, cond, ones = random_latents(3), random_prompts(3), torch.ones(3)
    with torch.no_grad():
        out = model(x, ones, cond=cond)
        assert torch.equal(x - out.u, x - out.v)  # the one-step prediction is the teacher's Euler step, exactly
        for parameter in model.u_head.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
        moved = model(x, ones, cond=cond)
    assert torch.equal(moved.v, out.v)  # the v-head does not share the u-head's weights
    assert (moved.u - out.u).abs().mean() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_both_heads_come_from_one_backbone_pass(family):
    model = DualHeadTransformer(tiny_transformer(family))
    calls = []
    model.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    out = model(random_latents(2), torch.tensor([0.3, 0.9]), cond=random_prompts(2))
    assert len(calls) == 1
    (out.u.square().mean() + out.v.square().mean()).backward()
    assert all(p.grad is not None for p in model.u_head.parameters())


def test_null_rows_read_the_null_prompt():
    model = DualHeadTransformer(tiny_transformer("sd3")).eval()
    x, cond = random_latents(2), random_prompts(2)
    null = random_prompts(1, seed=7)
    with pytest.raises(CheckpointError, match="null prompt"):
        model(x, torch.ones(2), cond=cond.with_null(torch.tensor([False, True])))
    model.set_null_prompt(null.tokens, null.mask, null.pooled)
    with torch.no_grad():
        dropped = model(x, torch.ones(2), cond=cond.with_null(torch.tensor([False, True])))
        kept = model(x, torch.ones(2), cond=cond)
        explicit = model(x[1:], torch.ones(1), cond=null)
    assert torch.equal(dropped.v[:1], kept.v[:1])
    assert torch.allclose(dropped.v[1:], explicit.v, atol=1e-6)


def test_foreign_models_and_inputs_are_refused_by_name():
    with pytest.raises(CheckpointError, match="cannot drive a UNet2DConditionModel"):
        family_of("UNet2DConditionModel")
    model = DualHeadTransformer(tiny_transformer("flux"))
    cond = random_prompts(1)
    with pytest.raises(CheckpointError, match="pooled vector"):
        model(random_latents(1), torch.ones(1), cond=TextCondition(cond.tokens, cond.mask))
    with pytest.raises(CheckpointError, match="needs prompts"):
        model(random_latents(1), torch.ones(1), cond=torch.zeros(1, dtype=torch.long))


def test_a_pipeline_folder_loads_its_transformer_with_diffusers_own_class(tmp_path):
    folder = save_sana_pipeline(tmp_path / "sana")
    info = read_pipeline_folder(folder)
    assert info.pipeline_class == "SanaPipeline" and info.text_encoders == ["text_encoder"]
    transformer, family = load_transformer(folder)
    assert type(transformer).__name__ == "SanaTransformer2DModel" and family.name == "sana"
    reference = tiny_transformer("sana")
    assert all(torch.equal(a, b) for a, b in zip(transformer.state_dict().values(), reference.state_dict().values()))


def test_missing_or_foreign_pipeline_folders_get_one_line_naming_what_is_missing(tmp_path):
    with pytest.raises(CheckpointError, match="no diffusers pipeline folder at"):
        read_pipeline_folder(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no model_index.json"):
        read_pipeline_folder(tmp_path / "empty")
    folder = save_sana_pipeline(tmp_path / "sana")
    index = json.loads((folder / "model_index.json").read_text())
    unet = {**{k: v for k, v in index.items() if k != "transformer"}, "unet": ["diffusers", "UNet2DConditionModel"]}
    (folder / "model_index.json").write_text(json.dumps(unet))
    with pytest.raises(CheckpointError, match="names no transformer"):
        read_pipeline_folder(folder)
    (folder / "model_index.json").write_text(json.dumps(index))
    for weights in (folder / "transformer").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(CheckpointError, match=r"transformer has no \.safetensors weights"):
        load_transformer(folder)
    import shutil

    shutil.rmtree(folder / "vae")
    with pytest.raises(CheckpointError, match="lacks the vae/ folder"):
        read_pipeline_folder(folder)


def finite_difference_errors(model: DualHeadTransformer, epsilons: list[float]) -> list[float]:
    """Median over 6 samples of ||FD - JVP|| / ||JVP|| for du/dt along the conditional path (fp32)."""
    from dumo.objectives.base import central_difference_times, difference_quotient, time_derivative_jvp
    from dumo.paths import LinearPath

    path, cond = LinearPath(), random_prompts(6)
    x, z = random_latents(6, seed=3), random_latents(6, seed=4)
    t = torch.linspace(0.15, 0.85, 6)

    def flow_map(x_in, t_in):
        return model(x_in, t_in, cond=cond).u

    errors = []
    with torch.no_grad():
        _, exact = time_derivative_jvp(flow_map, path.sample(x, z, t), t, path.velocity(x, z, t))
        for epsilon in epsilons:
            t_low, t_high = central_difference_times(t, epsilon, 0.0, 1.0)
            low, high = flow_map(path.sample(x, z, t_low), t_low), flow_map(path.sample(x, z, t_high), t_high)
            error = difference_quotient(high, low, t_high, t_low) - exact
            errors.append((error.flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)).median().item())
    return errors


@pytest.mark.parametrize("family", FAMILIES)
def test_finite_difference_du_dt_matches_jvp_at_the_familys_epsilon(family):
    """At the family's stencil the finite difference is within 1% of the exact derivative; at dumo's
    own scale of stencil (0.01 and wider) it misses most of it: the time embedding reads 1000 t."""
    model = DualHeadTransformer(tiny_transformer(family)).eval()
    chosen, wide = finite_difference_errors(model, [model.family.fd_epsilon, 1e-2])
    assert chosen < 1e-2
    assert wide > 0.5

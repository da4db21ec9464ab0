"""LoRA on a two-headed diffusers transformer: what trains, DuMo's objective through it, and the
adapter in the format diffusers pipelines load."""

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("diffusers")

from helpers.diffusers_tiny import random_latents, random_prompts, stock_pipeline, tiny_transformer  # noqa: E402

from dumo.bridge import DualHeadTransformer  # noqa: E402
from dumo.bridge.lora import U_HEAD_FILE, apply_lora, save_lora  # noqa: E402
from dumo.data.batch import Batch  # noqa: E402
from dumo.errors import CheckpointError  # noqa: E402
from dumo.objectives import DuMoConfig, DuMoObjective  # noqa: E402
from dumo.runs.diffusers_export import u_head_transformer  # noqa: E402


def lora_model(rank: int = 4) -> DualHeadTransformer:
    model = DualHeadTransformer(tiny_transformer("sana"))
    null = random_prompts(1, seed=9)
    model.set_null_prompt(null.tokens, null.mask)
    return apply_lora(model, rank=rank)


def test_lora_trains_the_adapters_and_the_whole_u_head_only():
    plain = DualHeadTransformer(tiny_transformer("sana")).eval()
    model = lora_model().eval()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in name for name in trainable) and any("lora_B" in name for name in trainable)
    assert {name for name in trainable if "lora_" not in name} == {
        f"u_head.{n}" for n, _ in model.u_head.named_parameters()
    }
    assert "u_head.scale_shift_table" in trainable
    assert any(".attn2.to_q." in name for name in trainable)  # cross-attention too
    x, cond = random_latents(2), random_prompts(2)
    with torch.no_grad():
        before, after = plain(x, torch.ones(2), cond=cond), model(x, torch.ones(2), cond=cond)
    assert torch.equal(before.v, after.v) and torch.equal(before.u, after.u)  # LoRA starts at zero


def test_dumo_steps_through_lora_move_only_the_trainable_weights_and_lower_the_loss():
    torch.manual_seed(0)
    model = lora_model()
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    objective = DuMoObjective(DuMoConfig(zeta=0.5, label_dropout=0.25, epsilon=0.05))
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    x, cond = random_latents(4) * 0.5, random_prompts(4)
    z, t = torch.randn_like(x), torch.tensor([0.2, 0.4, 0.6, 0.9])
    first = objective.loss(model, x, z, t, cond).loss.item()
    for _ in range(30):
        out = objective(model, Batch(x, cond))
        assert torch.isfinite(out.loss)
        optimiser.zero_grad()
        out.loss.backward()
        optimiser.step()
    last = objective.loss(model, x, z, t, cond).loss.item()
    assert last < 0.8 * first
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if not p.requires_grad)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert all(p.abs().sum() > 0 for p in lora_b)


def test_the_adapter_is_saved_in_the_format_diffusers_pipelines_load(tmp_path):
    from safetensors.torch import load_file

    model = lora_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith("u_head."):
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    save_lora(model, tmp_path / "adapter")
    weights = load_file(tmp_path / "adapter" / "pytorch_lora_weights.safetensors")
    assert weights and all(key.startswith("transformer.") and ".lora_" in key for key in weights)
    pipe = stock_pipeline("sana", tiny_transformer("sana"))
    pipe.load_lora_weights(tmp_path / "adapter")
    x, cond = random_latents(2), random_prompts(2)
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        out = model(x, t, cond=cond)
        loaded_v = pipe.transformer(x, cond.tokens, timestep=1000 * t, encoder_attention_mask=cond.mask.long()).sample
        merged_u = u_head_transformer(model)  # the export's transformer: LoRA merged, u as its output
        exported_u = merged_u(x, cond.tokens, timestep=1000 * t, encoder_attention_mask=cond.mask.long()).sample
    assert torch.allclose(loaded_v, out.v, atol=1e-5)
    assert torch.allclose(exported_u, out.u, atol=1e-5)
    assert not torch.allclose(out.u, out.v, atol=1e-3)
    u_head = load_file(tmp_path / "adapter" / U_HEAD_FILE)
    assert set(u_head) == {"proj_out.weight", "proj_out.bias", "scale_shift_table"}
    assert "lora" not in " ".join(name for name, _ in merged_u.named_modules())


def test_lora_refuses_a_bad_rank_and_saving_without_an_adapter(tmp_path):
    with pytest.raises(CheckpointError, match="rank must be at least 1"):
        apply_lora(DualHeadTransformer(tiny_transformer("sana")), rank=0)
    with pytest.raises(CheckpointError, match="no LoRA adapter to save"):
        save_lora(DualHeadTransformer(tiny_transformer("sana")), tmp_path / "x")

"""dumo plan for diffusers models at their published sizes: the table's parameter counts are those
of diffusers' classes built from the published configs, and the memory adds up as hand-computed."""

import pytest
import torch

from dumo.bridge.memory import PUBLISHED, distillation_memory, dumo_memory, published_size, setting_of
from dumo.config import load_config
from dumo.errors import ConfigError

# the published transformer/config.json of each release (the keys that shape the network)
PUBLISHED_CONFIGS = {
    "sana-0.6b": ("SanaTransformer2DModel", dict(
        attention_head_dim=32, caption_channels=2304, cross_attention_dim=1152, cross_attention_head_dim=72,
        in_channels=32, mlp_ratio=2.5, num_attention_heads=36, num_cross_attention_heads=16, num_layers=28,
        out_channels=32, patch_size=1, sample_size=32)),
    "sana-1.6b": ("SanaTransformer2DModel", dict(
        attention_head_dim=32, caption_channels=2304, cross_attention_dim=2240, cross_attention_head_dim=112,
        in_channels=32, mlp_ratio=2.5, num_attention_heads=70, num_cross_attention_heads=20, num_layers=20,
        out_channels=32, patch_size=1, sample_size=32)),
    "sd3.5-medium": ("SD3Transformer2DModel", dict(
        attention_head_dim=64, caption_projection_dim=1536, dual_attention_layers=tuple(range(13)), in_channels=16,
        joint_attention_dim=4096, num_attention_heads=24, num_layers=24, out_channels=16, patch_size=2,
        pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm", sample_size=128)),
    "flux-dev": ("FluxTransformer2DModel", dict(
        attention_head_dim=128, guidance_embeds=True, in_channels=64, joint_attention_dim=4096, num_attention_heads=24,
        num_layers=19, num_single_layers=38, patch_size=1, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))),
}  # fmt: skip


@pytest.mark.parametrize("name", PUBLISHED)
def test_the_tables_counts_are_diffusers_classes_built_from_the_published_configs(name):
    diffusers = pytest.importorskip("diffusers")
    from dumo.bridge.families import family_of
    from dumo.bridge.lora import attention_targets

    class_name, config = PUBLISHED_CONFIGS[name]
    with torch.device("meta"):
        transformer = getattr(diffusers, class_name)(**config)
    size = PUBLISHED[name]
    assert size.family == family_of(transformer).name
    assert size.parameters == sum(p.numel() for p in transformer.parameters())
    heads = family_of(transformer).head_state_names()
    assert size.head_parameters == sum(p.numel() for n, p in transformer.named_parameters() if n.startswith(heads))
    targets = attention_targets(transformer)
    adapted = [m for n, m in transformer.named_modules() if any(n.endswith("." + t) for t in targets)]
    assert size.lora_parameters_per_rank == sum(m.in_features + m.out_features for m in adapted)
    assert size.width == config["num_attention_heads"] * config["attention_head_dim"]


def test_flux_lora_memory_per_gpu_is_the_hand_computed_sum():
    config = load_config("t2i/flux-dev-lora-dumo.yaml")  # rank 64, batch 16, 1024 px, bf16, checkpointing
    setting = setting_of(config, gpus=16)  # one image per GPU
    parts = dumo_memory(published_size(config.model.pretrained), setting)
    # by hand: 11,901,408,320 parameters; adapters 64 x 1,634,304 + u-head 19,077,184 = 123,672,640;
    # 4608 tokens (64 x 64 packed latents + 512 of T5) of width 3072 through 57 blocks
    expected = {
        "frozen base (fp32, 4 B/param)": 47_605_633_280,
        "trained: weights, gradients, Adam, EMA (20 B/param)": 2_473_452_800,
        "bf16 copies of trained weights (autocast)": 247_345_280,
        "activations (1 images, checkpointed)": (57 + 17) * 4608 * 3072 * 2,  # 2,095,054,848
        "no-grad target passes (2 rows/image)": (5 + 4) * 3072 * 4608 * 2 * 4,  # 1,019,215,872
    }
    assert parts == pytest.approx(expected, rel=1e-12)
    distill = distillation_memory(published_size(config.model.pretrained), setting)
    assert sum(distill.values()) - sum(parts.values()) == pytest.approx(
        16 * 123_672_640 + 2 * 123_672_640 + 2_095_054_848 - 1_019_215_872, rel=1e-12
    )


def test_flux_lora_under_fsdp_divides_the_weights_by_the_gpus_and_holds_one_gathered_block():
    config = load_config("t2i/flux-dev-lora-dumo.yaml", ["train.parallel=fsdp"])
    setting = setting_of(config, gpus=16)
    size = published_size(config.model.pretrained)
    parts = dumo_memory(size, setting)
    # by hand, as above over 16 GPUs: the frozen base twice (the model's and the EMA's shards)
    expected = {
        "frozen base, model and EMA (fp32, 8 B/param / 16)": 8 * 11_901_408_320 / 16,
        "trained: weights, gradients, Adam, EMA (20 B/param) / 16": 2_473_452_800 / 16,
        "bf16 copies of trained weights (autocast) / 16": 247_345_280 / 16,
        "one gathered block (fp32)": 4 * 11_901_408_320 / 57,
        "activations (1 images, checkpointed)": (57 + 17) * 4608 * 3072 * 2,
        "no-grad target passes (2 rows/image)": (5 + 4) * 3072 * 4608 * 2 * 4,
    }
    assert parts == pytest.approx(expected, rel=1e-12)
    ddp = dumo_memory(size, setting_of(load_config("t2i/flux-dev-lora-dumo.yaml"), gpus=16))
    assert sum(parts.values()) < sum(ddp.values()) / 5


def test_plan_names_the_releases_it_knows(capsys):
    from dumo.cli import main

    with pytest.raises(ConfigError, match="knows the published sizes of sana-0.6b"):
        published_size("my-own-model")
    assert published_size("/data/Sana_600M_1024px_diffusers").name == "sana-0.6b"
    assert main(["plan", "configs/t2i/sd35-medium-dumo.yaml", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "sd3.5-medium: 2,243,171,520 transformer parameters" in out and "4 images per GPU" in out

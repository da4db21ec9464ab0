"""Tiny diffusers flow transformers (SANA, SD3, FLUX) with random weights, and prompts for them
(nothing downloaded)."""

import torch

from dumo.bridge.families import pack_latents, unpack_latents
from dumo.conditioning import TextCondition

TEXT_DIM, POOLED_DIM, CHANNELS, SIDE = 12, 6, 4, 8


def tiny_transformer(family: str, seed: int = 0):
    """A seeded random transformer of ``family`` reading (B, 4, 8, 8) latents (FLUX: packed 2x2)."""
    from diffusers import FluxTransformer2DModel, SanaTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(seed)
    if family == "sana":
        return SanaTransformer2DModel(
            in_channels=CHANNELS, out_channels=CHANNELS, num_attention_heads=2, attention_head_dim=8,
            num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
            caption_channels=TEXT_DIM, sample_size=SIDE, patch_size=1,
        )  # fmt: skip
    if family == "sd3":
        return SD3Transformer2DModel(
            sample_size=SIDE, patch_size=2, in_channels=CHANNELS, out_channels=CHANNELS, num_layers=2,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
            caption_projection_dim=16, pooled_projection_dim=POOLED_DIM, pos_embed_max_size=16,
        )  # fmt: skip
    if family == "flux":
        return FluxTransformer2DModel(
            patch_size=1, in_channels=4 * CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=POOLED_DIM,
            guidance_embeds=True, axes_dims_rope=(2, 2, 4),
        )  # fmt: skip
    raise ValueError(family)


def random_prompts(rows: int, length: int = 5, seed: int = 1) -> TextCondition:
    """Random prompt embeddings with a padded tail on every row but the first, and pooled vectors."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(rows, length, TEXT_DIM, generator=generator)
    mask = torch.ones(rows, length, dtype=torch.bool)
    mask[1:, length - 2 :] = False
    tokens = tokens * mask[..., None]
    pooled = torch.randn(rows, POOLED_DIM, generator=generator)
    return TextCondition(tokens, mask, pooled)


def random_latents(rows: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(rows, CHANNELS, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def save_sana_pipeline(folder):
    """A complete tiny SANA pipeline folder, as released pipelines are laid out: a Gemma-2 text
    encoder with a word-level tokenizer, a DC autoencoder (4 latent channels, downsampling by 2),
    the tiny transformer and a flow-match scheduler."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline
    from helpers.text_encoders import vocab_size, word_tokenizer
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=vocab_size(), hidden_size=TEXT_DIM, intermediate_size=16, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, head_dim=6, max_position_embeddings=1024, pad_token_id=0,
        )
    )  # fmt: skip
    vae = AutoencoderDC(
        in_channels=3, latent_channels=CHANNELS, attention_head_dim=4,
        encoder_block_types=("ResBlock", "ResBlock"), decoder_block_types=("ResBlock", "ResBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()),
    )  # fmt: skip
    pipe = SanaPipeline(
        tokenizer=word_tokenizer(eos=False), text_encoder=text_encoder, vae=vae,
        transformer=tiny_transformer("sana"), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )  # fmt: skip
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def stock_pipeline(family: str, transformer):
    """The family's diffusers pipeline around ``transformer`` with a shift-1 Euler scheduler and no
    text encoders or VAE (prompts come as embeddings, samples as latents)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, SanaPipeline, StableDiffusion3Pipeline

    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    if family == "sana":
        return SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=scheduler)
    if family == "sd3":
        return StableDiffusion3Pipeline(
            transformer=transformer, scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
        )  # fmt: skip
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None,
    )  # fmt: skip


def run_stock_pipeline(
    family: str, pipe, x: torch.Tensor, cond: TextCondition, sigmas: list[float] | None, steps: int | None = None
) -> torch.Tensor:
    """The pipeline's own sampling loop from latents ``x`` over ``sigmas`` (or its default schedule of
    ``steps``), back as (B, C, H, W) latents."""
    side = x.shape[-1] * pipe.vae_scale_factor
    kwargs = dict(
        prompt_embeds=cond.tokens, sigmas=sigmas, output_type="latent", height=side, width=side,
        num_inference_steps=len(sigmas) if steps is None else steps,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    if family == "sana":
        return pipe(
            **kwargs,
            prompt_attention_mask=cond.mask.long(),
            guidance_scale=1.0,
            latents=x,
            use_resolution_binning=False,
        ).images
    if family == "sd3":
        return pipe(**kwargs, pooled_prompt_embeds=cond.pooled, guidance_scale=1.0, latents=x).images
    out = pipe(**kwargs, pooled_prompt_embeds=cond.pooled, guidance_scale=3.5, latents=pack_latents(x)).images
    return unpack_latents(out, x)


def _clip(hidden: int, projection: bool):
    from helpers.text_encoders import vocab_size
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size(), hidden_size=hidden, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=POOLED_DIM // 2, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5():
    from helpers.text_encoders import vocab_size
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size(), d_model=TEXT_DIM, d_kv=4, d_ff=16, num_layers=1, num_heads=3, pad_token_id=0,
        eos_token_id=3,
    )  # fmt: skip
    return T5EncoderModel(config)


def _kl_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=CHANNELS, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=4, sample_size=32, scaling_factor=1.5, shift_factor=0.1,
    )  # fmt: skip


def _clip_tokenizer():
    from helpers.text_encoders import word_tokenizer

    tokenizer = word_tokenizer(bos=True)
    tokenizer.model_max_length = 8
    return tokenizer


def save_sd3_pipeline(folder):
    """A complete tiny SD3 pipeline folder: CLIP-L and CLIP-G (with projections, 6 wide each), T5
    (12 wide), an SD-VAE of 4 latent channels downsampling by 2 (scale 1.5, shift 0.1), the tiny
    transformer and a flow-match scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from helpers.text_encoders import word_tokenizer

    torch.manual_seed(0)
    pipe = StableDiffusion3Pipeline(
        transformer=tiny_transformer("sd3"), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_kl_vae(),
        text_encoder=_clip(6, True), tokenizer=_clip_tokenizer(), text_encoder_2=_clip(6, True),
        tokenizer_2=_clip_tokenizer(), text_encoder_3=_t5(), tokenizer_3=word_tokenizer(),
    )  # fmt: skip
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def save_flux_pipeline(folder):
    """A complete tiny FLUX pipeline folder: CLIP-L (6 wide, its pooled vector), T5 (12 wide), an
    SD-VAE of 4 latent channels downsampling by 2, the tiny transformer and a flow-match scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from helpers.text_encoders import word_tokenizer

    torch.manual_seed(0)
    pipe = FluxPipeline(
        transformer=tiny_transformer("flux"), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_kl_vae(),
        text_encoder=_clip(POOLED_DIM, False), tokenizer=_clip_tokenizer(), text_encoder_2=_t5(),
        tokenizer_2=word_tokenizer(),
    )  # fmt: skip
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


PIPELINE_BUILDERS = {"sana": save_sana_pipeline, "sd3": save_sd3_pipeline, "flux": save_flux_pipeline}


def save_caption_folder(folder, count: int = 4, side: int = 32):
    """``count`` random RGB images of ``side`` pixels with captions in the tokenizers' words."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = ["a red cat", "a blue dog on the mat", "the green bird", "a small cat in the sky", "big red dog"]
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(words[i % len(words)])
    return folder

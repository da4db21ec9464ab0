"""A tiny SD-VAE-shaped autoencoder with random weights, for tests that need one (nothing downloaded)."""

import torch


def tiny_vae():
    """A seeded random ``diffusers.AutoencoderKL``: 3 channels in, 4 latent channels, downsampling by 2."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    )

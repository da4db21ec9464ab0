"""Latent data with small, randomly initialised autoencoders built from a config (never downloaded)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import AutoencoderDC  # noqa: E402
from helpers.autoencoders import tiny_vae  # noqa: E402

from dumo.config import config_from_dict  # noqa: E402
from dumo.data import DataError, LatentDataset, build_dataset  # noqa: E402
from dumo.data.latents import LatentCodec, load_autoencoder  # noqa: E402
from dumo.training import Trainer  # noqa: E402


def dumo(*args):
    return subprocess.run([sys.executable, "-m", "dumo", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    tiny_vae().save_pretrained(folder / "sd-vae")
    out = folder / "digits-latents"
    result = dumo(
        "encode", "--data", "digits", "--kind", "sd-vae", "--autoencoder", folder / "sd-vae", "--out", out,
        "--shard-size", 1000, "--workers", 0,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "encoded 1797 images (3594 latents with flips) of digits with sd-vae" in result.stdout
    assert "2 shards" in result.stdout
    return folder, out


def test_latents_are_scaled_and_flipped(encoded):
    folder, out = encoded
    dataset = LatentDataset(out)
    assert dataset.shape == (4, 4, 4) and len(dataset) == 2 * 1797 and dataset.num_classes == 10
    vae = load_autoencoder("sd-vae", folder / "sd-vae")
    digits = build_dataset(config_from_dict({"data": {"name": "digits"}}).data)
    x = digits.images[[0, 1, 999, 1000, 1796]].expand(-1, 3, -1, -1) * 2 - 1
    expected = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    mirrored = vae.encode(x.flip(-1)).latent_dist.mean * vae.config.scaling_factor
    # shard 0: images 0..999, then their mirrors; shard 1: images 1000..1796, then theirs
    assert torch.allclose(dataset.images[[0, 1, 999]], expected[:3], atol=1e-5)
    assert torch.allclose(dataset.images[[1000, 1001, 1999]], mirrored[:3], atol=1e-5)
    assert torch.allclose(dataset.images[[2000, 2796]], expected[3:], atol=1e-5)
    assert torch.allclose(dataset.images[[2797, 3593]], mirrored[3:], atol=1e-5)
    labels = digits.labels
    assert torch.equal(dataset.labels, torch.cat([labels[:1000], labels[:1000], labels[1000:], labels[1000:]]))


def test_latent_files_of_earlier_versions_are_still_read(encoded, tmp_path):
    """The single-file format (one safetensors file, read whole) that dumo encode wrote before shards."""
    from dumo.files import save_checkpoint

    _, out = encoded
    sharded = LatentDataset(out)
    everything = sharded.images[:]
    metadata = {key: str(sharded.metadata[key]) for key in ("autoencoder_kind", "autoencoder_path", "num_classes")}
    metadata.update(scaling_factor=repr(sharded.metadata["scaling_factor"]), shift_factor="0.0")
    single = tmp_path / "digits.safetensors"
    save_checkpoint(single, {"latents": everything, "labels": sharded.labels}, metadata, kind="dumo-latents")
    dataset = LatentDataset(single)
    assert torch.equal(dataset.images, everything) and torch.equal(dataset.labels, sharded.labels)
    assert dataset.shape == sharded.shape and dataset.num_classes == 10
    for mine, theirs in zip(dataset.statistics, sharded.statistics):
        assert torch.allclose(mine, theirs, atol=1e-5)  # float32 vs float64 sums


def test_decode_inverts_the_scaling(encoded):
    folder, out = encoded
    codec = LatentCodec(load_autoencoder("sd-vae", folder / "sd-vae"), "sd-vae")
    z = torch.randn(2, 4, 4, 4)
    direct = ((codec.autoencoder.decode(z / codec.scale).sample + 1) / 2).clamp(0, 1)
    assert torch.allclose(codec.decode(z), direct, atol=1e-6)


def test_train_and_sample_in_latent_space(encoded, tmp_path):
    _, out = encoded
    config = config_from_dict(
        {
            "data": {
                "name": "latents",
                "path": str(out),
                "conditional": True,
                "batch_size": 16,
                "latent_shape": [4, 4, 4],
            },
            "model": {"name": "DiT-S/2", "hidden_dim": 32, "depth": 1, "num_heads": 2},
            "objective": {"name": "dumo", "zeta": 0.5},
            "train": {"steps": 3, "progress": False, "checkpoint_every": 0},
        }
    )
    Trainer(config, tmp_path / "run").run()
    npz = tmp_path / "s.npz"
    result = dumo("sample", tmp_path / "run", "--nfe", 1, "--num", 4, "--out", npz)
    assert result.returncode == 0, result.stderr
    images = np.load(npz)["images"]
    assert images.shape == (4, 3, 8, 8) and images.min() >= 0 and images.max() <= 1  # decoded to pixels


def test_wrong_latent_shape_and_missing_autoencoder(encoded, tmp_path):
    _, out = encoded
    bad = config_from_dict({"data": {"name": "latents", "path": str(out), "latent_shape": [4, 8, 8]}}).data
    with pytest.raises(DataError, match="not data.latent_shape"):
        build_dataset(bad)
    with pytest.raises(DataError, match="no autoencoder at"):
        load_autoencoder("sd-vae", tmp_path)


def test_dc_ae_codec_round_trip(tmp_path):
    torch.manual_seed(0)
    dc = AutoencoderDC(
        in_channels=3,
        latent_channels=8,
        attention_head_dim=8,
        encoder_block_types=("ResBlock", "ResBlock"),
        decoder_block_types=("ResBlock", "ResBlock"),
        encoder_block_out_channels=(8, 16),
        decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), ()),
        decoder_qkv_multiscales=((), ()),
        scaling_factor=0.4,
    )
    dc.save_pretrained(tmp_path / "dc")
    codec = LatentCodec(load_autoencoder("dc-ae", tmp_path / "dc"), "dc-ae")
    images = torch.rand(2, 3, 16, 16)
    latents = codec.encode(images)
    assert torch.allclose(latents, codec.autoencoder.encode(images * 2 - 1).latent * 0.4, atol=1e-5)
    assert codec.decode(latents).shape == (2, 3, 16, 16)


def test_random_latents_for_timing_runs(tmp_path):
    from dumo.config import load_config
    from dumo.data import build_dataset
    from dumo.errors import ConfigError

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "bench" / "dit-s2-dumo.yaml")
    first, second = build_dataset(config.data), build_dataset(config.data)
    assert first.shape == (4, 32, 32) and first.num_classes == 1000
    assert torch.equal(first.images, second.images)  # the same seed: every bench config times the same data
    assert abs(first.images.std().item() - 1) < 0.01
    with pytest.raises(DataError, match="random_latents have no decoder"):
        first.unstandardise(first.images[:1])
    with pytest.raises(ConfigError, match="random_latents needs latent_shape and num_classes"):
        load_config(
            Path(__file__).resolve().parents[1] / "configs" / "bench" / "dit-s2-dumo.yaml", ["data.latent_shape=null"]
        )

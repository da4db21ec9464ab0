"""dumo encode: sharded, resumable latents of an image folder, the same from 1 process or 2 ranks."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from helpers.autoencoders import tiny_vae  # noqa: E402
from PIL import Image  # noqa: E402

from dumo.cli import main  # noqa: E402
from dumo.data import DataError, LatentDataset  # noqa: E402
from dumo.data.images import read_rgb  # noqa: E402
from dumo.data.latents import SHARD_FORMAT, LatentCodec, load_autoencoder  # noqa: E402
from dumo.files import load_checkpoint, save_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "fox")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """12 PNGs of two sizes in 3 class folders, and a tiny random SD-VAE."""
    root = tmp_path_factory.mktemp("encode")
    tiny_vae().save_pretrained(root / "vae")
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / "images" / name).mkdir(parents=True)
        for i in range(4):
            height, width = (20, 26) if i % 2 else (24, 18)  # the ADM centre crop makes both 16x16
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / name / f"{i}.png")
    return root


def encode_args(root, out, *extra):
    """12 images in shards of 5 (5, 5, 2), batches of 2."""
    args = ["encode", "--data", "image_folder", "--data-path", root / "images", "--resolution", 16, "--kind", "sd-vae"]
    args += ["--autoencoder", root / "vae", "--out", out, "--shard-size", 5, "--batch-size", 2, "--workers", 0]
    return [str(a) for a in [*args, *extra]]


@pytest.fixture(scope="module")
def one_rank(folder):
    out = folder / "one"
    assert main(encode_args(folder, out)) == 0
    return out


def shards(out):
    """Every shard's tensors (load_checkpoint also verifies each one's checksum)."""
    return {p.name: load_checkpoint(p, kind=SHARD_FORMAT)[0] for p in sorted(out.glob("shard-*.safetensors"))}


def test_shards_hold_the_sorted_images_then_their_mirrors(folder, one_rank):
    index = json.loads((one_rank / "index.json").read_text())
    assert index["num_images"] == 12 and index["num_latents"] == 24 and index["latent_shape"] == [4, 8, 8]
    assert index["class_names"] == list(CLASSES) and [s["images"] for s in index["shards"]] == [5, 5, 2]
    written = shards(one_rank)
    assert list(written) == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    files = sorted((folder / "images").glob("*/*.png"))
    images = torch.stack([torch.from_numpy(read_rgb(f, 16)[0]).permute(2, 0, 1) for f in files])
    codec = LatentCodec(load_autoencoder("sd-vae", folder / "vae"), "sd-vae")
    second = written["shard-00001.safetensors"]  # images 5..9: originals, then their mirror images
    assert torch.allclose(second["latents"][:5], codec.encode(images[5:10]), atol=1e-5)
    assert torch.allclose(second["latents"][5:], codec.encode(images[5:10].flip(-1)), atol=1e-5)
    assert second["labels"].tolist() == [1, 1, 1, 2, 2] * 2

    everything = torch.cat([s["latents"] for s in written.values()])
    mean, std = index["statistics"]["mean"], index["statistics"]["std"]
    assert np.allclose(mean, everything.double().mean((0, 2, 3)).numpy(), atol=1e-7)
    assert np.allclose(std, everything.double().std((0, 2, 3), correction=0).numpy(), atol=1e-7)

    dataset = LatentDataset(one_rank)  # memory-mapped shards, indexed like one tensor
    assert len(dataset) == 24 and dataset.shape == (4, 8, 8) and dataset.class_names == list(CLASSES)
    assert dataset.labels.tolist() == torch.cat([s["labels"] for s in written.values()]).tolist()
    for index_ in (torch.tensor([23, 0, 11, 10, 9]), slice(None, None, 5), slice(3, 14)):
        assert torch.equal(dataset.images[index_], everything[index_])
    assert torch.equal(dataset.images[-1], everything[-1])
    assert torch.allclose(dataset.statistics[0], torch.tensor(mean, dtype=torch.float64))


def test_two_ranks_write_what_one_process_writes(folder, one_rank, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dumo"]
    out = tmp_path / "two"
    result = subprocess.run(
        [*command, *encode_args(folder, out, "--workers", 1)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("encoded 12 images (24 latents with flips)") == 1  # only rank 0 reports
    one, two = shards(one_rank), shards(out)
    assert list(one) == list(two)
    for name in one:
        assert torch.equal(one[name]["labels"], two[name]["labels"])
        worst = (one[name]["latents"] - two[name]["latents"]).abs().max().item()
        assert worst < 1e-6, (name, worst)  # stated tolerance: float32 reduction order (threads per process)
    index_one, index_two = (json.loads((o / "index.json").read_text()) for o in (one_rank, out))
    stats_one, stats_two = index_one.pop("statistics"), index_two.pop("statistics")
    assert index_one == index_two
    assert np.allclose(stats_one["mean"], stats_two["mean"], atol=1e-6)
    assert np.allclose(stats_one["std"], stats_two["std"], atol=1e-6)


def test_a_rerun_writes_only_the_missing_shards(folder, one_rank, tmp_path, capsys):
    out = tmp_path / "resume"
    shutil.copytree(one_rank, out)
    (out / "index.json").unlink()  # as if interrupted before the end
    (out / "shard-00001.safetensors").unlink()
    torn = out / ".shard-00001.safetensors.k1ll3d.tmp"  # what a killed atomic write leaves
    torn.write_bytes(b"partial")
    with pytest.raises(DataError, match="the encoding did not finish"):
        LatentDataset(out)
    kept = {name: (out / name).stat().st_mtime_ns for name in ("shard-00000.safetensors", "shard-00002.safetensors")}
    assert main(encode_args(folder, out)) == 0
    assert "3 shards, 2 already there" in capsys.readouterr().out
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # not rewritten
    assert not torn.exists()
    again, reference = shards(out), shards(one_rank)
    assert torch.equal(again["shard-00001.safetensors"]["latents"], reference["shard-00001.safetensors"]["latents"])
    assert (out / "index.json").read_text() == (one_rank / "index.json").read_text()

    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert main(encode_args(folder, out)) == 0  # all there: nothing is encoded again
    assert "3 shards, 3 already there" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == before


def last_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in lines)
    return lines[-1]


def test_corrupt_and_foreign_shards_are_refused_in_one_line(folder, one_rank, tmp_path, capsys):
    out = tmp_path / "bad"
    shutil.copytree(one_rank, out)
    shard = out / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # torn by a copy, say
    assert main(encode_args(folder, out)) == 2
    assert "shard-00002.safetensors is not a readable safetensors file" in last_error(capsys)
    with pytest.raises(DataError, match="shard-00002.safetensors is not a readable safetensors file"):
        LatentDataset(out)

    save_checkpoint(shard, {"x": torch.zeros(1)}, {}, kind="dumo-model")
    assert main(encode_args(folder, out)) == 2
    assert last_error(capsys).endswith("is a safetensors file but not a dumo latent shard (dumo-model)")

    assert main(encode_args(folder, tmp_path / "mirrorless", "--no-flip")) == 0
    shutil.copy(tmp_path / "mirrorless" / "shard-00002.safetensors", shard)
    assert main(encode_args(folder, out)) == 2
    assert "belongs to another encoding (flip False, not True)" in last_error(capsys)
    with pytest.raises(DataError, match="belongs to another encoding"):
        LatentDataset(out)

    assert main(encode_args(folder, tmp_path / "latents.safetensors")) == 2
    assert "writes a folder of shards" in last_error(capsys)

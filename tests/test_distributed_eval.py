"""Sampling, decoding and Inception scoring split over ranks: 2 gloo ranks under torchrun against
one process, on a tiny random latent-space model with a tiny random autoencoder (no training data,
nothing downloaded) and a tiny Inception-like network (tests/helpers/tiny_inception_cli.py)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.autoencoders import tiny_vae

from dumo.distributed import Distributed
from dumo.metrics.fid_stats import FeatureMoments, ScoreSplits, StreamingScores, rank_batches, split_of_samples
from dumo.metrics.inception import Statistics, inception_score

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "helpers" / "tiny_inception_cli.py"


def test_feature_moments_in_batches_equal_numpy_covariance():
    features = torch.randn(57, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1
    moments = FeatureMoments(6)
    for part in (slice(0, 20), slice(20, 21), slice(21, 57)):
        moments.update(features[part])
    statistics = moments.statistics()
    np.testing.assert_allclose(statistics.mu, features.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(statistics.sigma, np.cov(features.numpy(), rowvar=False), rtol=1e-10, atol=1e-12)
    assert statistics.count == 57


@pytest.mark.parametrize("num", [1000, 37])
def test_inception_score_from_split_sums_equals_torch_fidelity(num):
    logits = torch.randn(num, 12, generator=torch.Generator().manual_seed(num), dtype=torch.float64) * 2
    splits = ScoreSplits(num, 12)
    order = torch.randperm(num, generator=torch.Generator().manual_seed(1))  # any order, any batching
    for batch in order.split(9):
        splits.update(batch, logits[batch])
    mean, std = splits.score()
    expected_mean, expected_std = inception_score(logits)
    assert mean == pytest.approx(expected_mean, rel=1e-10) and std == pytest.approx(expected_std, rel=1e-8)
    assert std > 0
    counts = torch.bincount(split_of_samples(num, 10))
    assert counts.tolist() == [(i + 1) * num // 10 - i * num // 10 for i in range(10)]


def test_scores_refuse_unseen_samples_and_batches_cover_every_item_once():
    scores = StreamingScores(lambda pixels: (pixels.flatten(1).double(), pixels.flatten(1).double()), 5, 4, 4)
    scores.add(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), torch.arange(3))
    with pytest.raises(Exception, match="saw 3 of its 5 samples"):
        scores.scores(Statistics(np.zeros(4), np.eye(4), 10))
    seen = [
        i
        for rank in range(3)
        for part in rank_batches(23, 4, Distributed(rank, 3))
        for i in range(part.start, part.stop)
    ]
    assert sorted(seen) == list(range(23))


@pytest.fixture(scope="module")
def latent_export(tmp_path_factory):
    """A model folder as 'dumo export' writes it: random DiT weights over 4x4x4 latents of a tiny SD-VAE."""
    from dumo.config import config_from_dict, save_config
    from dumo.data import SampleSpace
    from dumo.files import MODEL_FORMAT, save_checkpoint
    from dumo.models import build_model
    from dumo.objectives import objective_class
    from dumo.runs.layout import EXPORTED_WEIGHTS

    folder = tmp_path_factory.mktemp("latent")
    vae = tiny_vae()
    vae.save_pretrained(folder / "sd-vae")
    config = config_from_dict(
        {
            "data": {"name": "latents", "path": str(folder / "none.safetensors"), "conditional": True},
            "model": {"name": "DiT-S/2", "hidden_dim": 32, "depth": 1, "num_heads": 2},
            "objective": {"name": "dumo"},
        }
    )
    autoencoder = {"kind": "sd-vae", "path": str(folder / "sd-vae"), "scaling_factor": 0.5, "shift_factor": 0.0}
    space = SampleSpace("latents", "latents", (4, 4, 4), 3, ["a", "b", "c"], autoencoder=autoencoder)
    objective = objective_class("dumo")
    model = build_model(config.model, space.shape, objective.heads, 3, objective.time_inputs)
    with torch.no_grad():  # the heads start at zero: give every weight a value so samples differ
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    run = folder / "run"
    run.mkdir()
    save_config(config, run / "config.yaml")
    metadata = {"step": "0", "config": json.dumps(config.to_dict()), "data": space.to_json()}
    save_checkpoint(run / EXPORTED_WEIGHTS, model.state_dict(), metadata, kind=MODEL_FORMAT)
    reference = folder / "ref.npz"
    generator = torch.Generator().manual_seed(2)
    spread = torch.randn(64, 64, generator=generator, dtype=torch.float64)
    Statistics(
        torch.rand(64, generator=generator, dtype=torch.float64).numpy(), (spread @ spread.T / 64).numpy(), 100
    ).save(reference)
    return run, reference


def tiny_inception_cli(*args, ranks: int = 1):
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command = [*launcher, HELPER, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_eval_under_torchrun_scores_and_writes_what_one_process_does(latent_export, tmp_path):
    run, reference = latent_export
    # 21 samples in chunks of 8 (the last one short), decoded 3 at a time: chunk and decode batches straddle
    common = ["eval", run, "--nfe", "1", "-n", "21", "--batch-size", "8", "--decode-batch", "3"]
    common += ["--inception", "tiny", "--ref", reference]
    outputs = {}
    for ranks in (2, 1):
        out = tmp_path / f"ranks{ranks}"
        files = ["--npz", out / "samples.npz", "--png-dir", out / "png", "--json", out / "scores.json"]
        result = tiny_inception_cli(*common, *files, ranks=ranks)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("NFE  FID") == 1  # only rank 0 reports
        assert not list(out.glob(".*parts"))  # the ranks' part files are merged and gone
        outputs[ranks] = out
    two, one = (json.loads((outputs[r] / "scores.json").read_text()) for r in (2, 1))
    assert two["processes"] == 2 and one["processes"] == 1
    for key in ("fid", "is", "is_std"):
        assert two["nfe"]["1"][key] == pytest.approx(one["nfe"]["1"][key], rel=1e-6, abs=1e-9), key
    assert one["nfe"]["1"]["fid"] > 0 and one["nfe"]["1"]["is"] > 1
    npz_two, npz_one = (np.load(outputs[r] / "samples.npz") for r in (2, 1))
    assert sorted(npz_two.files) == ["arr_0", "labels"]
    assert npz_two["arr_0"].shape == (21, 8, 8, 3) and npz_two["arr_0"].dtype == np.uint8  # decoded: 4x4 -> 8x8 px
    np.testing.assert_array_equal(npz_two["arr_0"], npz_one["arr_0"])
    np.testing.assert_array_equal(npz_two["labels"], np.arange(21) % 3)
    assert len({image.tobytes() for image in npz_one["arr_0"]}) == 21  # every sample its own noise
    from PIL import Image

    pngs = sorted((outputs[2] / "png").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(21)]
    np.testing.assert_array_equal(np.asarray(Image.open(pngs[13])), npz_one["arr_0"][13])
    assert (outputs[2] / "png" / "labels.csv").read_text().splitlines()[2] == "000001.png,1,b"
    # dumo fid on the written file gives the scores of dumo eval, under torchrun too
    scored = tiny_inception_cli("fid", outputs[2] / "samples.npz", "--ref", reference, "--inception", "tiny", ranks=2)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert float(scored.stdout.split("FID ")[1].split()[0]) == pytest.approx(two["nfe"]["1"]["fid"], abs=1e-3)


def test_sample_npz_under_torchrun_equals_one_process(latent_export, tmp_path):
    run, _ = latent_export
    common = ["sample", run, "--nfe", "1", "-n", "10", "--batch-size", "4", "--decode-batch", "3"]
    two = tiny_inception_cli(*common, "--out", tmp_path / "two.npz", ranks=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote 10 samples") == 1 and "on 2 processes" in two.stdout
    one = tiny_inception_cli(*common, "--out", tmp_path / "one.npz", "--uint8")
    assert one.returncode == 0, one.stderr[-3000:]
    both, uint8 = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    assert sorted(both.files) == ["arr_0", "images", "labels"] and sorted(uint8.files) == ["arr_0", "labels"]
    np.testing.assert_array_equal(both["arr_0"], uint8["arr_0"])
    as_uint8 = np.round(both["images"] * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(both["arr_0"], as_uint8)
    # one chunk for two ranks: rank 1 draws nothing, writes an empty part and still takes part
    few = tiny_inception_cli(*common, "-n", "3", "--out", tmp_path / "few.npz", "--uint8", ranks=2)
    assert few.returncode == 0, few.stderr[-3000:]
    first = np.load(tmp_path / "few.npz")["arr_0"]
    assert first.shape == (3, 8, 8, 3)
    assert np.abs(first.astype(int) - uint8["arr_0"][:3]).max() <= 1  # chunk 0's noise (batch 3, not 4)


def test_sample_files_are_read_as_uint8_batches_from_either_layout(tmp_path):
    from dumo.errors import SamplingError
    from dumo.runs.generation import read_pixels

    images = torch.rand(7, 3, 5, 4, generator=torch.Generator().manual_seed(0)).numpy()
    arr_0 = np.round(images * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    np.savez(tmp_path / "float.npz", images=images)
    np.savez(tmp_path / "adm.npz", arr_0=arr_0)
    for name in ("float.npz", "adm.npz"):
        count, pixels = read_pixels(str(tmp_path / name), None)
        assert count == 7
        np.testing.assert_array_equal(pixels(slice(2, 6)).numpy(), arr_0[2:6].transpose(0, 3, 1, 2))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(SamplingError, match="has neither a uint8 'arr_0'"):
        read_pixels(str(tmp_path / "other.npz"), None)


def test_pixel_run_domain_metrics_and_fid_against_its_own_data_under_torchrun(tmp_path):
    """A digits run without --ref: the reference statistics of its training images are shared among
    the ranks too, and the gathered domain FD and class fidelity are those of one process."""
    run = tmp_path / "run"
    tiny = ["train.steps=2", "model.depth=1", "model.hidden_dim=32", "train.progress=false", "train.eval_samples=50"]
    trained = subprocess.run(
        [sys.executable, "-m", "dumo", "train", "configs/digits/dumo.yaml", "--out", run]
        + [item for o in tiny for item in ("--set", o)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    common = ["eval", run, "--nfe", "1", "-n", "30", "--batch-size", "8", "--inception", "tiny"]
    scores = {}
    for ranks in (2, 1):
        result = tiny_inception_cli(*common, "--json", tmp_path / f"{ranks}.json", ranks=ranks)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("domain FD") == 1 and "class fidelity" in result.stdout
        scores[ranks] = json.loads((tmp_path / f"{ranks}.json").read_text())["nfe"]["1"]
    assert scores[2].keys() == scores[1].keys() == {"fd", "fidelity", "fid", "is", "is_std"}
    for key, value in scores[1].items():
        assert scores[2][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key

"""FID and Inception Score through torch-fidelity's Inception-v3, with randomly initialised weights.

The weights file is made here the way a user's would be loaded: a state dict of the network's
own keys and shapes, saved as safetensors. Nothing is downloaded.
"""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dumo.metrics.classifier import frechet_distance
from dumo.metrics.inception import (
    InceptionNetwork,
    MetricsError,
    Statistics,
    frechet_inception_distance,
    inception_score,
    read_weights,
)

ROOT = Path(__file__).resolve().parents[1]


def dumo_cli(*args):
    return subprocess.run([sys.executable, "-m", "dumo", *map(str, args)], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory) -> str:
    """Inception-v3 weights of the right keys and shapes, randomly initialised (seeded)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    folder = tmp_path_factory.mktemp("inception")
    empty = folder / "empty.pth"
    torch.save({}, empty)
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as patch:  # build the architecture without any weights to load
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    for module in network.modules():  # variance-preserving init, so features stay O(1) through 90 layers
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = folder / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, path)
    return str(path)


def images(seed: int, num: int = 24, brightness: float = 0.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(num, 3, 16, 16, generator=generator) * 0.6 + 0.2 + brightness).clamp(0, 1)


def test_features_have_the_standard_shapes_and_grayscale_is_accepted(random_inception):
    network = InceptionNetwork(random_inception, batch_size=10)
    features, logits = network(images(0, num=12))
    assert features.shape == (12, 2048) and logits.shape == (12, 1008)
    assert features.dtype == torch.float64 and torch.isfinite(features).all()
    gray = images(1, num=3)[:, :1]
    torch.testing.assert_close(network(gray)[0], network(gray.expand(-1, 3, -1, -1))[0])
    with pytest.raises(MetricsError, match=r"expected images of shape \(N, 1 or 3, H, W\); got \(3, 16, 16\)"):
        network(images(2, num=1)[0])


def test_fid_is_zero_for_equal_sets_grows_with_a_shift_and_matches_an_independent_computation(random_inception):
    network = InceptionNetwork(random_inception)
    real, _ = network(images(0))
    same = Statistics.of(real)
    assert abs(frechet_inception_distance(same, same)) < 1e-5 * np.trace(same.sigma)  # rank-deficient sigma
    # the rest on 256 of the 2048 features, to keep the matrix square roots quick
    part = slice(0, 256)
    other, _ = network(images(1))
    shifted, _ = network(images(1, brightness=0.3))
    reference = Statistics.of(real[:, part])
    near = frechet_inception_distance(Statistics.of(other[:, part]), reference)
    far = frechet_inception_distance(Statistics.of(shifted[:, part]), reference)
    assert 0 < near < far
    # torch-fidelity's eigenvalue route against scipy's sqrtm (dumo's own Fréchet distance)
    assert far == pytest.approx(frechet_distance(shifted[:, part], real[:, part]), rel=1e-4)


def test_statistics_round_trip_and_bad_files(random_inception, tmp_path):
    network = InceptionNetwork(random_inception)
    stats = Statistics.of(network(images(0))[0])
    stats.save(tmp_path / "ref.npz")
    loaded = Statistics.load(tmp_path / "ref.npz")
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.count == 24
    with pytest.raises(MetricsError, match="reference statistics not found"):
        Statistics.load(tmp_path / "none.npz")
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(MetricsError, match=r"not Inception pool statistics"):
        Statistics.load(tmp_path / "small.npz")
    np.savez(tmp_path / "other.npz", mean=np.zeros(3))
    with pytest.raises(MetricsError, match="has no 'mu' array"):
        Statistics.load(tmp_path / "other.npz")


def test_inception_score_on_analytic_logits():
    """Confident predictions spread evenly over K classes give IS = K; identical predictions give 1."""
    classes = torch.arange(1000) % 10
    confident = torch.nn.functional.one_hot(classes, 1008).double() * 60.0
    mean, std = inception_score(confident, splits=1)
    assert mean == pytest.approx(10.0, rel=1e-6) and std == 0
    mean, std = inception_score(confident)  # 10 shuffled splits: each split's classes are only nearly even
    assert 9 < mean <= 10 and std > 0
    assert inception_score(torch.zeros(1000, 1008))[0] == pytest.approx(1.0)


def test_weights_are_read_without_executing_code(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    crafted = tmp_path / "inception.pth"
    crafted.write_bytes(pickle.dumps({"fc.weight": Payload()}))
    with pytest.raises(MetricsError, match="is not a readable weights file"):
        read_weights(crafted)
    assert not marker.exists()
    with pytest.raises(MetricsError, match="Inception weights not found"):
        read_weights(tmp_path / "missing.pth")


def test_weights_of_another_network_are_refused_in_one_line(tmp_path):
    save_file({"layer.weight": torch.zeros(3, 3)}, tmp_path / "other.safetensors")
    with pytest.raises(MetricsError, match="does not hold Inception-v3 weights for FID"):
        InceptionNetwork(tmp_path / "other.safetensors")


def test_cli_fid_stats_fid_and_eval(random_inception, tmp_path):
    """dumo fid-stats on digits, a short digits run scored by dumo eval --inception and dumo fid."""
    run = tmp_path / "run"
    common = ["--set", "train.progress=false", "--set", "train.eval_samples=50"]
    tiny = ["--set", "train.steps=2", "--set", "model.depth=1", "--set", "model.hidden_dim=32", *common]
    assert dumo_cli("train", "configs/digits/dumo.yaml", "--out", run, *tiny).returncode == 0
    stats = dumo_cli(
        "fid-stats",
        "configs/digits/dumo.yaml",
        "--inception",
        random_inception,
        "--num",
        "40",
        "--out",
        tmp_path / "ref.npz",
    )
    assert stats.returncode == 0, stats.stderr
    assert "Inception statistics of 40 images" in stats.stdout
    evaluated = dumo_cli(
        "eval", run, "--nfe", "1", "--num", "20", "--inception", random_inception, "--ref", tmp_path / "ref.npz"
    )
    assert evaluated.returncode == 0, evaluated.stderr
    line = [x for x in evaluated.stdout.splitlines() if "NFE" in x][0]
    assert "domain FD" in line and "FID" in line and "IS" in line
    fid_in_eval = float(line.split("FID ")[1].split()[0])
    sampled = dumo_cli("sample", run, "--nfe", "1", "--num", "20", "--out", tmp_path / "s.npz")
    assert sampled.returncode == 0, sampled.stderr
    scored = dumo_cli("fid", tmp_path / "s.npz", "--ref", tmp_path / "ref.npz", "--inception", random_inception)
    assert scored.returncode == 0, scored.stderr
    assert float(scored.stdout.split("FID ")[1].split()[0]) == pytest.approx(fid_in_eval, abs=1e-3)
    missing = dumo_cli("fid", tmp_path / "s.npz", "--ref", tmp_path / "none.npz", "--inception", random_inception)
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
    assert "reference statistics not found" in missing.stderr

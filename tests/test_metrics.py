import math

import pytest
import torch

from dumo.errors import MetricsError
from dumo.metrics import mmd, sliced_wasserstein


def test_mmd_small_for_same_distribution_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, 2, generator=g), torch.randn(1000, 2, generator=g)
    same = mmd(a, b)
    shifted = [mmd(a, b + torch.tensor([d, 0.0])) for d in (0.25, 0.5, 1.0)]
    assert same < 0.06  # noise floor of 1000 vs 1000 points
    assert same < shifted[0] < shifted[1] < shifted[2]


def test_sliced_wasserstein_of_a_translation_matches_closed_form():
    # Translating by d moves every projection on direction theta by d . theta; averaged over
    # uniform directions in 2-D, E[(d . theta)^2] = |d|^2 / 2.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 2, generator=g)
    d = torch.tensor([0.6, -0.8])
    value = sliced_wasserstein(a, a + d, projections=4096)
    assert math.isclose(value, 1.0 / math.sqrt(2), rel_tol=0.03)
    assert sliced_wasserstein(a, a) == 0.0


def test_sliced_wasserstein_handles_different_sizes():
    g = torch.Generator().manual_seed(0)
    assert sliced_wasserstein(torch.randn(500, 2, generator=g), torch.randn(800, 2, generator=g)) < 0.15


# -- samples a metric cannot score: non-finite ones, too few -------------------------------------


def with_nonfinite_rows(samples: torch.Tensor, rows: int = 3) -> torch.Tensor:
    """``samples`` with its first rows NaN, +inf and -inf in turn (a diverged model's output)."""
    broken = samples.clone()
    for row in range(rows):
        broken[row, 0] = (float("nan"), float("inf"), float("-inf"))[row % 3]
    return broken


def fake_features(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in for the Inception network: 4 features and 3 logits per uint8 image."""
    flat = pixels.double().flatten(1) / 255
    return flat[:, :4], flat[:, 4:7]


def metric_calls():
    """(metric's name in its error, call on 50 samples (rows) whose first 3 are not finite)."""
    from dumo.metrics.classifier import frechet_distance
    from dumo.metrics.inception import Statistics, inception_score

    reference = torch.randn(60, 4, generator=torch.Generator().manual_seed(1))
    return [
        ("MMD", lambda x: mmd(x[:, :2], reference[:, :2])),
        ("SW", lambda x: sliced_wasserstein(x[:, :2], reference[:, :2])),
        ("domain FD", lambda x: frechet_distance(x, reference)),
        ("FID", lambda x: Statistics.of(x)),
        ("IS with 10 splits", lambda x: inception_score(x)),
    ]


@pytest.mark.parametrize("index", range(5), ids=["mmd", "sw", "domain-fd", "fid", "is"])
def test_every_metric_refuses_non_finite_samples_by_name(index):
    metric, score = metric_calls()[index]
    samples = with_nonfinite_rows(torch.randn(50, 4, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(MetricsError, match=rf"^{metric}: 3 of 50 (samples|images) are not finite \(NaN/inf\)"):
        score(samples)


@pytest.mark.parametrize(
    ("index", "count", "message"),
    [
        (0, 1, "MMD needs at least 2 samples; got 1"),
        (1, 0, "SW needs at least 1 sample; got 0"),
        (2, 1, "domain FD needs at least 2 samples; got 1"),
        (3, 1, "FID needs at least 2 images; got 1"),
        (4, 9, "IS with 10 splits needs at least 10 samples; got 9"),
    ],
    ids=["mmd", "sw", "domain-fd", "fid", "is"],
)
def test_every_metric_names_the_fewest_samples_it_needs(index, count, message):
    _, score = metric_calls()[index]
    with pytest.raises(MetricsError, match=f"^{message}$"):
        score(torch.randn(count, 4))


def test_streamed_fid_and_is_refuse_non_finite_images_instead_of_scoring_them_black():
    from dumo.distributed import Distributed
    from dumo.metrics.fid_stats import StreamingScores

    images = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    streamed = StreamingScores(fake_features, 8, 4, 3)
    streamed.add(images[:4], torch.arange(4))
    broken = images[4:].clone()
    broken[1, 0, 0, 0] = float("nan")
    streamed.add(broken, torch.arange(4, 8))
    streamed.reduce(Distributed())
    with pytest.raises(MetricsError, match=r"^FID and IS: 1 of 8 samples are not finite"):
        streamed.scores(None)
    with pytest.raises(MetricsError, match="^FID needs at least 2 samples; got 1$"):
        StreamingScores(fake_features, 1, 4, 3)  # before any sample is drawn


def test_scorers_refuse_too_few_samples_before_drawing_any():
    from dumo.data.toy import Moons
    from dumo.evaluation import toy_scorer

    with pytest.raises(MetricsError, match="^MMD needs at least 2 samples; got 1$"):
        toy_scorer(Moons(), 1)


def test_training_goes_on_when_a_metric_refuses_the_samples(tmp_path, monkeypatch, capsys):
    from conftest import MOONS_CONFIG, TINY_MOONS

    import dumo.training.periodic as periodic_module
    from dumo.config import load_config
    from dumo.training import Trainer

    def refuse(*args, **kwargs):
        raise MetricsError("MMD: 100 of 100 samples are not finite (NaN/inf)")

    monkeypatch.setattr(periodic_module, "evaluate", refuse)
    result = Trainer(load_config(MOONS_CONFIG, [*TINY_MOONS, "train.steps=2"]), tmp_path / "run").run()
    assert result.step == 2 and result.metrics == {}
    assert "dumo: warning: step 2: no scores: MMD: 100 of 100 samples are not finite" in capsys.readouterr().err

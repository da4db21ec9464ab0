"""FID and Inception Score from images seen a batch at a time, on any number of ranks.

50,000 ImageNet-size samples are 9.8 GB as uint8 and 39 GB as float32: no process has to hold
them. Each rank passes its own images through the network batch by batch and keeps only

- for FID: the count, the sum and the sum of outer products of the pool features, in float64;
  the mean and the (n - 1)-normalised covariance follow, as ``np.cov`` gives them;
- for the Inception Score: per split, the count, the sum of p(y|x) and the sum of
  sum_y p log p, from which each split's exp(E_x KL(p(y|x) || p(y))) follows exactly.

These sums are added over ranks (``Distributed.sum``), so the scores do not depend on how the
images were shared among ranks, up to the float64 rounding of the sums. Which split a sample
falls in is decided by its global index with torch-fidelity's own shuffle, so the Inception
Score equals torch-fidelity's ``isc_features_to_metric`` on the same logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from dumo.distributed import Distributed
from dumo.metrics.checks import count_nonfinite, nonfinite_message
from dumo.metrics.inception import (
    FEATURE_DIM,
    LOGITS_DIM,
    InceptionNetwork,
    MetricsError,
    Statistics,
    frechet_inception_distance,
    to_uint8,
)

#: uint8 images (N, C, H, W) -> (pool features (N, D), class logits (N, K)), both on one device
FeatureNetwork = Callable[[Tensor], tuple[Tensor, Tensor]]

IS_SPLITS = 10
IS_SHUFFLE_SEED = 2020  # torch-fidelity's isc_features_to_metric(shuffle=True, rng_seed=2020)


class FeatureMoments:
    """Running count, sum and sum of outer products (float64) of feature vectors."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: Tensor) -> None:
        features = features.to(self.total.device, torch.float64)
        self.count += features.shape[0]
        self.total += features.sum(0)
        self.outer.addmm_(features.T, features)

    def reduce(self, dist: Distributed) -> None:
        """Replace this rank's sums by the sums over all ranks."""
        self.count, self.total, self.outer = dist.sum(self.count), dist.sum(self.total), dist.sum(self.outer)

    def statistics(self) -> Statistics:
        count = int(self.count)
        if count < 2:
            raise MetricsError(f"FID needs at least 2 images; got {count}")
        mu = self.total / count
        sigma = (self.outer - count * torch.outer(mu, mu)) / (count - 1)
        return Statistics(mu.cpu().numpy(), sigma.cpu().numpy(), count)


def split_of_samples(num: int, splits: int, seed: int = IS_SHUFFLE_SEED) -> Tensor:
    """The Inception Score split of each of ``num`` samples, by global index.

    torch-fidelity shuffles the logits with ``RandomState(seed).permutation(num)`` and cuts the
    shuffled order at ``i * num // splits``; the sample at shuffled position k is ``order[k]``.
    """
    order = np.random.RandomState(seed).permutation(num)
    position = np.empty(num, dtype=np.int64)
    position[order] = np.arange(num)
    bounds = np.array([i * num // splits for i in range(splits + 1)])
    return torch.from_numpy(np.searchsorted(bounds, position, side="right") - 1)


class ScoreSplits:
    """Per-split sums from which the Inception Score of ``num`` samples follows.

    With fewer samples than splits, each sample is its own split (torch-fidelity would average
    over empty splits and return NaN).
    """

    def __init__(self, num: int, classes: int, splits: int = IS_SPLITS, device: torch.device | str = "cpu"):
        self.num, self.splits = num, min(splits, num)
        self.split_of = split_of_samples(num, self.splits).to(device)
        self.count = torch.zeros(self.splits, dtype=torch.float64, device=device)
        self.p_sum = torch.zeros(self.splits, classes, dtype=torch.float64, device=device)
        self.p_log_p = torch.zeros(self.splits, dtype=torch.float64, device=device)

    def update(self, indices: Tensor, logits: Tensor) -> None:
        """Add the logits of the samples with global ``indices`` (0 <= index < num)."""
        logits = logits.to(self.p_sum.device, torch.float64)
        indices = indices.to(self.split_of.device)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num):
            raise MetricsError(f"sample indices must lie in [0, {self.num}); got {indices.min()}..{indices.max()}")
        split = self.split_of[indices]
        p, log_p = logits.softmax(1), logits.log_softmax(1)
        self.count.index_add_(0, split, torch.ones_like(split, dtype=torch.float64))
        self.p_sum.index_add_(0, split, p)
        self.p_log_p.index_add_(0, split, (p * log_p).sum(1))

    def reduce(self, dist: Distributed) -> None:
        """Replace this rank's sums by the sums over all ranks."""
        self.count, self.p_sum, self.p_log_p = dist.sum(self.count), dist.sum(self.p_sum), dist.sum(self.p_log_p)

    def score(self) -> tuple[float, float]:
        """Mean and (population) standard deviation over the splits of exp(E KL(p(y|x) || p(y)))."""
        if bool((self.count == 0).any()):
            raise MetricsError(f"the Inception Score saw {int(self.count.sum())} of its {self.num} samples")
        marginal = self.p_sum / self.count[:, None]
        # E_x KL(p(y|x) || p(y)) = E_x sum_y p log p - sum_y p(y) log p(y): p(y) is the split's mean p(y|x)
        kl = self.p_log_p / self.count - torch.xlogy(marginal, marginal).sum(1)
        scores = kl.exp().cpu().numpy()
        return float(np.mean(scores)), float(np.std(scores))


class StreamingScores:
    """FID moments and Inception Score splits of ``num`` images fed a batch at a time.

    ``network`` maps uint8 images to ``feature_dim`` features and ``classes`` logits per image.
    ``add`` takes uint8 images (N, C, H, W) and their global sample indices; ``reduce`` adds up
    all ranks' sums (every rank must call it, also one that saw no image); ``scores`` then gives
    FID against a reference and the Inception Score, the same on every rank.

    ``add`` also takes float images in [0, 1]: their non-finite ones (which 8-bit pixels would
    hide as black) are counted instead of scored, and ``scores`` refuses them by number.
    """

    def __init__(
        self,
        network: FeatureNetwork,
        num: int,
        feature_dim: int,
        classes: int,
        device: torch.device | str = "cpu",
        splits: int = IS_SPLITS,
    ):
        if num < 2:  # refused before any sample is drawn, not after
            raise MetricsError(f"FID needs at least 2 samples; got {num}")
        self.network, self.num = network, num
        self.moments = FeatureMoments(feature_dim, device)
        self.score_splits = ScoreSplits(num, classes, splits, device)
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, pixels: Tensor, indices: Tensor) -> None:
        """Score uint8 images (N, C, H, W), or float images in [0, 1], with their global sample indices."""
        if pixels.is_floating_point():
            finite = pixels.reshape(pixels.shape[0], -1).isfinite().all(dim=1)
            self.nonfinite += count_nonfinite(pixels)
            pixels, indices = to_uint8(pixels[finite]), indices[finite.to(indices.device)]
        if pixels.dtype != torch.uint8:
            raise MetricsError(f"expected uint8 images; got {pixels.dtype}")
        features, logits = self.network(pixels)
        self.moments.update(features)
        self.score_splits.update(indices, logits)

    def reduce(self, dist: Distributed) -> None:
        self.moments.reduce(dist)
        self.score_splits.reduce(dist)
        self.nonfinite = dist.sum(self.nonfinite)

    def check_finite(self, metric: str) -> None:
        bad = int(self.nonfinite)
        if bad:
            raise MetricsError(nonfinite_message(metric, bad, self.num))

    def statistics(self) -> Statistics:
        self.check_finite("FID")
        return self.moments.statistics()

    def scores(self, reference: Statistics) -> dict[str, float]:
        """FID against ``reference`` and the Inception Score (mean, std) of all images added."""
        self.check_finite("FID and IS")
        is_mean, is_std = self.score_splits.score()
        fid = frechet_inception_distance(self.statistics(), reference)
        return {"fid": fid, "is": is_mean, "is_std": is_std}


def inception_scores(network: InceptionNetwork, num: int, splits: int = IS_SPLITS) -> StreamingScores:
    """FID and IS of ``num`` images through torch-fidelity's Inception-v3, summed on its device."""
    return StreamingScores(network.embed, num, FEATURE_DIM, LOGITS_DIM, network.device, splits)


def rank_batches(count: int, batch_size: int, dist: Distributed) -> Iterator[slice]:
    """Batches r, r + W, r + 2W, ... of ``count`` items: this rank's share of a file or a dataset."""
    for start in range(dist.rank * batch_size, count, dist.world_size * batch_size):
        yield slice(start, min(start + batch_size, count))


def image_statistics(inception, count: int, pixels, dist, batch_size: int):
    """Inception statistics of ``count`` images, ``pixels(slice)`` giving uint8 batches; each rank
    embeds its own batches and the sums are added over ranks."""
    from dumo.metrics.inception import FEATURE_DIM

    moments = FeatureMoments(FEATURE_DIM, inception.device)
    for part in rank_batches(count, batch_size, dist):
        moments.update(inception.embed(pixels(part))[0])
    moments.reduce(dist)
    return moments.statistics()

"""FID and Inception Score, computed by torch-fidelity from its Inception-v3 (the TensorFlow FID network).

Nothing is downloaded: the Inception weights come from a local file the user names, either
torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` or the same tensors as
``.safetensors``. They are read without executing code (safetensors, or ``torch.load`` with
``weights_only=True``), so a tampered file cannot run anything.

Reference statistics are ``.npz`` files holding ``mu`` (2048,) and ``sigma`` (2048, 2048), the
layout pytorch-fid and torch-fidelity use, so statistics from either can be compared against.
Images enter as float tensors in [0, 1] of shape (N, C, H, W) with C = 1 or 3; they are rounded
to 8 bits (as a PNG would store them) and resized by the network to 299x299.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dumo.errors import MetricsError
from dumo.metrics.checks import check_samples

FEATURES = "2048"  # pool features, for FID
LOGITS = "logits_unbiased"  # class logits, for the Inception Score
FEATURE_DIM = 2048
LOGITS_DIM = 1008  # the TensorFlow Inception's 1008 classes (1000 of ImageNet, 8 unused)


def to_uint8(images: Tensor) -> Tensor:
    """Images in [0, 1] rounded to 8 bits (round half to even, as ``np.round``), on their device."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def _torch_fidelity():
    try:
        import torch_fidelity  # noqa: F401  (imports torchvision)
    except ImportError as error:
        raise MetricsError(
            f"FID and IS need torch-fidelity and torchvision ({error}); install them with "
            "'pip install torch-fidelity' and a torchvision matching your torch"
        ) from None
    from torch_fidelity import metric_fid, metric_isc
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3, metric_fid, metric_isc


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a tensors-only ``.pth``/``.pt``; one-line errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"Inception weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  (any reader failure is the same user problem)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MetricsError(f"{path} is not a readable weights file ({first_line})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise MetricsError(f"{path} does not hold a state dict of tensors")
    return state


class InceptionNetwork:
    """torch-fidelity's Inception-v3 with weights from ``weights``; gives pool features and logits."""

    def __init__(self, weights: str | Path, device: torch.device | str = "cpu", batch_size: int = 100):
        feature_extractor, _, _ = _torch_fidelity()
        state = read_weights(weights)
        # torch-fidelity reads its weights from a path with a full unpickler, so it is handed a file
        # that dumo wrote itself from tensors already read safely.
        with tempfile.TemporaryDirectory() as folder:
            checked = Path(folder) / "inception.pth"
            torch.save(state, checked)
            try:
                self.network = feature_extractor(
                    "inception-v3-compat", [FEATURES, LOGITS], feature_extractor_weights_path=str(checked)
                )
            except RuntimeError as error:
                detail = str(error).strip().splitlines()[0]
                raise MetricsError(f"{weights} does not hold Inception-v3 weights for FID ({detail})") from None
        self.network.to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Pool features (N, 2048) and logits (N, 1008) of images in [0, 1], float64 on the CPU."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise MetricsError(f"expected images of shape (N, 1 or 3, H, W); got {tuple(images.shape)}")
        check_samples(images, "FID and IS", what="images")  # 8-bit pixels would hide a NaN as 0
        features, logits = [], []
        for start in range(0, images.shape[0], self.batch_size):
            chunk = images[start : start + self.batch_size]
            pool, logit = self.embed(to_uint8(chunk))
            features.append(pool.cpu())
            logits.append(logit.cpu())
        return torch.cat(features), torch.cat(logits)

    @torch.no_grad()
    def embed(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Pool features (N, 2048) and logits (N, 1008), float64 on the network's device, of uint8
        images (N, 1 or 3, H, W), ``batch_size`` at a time."""
        if pixels.dim() != 4 or pixels.shape[1] not in (1, 3) or pixels.dtype != torch.uint8:
            raise MetricsError(
                f"expected uint8 images of shape (N, 1 or 3, H, W); got {pixels.dtype} {tuple(pixels.shape)}"
            )
        features, logits = [], []
        for start in range(0, pixels.shape[0], self.batch_size):
            chunk = pixels[start : start + self.batch_size].to(self.device)
            if chunk.shape[1] == 1:
                chunk = chunk.expand(-1, 3, -1, -1)
            with full_float32():
                pool, logit = self.network(chunk)
            features.append(pool.double())
            logits.append(logit.double())
        return torch.cat(features), torch.cat(logits)


@contextlib.contextmanager
def full_float32():
    """Convolutions and matrix products in full float32, not TF32 (cuDNN's default for convolutions
    on Ampere and later GPUs): Inception features, and so FID, then do not depend on the GPU."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


@dataclass(frozen=True)
class Statistics:
    """Mean and covariance of Inception pool features."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    @classmethod
    def of(cls, features: Tensor) -> Statistics:
        check_samples(features, "FID", minimum=2, what="images")  # a covariance needs two
        _, metric_fid, _ = _torch_fidelity()
        stats = metric_fid.fid_features_to_statistics(features.double().cpu())
        return cls(stats["mu"], stats["sigma"], features.shape[0])

    def save(self, path: str | Path) -> None:
        np.savez(path, mu=self.mu, sigma=self.sigma, count=np.int64(self.count))

    @classmethod
    def load(cls, path: str | Path) -> Statistics:
        path = Path(path)
        if not path.is_file():
            raise MetricsError(f"reference statistics not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [key for key in ("mu", "sigma") if key not in data.files]
                if missing:
                    raise MetricsError(f"{path} has no {missing[0]!r} array; expected 'mu' and 'sigma'")
                mu, sigma = data["mu"], data["sigma"]
                count = int(data["count"]) if "count" in data.files else -1
        except (ValueError, OSError) as error:
            raise MetricsError(f"{path} is not a readable .npz file ({error})") from None
        if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
            raise MetricsError(
                f"{path}: mu {mu.shape} and sigma {sigma.shape} are not Inception pool statistics "
                f"(expected ({FEATURE_DIM},) and ({FEATURE_DIM}, {FEATURE_DIM}))"
            )
        return cls(mu.astype(np.float64), sigma.astype(np.float64), count)


def frechet_inception_distance(a: Statistics, b: Statistics) -> float:
    for statistics, which in ((a, "the samples' features"), (b, "the reference statistics")):
        if not (np.isfinite(statistics.mu).all() and np.isfinite(statistics.sigma).all()):
            raise MetricsError(f"FID: the mean or covariance of {which} is not finite (NaN/inf)")
    _, metric_fid, _ = _torch_fidelity()
    stat_a = {"mu": a.mu.astype(np.float64), "sigma": a.sigma.astype(np.float64)}
    stat_b = {"mu": b.mu.astype(np.float64), "sigma": b.sigma.astype(np.float64)}
    return metric_fid.fid_statistics_to_metric(stat_a, stat_b, verbose=False)[metric_fid.KEY_METRIC_FID]


def inception_score(logits: Tensor, splits: int = 10) -> tuple[float, float]:
    """Mean and standard deviation over ``splits`` of exp(E KL(p(y|x) || p(y)))."""
    # torch-fidelity averages over empty splits (NaN) when there are fewer samples than splits
    check_samples(logits, f"IS with {splits} splits", minimum=splits)
    _, _, metric_isc = _torch_fidelity()
    result = metric_isc.isc_features_to_metric(logits.double().cpu(), splits=splits)
    return result[metric_isc.KEY_METRIC_ISC_MEAN], result[metric_isc.KEY_METRIC_ISC_STD]


def score_images(network: InceptionNetwork, images: Tensor, reference: Statistics) -> dict[str, float]:
    """FID against ``reference`` and the Inception Score (mean, std) of ``images`` in [0, 1]."""
    features, logits = network(images)
    is_mean, is_std = inception_score(logits, min(10, len(logits)))  # as the streamed score: a split per sample
    return {"fid": frechet_inception_distance(Statistics.of(features), reference), "is": is_mean, "is_std": is_std}

"""Drawing samples from a trained model and scoring them against the data."""

from __future__ import annotations

import hashlib
import math
import sys
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dumo.config import SampleConfig
from dumo.data import DataError, Dataset, ImageDataset, LatentDataset, ToyDataset
from dumo.distributed import Distributed
from dumo.metrics import mmd, sliced_wasserstein
from dumo.metrics.classifier import frechet_distance, train_classifier
from dumo.samplers import GuidedModel, check_times, null_label, sample

#: the sampler each objective's model is meant for
DEFAULT_SAMPLER = {"dumo": "flow_map", "meanflow": "meanflow", "fm": "euler"}
REFERENCE_SEED = 1_000_003  # reference points are drawn apart from any training seed


def sampler_for(objective_name: str, method: str = "auto") -> str:
    return DEFAULT_SAMPLER[objective_name] if method == "auto" else method


def schedule(nfe: int, config: SampleConfig) -> list[float]:
    """k-step times ``t_start * (1 - i/k)^power`` for i = 0..k-1."""
    return check_times([config.t_start * (1 - i / nfe) ** config.schedule_power for i in range(nfe)])


def balanced_labels(num: int, num_classes: int, device: torch.device | str = "cpu") -> Tensor | None:
    """Labels 0, 1, ..., C-1, 0, 1, ... (None for an unconditional model)."""
    if num_classes == 0:
        return None
    return torch.arange(num, device=device) % num_classes


def generate(
    model: nn.Module,
    objective_name: str,
    shape: Sequence[int],
    nfe: int,
    config: SampleConfig,
    seed: int = 0,
    labels: Tensor | None = None,
    method: str = "auto",
    times: Sequence[float] | None = None,
    device: torch.device | str = "cpu",
    path: list[Tensor] | None = None,
) -> Tensor:
    """Samples (in the model's standardised space) from noise drawn with ``seed``.

    ``path``, if given, receives the sampler's states in order, from the noise to the samples.
    """
    method = sampler_for(objective_name, method if method != "auto" else config.method)
    if config.guidance_scale != 1.0 and labels is not None:
        model = GuidedModel(model, config.guidance_scale, null_label(model))
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(tuple(shape), generator=generator).to(device)
    if times is None and method in ("flow_map", "meanflow"):
        times = schedule(nfe, config)
    return sample(
        model,
        noise,
        nfe,
        method,
        labels=labels,
        times=times,
        t_start=config.t_start,
        stochasticity=config.stochasticity,
        generator=generator,
        path=path,
    )


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of samples [chunk * B, (chunk + 1) * B): a hash of (seed, chunk).

    Any arithmetic mix of the two meets itself somewhere (seed 3 chunk 0 was seed 0 chunk 3, so
    the samples of --seed 3 repeated part of --seed 0's); distinct pairs give distinct hashes.
    """
    digest = hashlib.sha256(f"dumo-samples:{seed}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: torch.Generator takes it as is


def generate_many(
    model: nn.Module,
    objective_name: str,
    shape: Sequence[int],
    nfe: int,
    config: SampleConfig,
    seed: int = 0,
    labels: Tensor | None = None,
    method: str = "auto",
    times: Sequence[float] | None = None,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    dist: Distributed | None = None,
) -> Tensor:
    """``shape[0]`` samples drawn ``batch_size`` at a time, split over the ranks of ``dist``.

    Chunk c (samples c*B to c*B + B - 1) always gets the noise of ``chunk_seed(seed, c)``, and
    rank r draws chunks r, r + W, r + 2W, ...; the chunks are gathered on every rank in order.
    So the samples depend on the seed and batch size, not on the number of processes. With no
    batch size all samples are one chunk. Sampling that takes long reports its progress on stderr.
    """
    num, *sample_shape = shape
    dist = dist or Distributed()
    batch = min(batch_size or num, num)  # the buffer holds at most the samples asked for
    chunks = math.ceil(num / batch)
    mine = list(range(dist.rank, chunks, dist.world_size))
    per_rank = math.ceil(chunks / dist.world_size)
    local = torch.zeros((per_rank, batch, *sample_shape), device=device)
    report = SamplingProgress(len(mine), enabled=dist.is_main)
    for slot, chunk in enumerate(mine):
        start, stop = chunk * batch, min((chunk + 1) * batch, num)
        part = None if labels is None else labels[start:stop]
        local[slot, : stop - start] = generate(
            model,
            objective_name,
            (stop - start, *sample_shape),
            nfe,
            config,
            chunk_seed(seed, chunk),
            part,
            method,
            times,
            device,
        )
        report.done(slot + 1)
    gathered = dist.gather_all(local)  # (world, per_rank, batch, ...): rank r's slot s is chunk s*W + r
    ordered = gathered.transpose(0, 1).reshape(-1, *sample_shape)
    return ordered[:num]


class SamplingProgress:
    """A line on stderr every ``every`` seconds while chunks are drawn (silent for quick jobs)."""

    def __init__(self, total: int, enabled: bool = True, every: float = 10.0):
        self.total, self.enabled, self.every = total, enabled, every
        self.started = self.last = time.perf_counter()

    def done(self, count: int) -> None:
        now = time.perf_counter()
        if self.enabled and count < self.total and now - self.last >= self.every:
            self.last = now
            left = (now - self.started) / count * (self.total - count)
            print(f"sampling: {count}/{self.total} batches, about {left:.0f} s left", file=sys.stderr, flush=True)


def reference_points(dataset: ToyDataset, num: int) -> Tensor:
    points, _ = dataset.sample(num, torch.Generator().manual_seed(REFERENCE_SEED))
    return dataset.standardise(points)


def toy_scorer(dataset: ToyDataset, num: int):
    """MMD and sliced Wasserstein against fresh data, on standardised coordinates."""
    reference = reference_points(dataset, num)

    def score(x: Tensor, labels: Tensor | None) -> dict[str, float]:
        points = x.cpu()
        return {"mmd": mmd(points, reference), "sw": sliced_wasserstein(points, reference)}

    return score


def reference_images(dataset: ImageDataset, num: int) -> Tensor:
    """``num`` training images in [0, 1]: a fixed random subset, apart from any training seed."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(REFERENCE_SEED))
    return dataset.images[order[:num]]


def image_scorer(dataset: ImageDataset, num: int):
    """Domain Fréchet distance in the features of a small classifier trained on ``dataset`` and, for
    class-conditional samples, class fidelity: the classifier's accuracy on the requested labels."""
    if isinstance(dataset, LatentDataset):
        raise DataError("domain metrics need pixel data; score latent runs on decoded samples (dumo sample .npz)")
    classifier = train_classifier(dataset.images, dataset.labels, dataset.num_classes)
    real_features, _ = classifier.embed(reference_images(dataset, num))

    def score(x: Tensor, labels: Tensor | None) -> dict[str, float]:
        features, logits = classifier.embed(dataset.unstandardise(x).cpu())
        scores = {"fd": frechet_distance(features, real_features)}
        if labels is not None:
            scores["fidelity"] = float((logits.argmax(1) == labels.cpu()).float().mean())
        return scores

    return score


def evaluate(
    model: nn.Module,
    objective_name: str,
    dataset: Dataset,
    config: SampleConfig,
    nfes: Sequence[int] = (1, 2),
    num: int = 2000,
    seed: int = 0,
    num_classes: int = 0,
    method: str = "auto",
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """The dataset's own metrics of ``num`` samples at each NFE, keyed like ``mmd_1nfe``:
    MMD and sliced Wasserstein for 2-D data, domain FD and class fidelity for images."""
    score = toy_scorer(dataset, num) if isinstance(dataset, ToyDataset) else image_scorer(dataset, num)
    labels = balanced_labels(num, num_classes, device)
    results = {}
    for nfe in nfes:
        x = generate(model, objective_name, (num, *dataset.shape), nfe, config, seed, labels, method, device=device)
        results.update({f"{name}_{nfe}nfe": value for name, value in score(x, labels).items()})
    return results

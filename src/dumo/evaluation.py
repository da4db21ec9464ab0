"""Scoring samples against the data (drawn with :mod:`dumo.sampling`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dumo.config import SampleConfig
from dumo.data import DataError, Dataset, ImageDataset, LatentDataset, Prompts, ShapesWorld, ToyDataset
from dumo.errors import MetricsError
from dumo.metrics import mmd, sliced_wasserstein
from dumo.metrics.classifier import frechet_distance, train_classifier
from dumo.sampling import balanced_labels, generate

REFERENCE_SEED = 1_000_003  # reference points are drawn apart from any training seed


def reference_points(dataset: ToyDataset, num: int) -> Tensor:
    points, _ = dataset.sample(num, torch.Generator().manual_seed(REFERENCE_SEED))
    return dataset.standardise(points)


def toy_scorer(dataset: ToyDataset, num: int):
    """MMD and sliced Wasserstein against fresh data, on standardised coordinates."""
    if num < 2:  # refused before any sample is drawn
        raise MetricsError(f"MMD needs at least 2 samples; got {num}")
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
    if num < 2:  # refused before the classifier is trained or any sample drawn
        raise MetricsError(f"domain FD needs at least 2 samples; got {num}")
    classifier = train_classifier(dataset.images, dataset.labels, dataset.num_classes)
    real_features, _ = classifier.embed(reference_images(dataset, num))

    def score(x: Tensor, labels: Tensor | None) -> dict[str, float]:
        features, logits = classifier.embed(dataset.unstandardise(x).cpu())
        scores = {"fd": frechet_distance(features, real_features)}
        if labels is not None:
            scores["fidelity"] = float((logits.argmax(1) == labels.cpu()).float().mean())
        return scores

    return score


def shapes_accuracy(
    model: nn.Module,
    objective_name: str,
    world: ShapesWorld,
    prompts: Prompts,
    config: SampleConfig,
    nfes: Sequence[int] = (1, 2),
    seed: int = 0,
    method: str = "auto",
    device: torch.device | str = "cpu",
    per_prompt: int = 1,
) -> dict[str, float]:
    """The shapes judge's overall accuracy on ``per_prompt`` samples of each evaluation prompt of
    ``world`` (its held-out pairs), at each NFE, keyed ``seen_1nfe`` and ``held_out_1nfe`` (the
    prompts that name no held-out pair, and those that do)."""
    from dumo.data.shapes import evaluation_prompts
    from dumo.metrics.shapes import judge

    if per_prompt < 1:
        raise ValueError(f"per_prompt must be >= 1; got {per_prompt}")
    chosen = evaluation_prompts(world.held_out)
    texts = [text for text in chosen.seen + chosen.held_out for _ in range(per_prompt)]
    cond = prompts.condition(texts).to(device)
    results = {}
    for nfe in nfes:
        x = generate(model, objective_name, (len(texts), *world.shape), nfe, config, seed, cond, method, device=device)
        images = world.unstandardise(x.cpu()).permute(0, 2, 3, 1).numpy()
        report = judge(images, texts, world.held_out)
        for split in ("seen", "held_out"):
            accuracy = report.accuracy(split)
            if accuracy is not None:
                results[f"{split}_{nfe}nfe"] = accuracy
    return results


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
    prompts: Prompts | None = None,
) -> dict[str, float]:
    """The dataset's own metrics of ``num`` samples at each NFE, keyed like ``mmd_1nfe``:
    MMD and sliced Wasserstein for 2-D data, domain FD and class fidelity for images; for the
    shapes world (``prompts`` encodes them) the judge's accuracy on its evaluation prompts
    (:func:`shapes_accuracy`; ``num`` does not apply); captioned images are not scored."""
    if isinstance(dataset, ShapesWorld):
        if prompts is None:
            raise ValueError("scoring the shapes world needs the run's prompt encoding")
        return shapes_accuracy(model, objective_name, dataset, prompts, config, nfes, seed, method, device)
    if prompts is not None:
        return {}
    score = toy_scorer(dataset, num) if isinstance(dataset, ToyDataset) else image_scorer(dataset, num)
    labels = balanced_labels(num, num_classes, device)
    results = {}
    for nfe in nfes:
        x = generate(model, objective_name, (num, *dataset.shape), nfe, config, seed, labels, method, device=device)
        results.update({f"{name}_{nfe}nfe": value for name, value in score(x, labels).items()})
    return results

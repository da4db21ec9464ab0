"""Sampling a loaded run from Python: samples in memory or streamed chunk by chunk, and images read
back from samples files or from a run's data (what ``dumo sample``, ``dumo eval`` and ``dumo fid`` do).

    from dumo.runs.loading import load_run
    from dumo.runs.generation import generate_from_run

    run = load_run("runs/moons")
    labels, samples = generate_from_run(run, nfe=1, num=1000)  # the model's own sampler
    points = run.space.unstandardise(samples)
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from dumo.errors import SamplingError  # defined beside dumo's other errors; imported from here too


def check_memory(nbytes: int, what: str) -> None:
    """Refuse work whose arrays alone would not fit in this machine's memory (instead of a traceback
    from the allocator, or swapping, after minutes of work)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if nbytes > total:
        raise SamplingError(
            f"{what} need {nbytes / 1e9:.1f} GB, more than this machine's {total / 1e9:.1f} GB of memory"
        )


def sample_labels(run, num: int, class_label: int | None):
    """One class for all samples, or balanced over the classes (None for an unconditional model)."""
    import torch

    from dumo.sampling import balanced_labels

    if class_label is not None:
        return torch.full((num,), class_label, dtype=torch.long)
    return balanced_labels(num, run.num_classes)


def generate_from_run(
    run,
    nfe: int = 1,
    num: int = 64,
    seed: int = 0,
    method: str = "auto",
    times=None,
    class_label: int | None = None,
    batch_size: int = 256,
    dist=None,
    prompts=None,
):
    """(labels, samples) of a :class:`~dumo.runs.loading.LoadedRun`: ``num`` samples in its model space
    (``run.space.unstandardise`` maps them to data), ``nfe`` network evaluations each, with the
    objective's own sampler for ``method`` auto; labels of one class or balanced over the classes
    (None: unconditional), or with ``prompts`` (a text-conditioned model) one sample per prompt, conditioned
    on it (the labels returned are then the prompts' TextCondition). Under torchrun (``dist``) split over
    ranks and gathered on each (for what is small: pictures, 2-D points; image files and Inception scores
    are streamed by :func:`stream_from_run`)."""
    from dumo.sampling import generate_many

    labels = sample_labels(run, num, class_label) if prompts is None else run.prompt_condition(prompts)
    if prompts is not None and len(prompts) != num:
        raise SamplingError(f"{len(prompts)} prompts for {num} samples: give one prompt per sample")
    size = math.prod(run.space.shape) * 4
    check_memory(2 * num * size, f"{num} samples of shape {'x'.join(map(str, run.space.shape))}")
    check_memory(8 * min(batch_size, num) * size, f"batches of {min(batch_size, num)} samples (--batch-size)")
    try:
        points = generate_many(
            run.model,
            run.objective_name,
            (num, *run.space.shape),
            nfe,
            run.config.sample,
            seed,
            None if labels is None else labels.to(run.device),
            method,
            times,
            device=run.device,
            batch_size=batch_size,
            dist=dist,
        )
    except ValueError as error:  # bad schedule or sampler choice
        raise SamplingError(str(error)) from None
    return labels, points.cpu()


def stream_from_run(
    run,
    nfe: int,
    num: int,
    seed: int,
    method: str,
    times,
    labels,
    batch_size: int,
    decode_batch: int,
    dist,
    image_sinks=(),
    chunk_sinks=(),
) -> None:
    """Draw this rank's chunks of ``num`` samples and hand each chunk (model space) to every
    ``chunk_sinks(chunk)``, and its images, decoded ``decode_batch`` at a time on this rank's
    device, to every ``image_sinks(first_index, images in [0, 1], uint8 pixels)``.

    No rank holds more than one chunk of samples and one decode batch of float images at a time.
    """
    from dumo.metrics.inception import to_uint8
    from dumo.sampling import decoded_batches, sample_chunks

    size = math.prod(run.space.shape) * 4
    check_memory(8 * min(batch_size, num) * size, f"batches of {min(batch_size, num)} samples (--batch-size)")
    chunks = sample_chunks(
        run.model,
        run.objective_name,
        (num, *run.space.shape),
        nfe,
        run.config.sample,
        seed,
        None if labels is None else labels.to(run.device),
        method,
        times,
        device=run.device,
        batch_size=batch_size,
        dist=dist,
    )
    while True:
        try:
            chunk = next(chunks)
        except StopIteration:
            return
        except ValueError as error:  # bad schedule or sampler choice
            raise SamplingError(str(error)) from None
        for sink in chunk_sinks:
            sink(chunk)
        if image_sinks:
            for first, images in decoded_batches(run.space, chunk, decode_batch):
                pixels = to_uint8(images)
                for sink in image_sinks:
                    sink(first, images, pixels)
                del images, pixels  # one decode batch at a time


def image_shape(run) -> tuple[int, int, int]:
    """(C, H, W) of the decoded images: the autoencoder's output for a latent model."""
    if run.space.kind != "latents":
        return tuple(run.space.shape)
    import torch

    from dumo.sampling import Chunk, decoded_batches

    # the decoder's output size for a latent size is its own business: decode one zero latent to see it
    probe = Chunk(0, 0, 1, torch.zeros((1, *run.space.shape), device=run.device), None)
    _, image = next(decoded_batches(run.space, probe, 1))
    return tuple(image.shape[1:])


def read_pixels(source: str, num: int | None):
    """The number of images and a reader of uint8 (N, C, H, W) batches by slice, from a samples .npz
    (memory-mapped 'arr_0' (N, H, W, C) uint8, else 'images' (N, C, H, W) in [0, 1]) or from the
    dataset of a config or run (its images in [0, 1], a fixed random subset of ``num``)."""
    import zipfile

    import torch

    from dumo.config import load_config
    from dumo.data import ImageDataset, LatentDataset, build_dataset
    from dumo.errors import MetricsError
    from dumo.metrics.checks import count_nonfinite
    from dumo.metrics.inception import to_uint8
    from dumo.runs.layout import CONFIG_FILE
    from dumo.runs.sample_files import open_npz_array

    path = Path(source)
    if path.suffix == ".npz":
        if not path.is_file():
            raise SamplingError(f"samples file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                keys = set(data.files)
            array = open_npz_array(path, "arr_0") if "arr_0" in keys else None
            uint8 = array is not None and array.dtype == np.uint8 and array.ndim == 4
            if not uint8 and "images" in keys:
                array = open_npz_array(path, "images")
        except (ValueError, OSError, KeyError, zipfile.BadZipFile) as error:
            raise SamplingError(f"{path} is not a readable .npz file ({error})") from None
        channels = -1 if array is None or array.ndim != 4 else array.shape[3 if uint8 else 1]
        if channels not in (1, 3) or not (uint8 or array.dtype.kind == "f"):
            raise SamplingError(
                f"{path} has neither a uint8 'arr_0' (N, H, W, C) nor 'images' (N, C, H, W) in [0, 1], with C = 1 or "
                "3; write one with 'dumo sample ... --out FILE.npz'"
            )
        count = len(array) if num is None else min(num, len(array))
        if uint8:
            return count, lambda part: torch.from_numpy(np.array(array[part])).permute(0, 3, 1, 2)

        def finite_pixels(part: slice):
            images = torch.from_numpy(np.array(array[part], dtype=np.float32))
            bad = count_nonfinite(images)
            if bad:  # 8-bit pixels would hide them as black
                first, last = part.start, part.stop - 1
                raise MetricsError(f"{path}: {bad} of the images {first} to {last} are not finite (NaN/inf)")
            return to_uint8(images)

        return count, finite_pixels
    config_file = path / CONFIG_FILE if path.is_dir() else path
    if not config_file.is_file():
        raise SamplingError(f"{source} is neither a samples .npz, a config file nor a run directory")
    dataset = build_dataset(load_config(config_file).data)
    if not isinstance(dataset, ImageDataset) or isinstance(dataset, LatentDataset):
        raise SamplingError(f"{source}: reference statistics need an image dataset (for latents: the image folder)")
    from dumo.evaluation import reference_images

    images = reference_images(dataset, num or len(dataset))
    return len(images), lambda part: to_uint8(images[part])

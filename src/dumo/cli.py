"""The ``dumo`` command line: train, sample, eval, demo.

Problems with the user's input end in one line on stderr (``dumo: error: ...``) and exit
status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import shutil
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np

from dumo.errors import DumoError
from dumo.runs.generation import (  # the library side of sampling a run
    check_memory,
    generate_from_run,
    image_shape,
    read_pixels,
    sample_labels,
    stream_from_run,
)
from dumo.version import __version__

EXIT_USAGE = 2
DEMO_MARKER = ".dumo-demo"


class UsageError(DumoError):
    pass


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is one ``--help`` away)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def packaged_config(name: str) -> Path:
    """A config shipped inside the package, e.g. ``toy/moons-dumo.yaml``."""
    return Path(str(resources.files("dumo") / "configs" / name))


def check_output_file(
    path: Path, suffixes: tuple[str, ...], folder_ok: bool = False, force: bool | None = None
) -> None:
    """Refuse a bad output path before any work is done; create its parent folder.

    ``force`` None: an existing file is replaced (atomically); False: it is refused.
    """
    is_folder = folder_ok and path.suffix == ""
    if path.is_dir() and not is_folder:
        raise UsageError(f"--out {path} is a directory; name a file ending in {' or '.join(suffixes)}")
    if path.suffix.lower() not in suffixes and not is_folder:
        folder = " or no suffix (a folder of PNGs)" if folder_ok else ""
        raise UsageError(f"--out {path}: the file name must end in {' or '.join(suffixes)}{folder}")
    if force is False and path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"--out {path} exists; pass --force to replace it")
    if path.parent.exists() and not path.parent.is_dir():
        raise UsageError(f"--out {path}: {path.parent} is not a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out {path}: cannot create its folder {path.parent}: {error.strerror}") from None


def parse_times(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        times = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--times must be comma-separated numbers like 1.0,0.5; got {text!r}") from None
    if not all(math.isfinite(t) for t in times):
        raise UsageError(f"--times must be finite numbers in (0, 1]; got {text!r}")
    return times


# -- commands ------------------------------------------------------------------------------------


def command_train(args: argparse.Namespace) -> int:
    from dumo.config import load_config
    from dumo.distributed import shutdown
    from dumo.runs.folder import is_dumo_run
    from dumo.runs.layout import CONFIG_FILE
    from dumo.training import train

    out = Path(args.out)
    if args.resume and args.overwrite:
        raise UsageError(
            "--resume and --overwrite contradict each other: --resume continues the run in --out, --overwrite "
            "deletes it to start afresh; give one of them"
        )
    if args.config is None and not args.resume:
        raise UsageError("CONFIG is required unless --resume continues the run in --out")
    if args.resume and not (out.is_dir() and is_dumo_run(out)):
        raise UsageError(f"--resume: {out} holds no run to resume; drop --resume to start a new run there")
    if args.config is None and not (out / CONFIG_FILE).is_file():
        raise UsageError(f"--resume: {out} holds no {CONFIG_FILE} to resume with; give the run's CONFIG")
    config = load_config(args.config or out / CONFIG_FILE, args.set)
    try:
        result = train(config, out, overwrite=args.overwrite)
    finally:
        shutdown()  # leave the process group torchrun set up, if any
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks for all
        print_result(result, config.train.steps)
    return result.exit_status


def print_result(result, steps: int) -> None:
    if result.already_done:
        print(f"already at step {result.step} (train.steps is {steps}): nothing to train; run: {result.run_dir}")
        return
    state = "interrupted" if result.interrupted else "finished"
    resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from is not None else ""
    print(f"{state} at step {result.step}{resumed} in {result.seconds:.1f} s; run: {result.run_dir}")
    if result.skipped_steps:
        print(f"  skipped {result.skipped_steps} steps (non-finite loss or gradient)")
    if result.interrupted:
        print(f"  not finished (exit status {result.exit_status}); rerun the same command to continue")
    for key, value in result.metrics.items():
        print(f"  {key:12s} {value:.5f}")
    if result.note:
        print(f"  note: {result.note}")


def positive(name: str, maximum: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer; got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1; got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{name} must be <= {maximum}; got {value}")
        return value

    return parse


def finite_non_negative(name: str):
    """An argparse type: a finite number >= 0 (float() reads 'nan' and 'inf' too)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number; got {text!r}") from None
        if not math.isfinite(value) or value < 0:
            raise argparse.ArgumentTypeError(f"{name} must be a finite number >= 0; got {text}")
        return value

    return parse


MAX_NFE = 1000  # more network evaluations per sample than any sampler here needs


def class_index(run, text: str | None) -> int | None:
    """``--class`` as an index (3) or a class name (cat), checked against the model."""
    if text is None:
        return None
    if run.num_classes == 0:
        raise UsageError("--class given but the model is unconditional")
    label = run.space.class_label(text)
    if not 0 <= label < run.num_classes:
        raise UsageError(f"--class must be in [0, {run.num_classes - 1}]; got {label}")
    return label


def npz_sink(writer, float_images: bool):
    """Write decoded batches into a :class:`dumo.runs.sample_files.ShardedNpz` ('arr_0' NHWC uint8, 'images')."""

    def sink(first: int, images, pixels) -> None:
        writer.write("arr_0", first, pixels.permute(0, 2, 3, 1).cpu().numpy())
        if float_images:
            writer.write("images", first, images.float().cpu().numpy())

    return sink


def sample_npz(out: Path, run, num: int, batch_size: int, labels, dist, float_images: bool):
    """The writer of a samples .npz: 'arr_0' (N, H, W, C) uint8, 'labels' (N,) int64 (-1: unconditional)
    and, with ``float_images``, 'images' (N, C, H, W) float32 in [0, 1]."""
    from dumo.runs.sample_files import ShardedNpz

    channels, height, width = image_shape(run)
    arrays = {"arr_0": ((height, width, channels), np.uint8)}
    if float_images:
        arrays["images"] = ((channels, height, width), np.float32)
    return ShardedNpz(out, num, batch_size, dist, arrays, {"labels": label_array(labels, num)})


def label_array(labels, num: int) -> np.ndarray:
    return np.full(num, -1, dtype=np.int64) if labels is None else labels.numpy().astype(np.int64)


def sampling_session(args: argparse.Namespace):
    """Join torchrun's process group if there is one, and load the run on this rank's device
    (cuda:LOCAL_RANK when there is a GPU)."""
    from dumo.distributed import from_environment, resolve_device
    from dumo.runs.loading import load_run

    dist = from_environment()
    device = resolve_device(args.device, dist.local_rank, option="--device")
    run = load_run(args.run_dir, args.checkpoint, args.weights, device=str(device))
    if args.head is not None:
        check_head(run, args.head)
        run.config.sample.head = args.head
    apply_guidance(run, args.guidance)
    return dist, run


def apply_guidance(run, guidance: float | None) -> None:
    """--guidance W: the run samples with guidance scale W (a class-conditional model only)."""
    if guidance is not None:
        if run.num_classes == 0 and guidance != 1:
            raise UsageError("--guidance needs a class-conditional model")
        run.config.sample.guidance_scale = guidance


def check_head(run, head: str) -> None:
    """A one-line error unless the run's model has ``head`` (dumo sample --head)."""
    if head not in run.model.heads:
        raise UsageError(f"--head {head}: this model has no such head (its heads: {', '.join(run.model.heads)})")


EVAL_MINIMUM = 2  # every score of dumo eval needs two samples: a covariance (FD, FID) or MMD's pairs
PICTURE_SAMPLES = 64  # default -n for a .png grid (2000 tiles would be a 1100 x 24000 px picture)
DATA_SAMPLES = 2000  # default -n for data files and scoring


def command_sample(args: argparse.Namespace) -> int:
    from dumo.distributed import shutdown
    from dumo.files import atomic_output
    from dumo.plotting import image_grid, scatter_over_density
    from dumo.sampling import sampling_cost

    out = Path(args.out).expanduser()
    dist, run = sampling_session(args)
    try:
        images = run.space.is_images
        check_output_file(out, (".npz", ".png") if images else (".npy", ".png"), folder_ok=images, force=args.force)
        picture = out.suffix.lower() == ".png"
        png_folder = images and out.suffix == ""
        if png_folder:
            check_png_folder(out, "--out")
        if args.uint8 and out.suffix.lower() != ".npz":
            if not (picture or png_folder):
                raise UsageError(f"--uint8 writes a .npz only; {out} gets the float coordinates of 2-D samples")
            if dist.is_main:
                print("dumo: warning: --uint8 shapes a .npz only; PNGs are 8-bit anyway: ignored", file=sys.stderr)
        num = args.num or (PICTURE_SAMPLES if picture and images else DATA_SAMPLES)
        label = class_index(run, args.class_label)
        # "2 NFE", or under guidance the steps and passes; it also refuses a sampler unfit for the model
        conditional = run.num_classes > 0
        cost = sampling_cost(run.model, run.objective_name, args.nfe, run.config.sample, args.method, conditional)
        ranks = f" on {dist.world_size} processes" if dist.enabled else ""
        if images and not picture:
            # a .npz or a folder of PNGs: every rank writes its own chunks as it decodes them
            labels = sample_labels(run, num, label)
            if png_folder:
                writer = PngFolder(out, dist, label_array(labels, num) if labels is not None else None, run.space)
                sinks = [writer.sink]
            else:
                writer = sample_npz(out, run, num, args.batch_size, labels, dist, float_images=not args.uint8)
                sinks = [npz_sink(writer, float_images=not args.uint8)]
            dist.barrier()  # every rank has checked --out before any writes to it
            method, times = args.method, parse_times(args.times)
            stream_from_run(
                run, args.nfe, num, args.seed, method, times, labels, args.batch_size, args.decode_batch, dist, sinks
            )
            writer.finish()
            if dist.is_main:
                print(f"wrote {num} samples ({cost}, step {run.step}) to {out}{ranks}")
            return 0
        labels, points = generate_from_run(
            run, args.nfe, num, args.seed, args.method, parse_times(args.times), label, args.batch_size, dist
        )
        if not dist.is_main:
            return 0
        data = run.space.unstandardise(points).numpy()
        title = f"{run.objective_name}, step {run.step}, {cost}"
        if picture and images:
            names = None if labels is None else [run.space.class_name(int(c)) for c in labels]
            with atomic_output(out) as tmp:
                image_grid(data, names, tmp, title=title, columns=8)
        elif picture:
            reference = run.space.reference_points(50_000)
            with atomic_output(out) as tmp:
                scatter_over_density([(title, data)], reference.numpy(), tmp)
        else:
            with atomic_output(out) as tmp:
                np.save(tmp, data.astype(np.float64))
        print(f"wrote {num} samples ({cost}, step {run.step}) to {out}{ranks}")
        return 0
    finally:
        shutdown()


class PngFolder:
    """A folder of one PNG per sample (``000000.png``, ... by global sample index) and, for labelled
    samples, labels.csv: every rank writes its own chunks into a temporary sibling folder, which rank
    0 then puts in place of the old folder, so that the folder holds this call's files only (16 new
    images never sit beside 48 stale ones). The old folder must hold only such files
    (:func:`check_png_folder`)."""

    def __init__(self, out: Path, dist, labels: np.ndarray | None, space):
        self.out, self.dist, self.labels, self.space = out, dist, labels, space
        self.staging = out.parent / f".{out.name}.writing"
        if dist.is_main:
            if self.staging.is_dir() and not self.staging.is_symlink():
                shutil.rmtree(self.staging)  # left by a killed call: dumo's own temporary name
            self.staging.mkdir(parents=True)
        dist.barrier()  # the staging folder exists before any rank writes to it

    def sink(self, first: int, images, pixels) -> None:
        write_png_folder(self.staging, pixels.permute(0, 2, 3, 1).cpu().numpy(), first)

    def finish(self) -> None:
        """Wait for every rank's images; rank 0 writes labels.csv and swaps the folder in (all ranks call this)."""
        self.dist.barrier()
        if self.dist.is_main:
            if self.labels is not None:
                write_labels_csv(self.staging, self.labels, self.space)
            replace_folder(self.staging, self.out)
        self.dist.barrier()


def replace_folder(new: Path, out: Path) -> None:
    """Put the folder ``new`` at ``out``; an old folder there (checked to hold dumo's files only) is
    renamed aside first and deleted after, so an interruption leaves one whole folder or the other."""
    old = out.parent / f".{out.name}.replaced"
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    if out.is_symlink():
        out.unlink()  # the link goes; the folder it pointed to keeps its files
    elif out.exists():
        os.replace(out, old)
    os.replace(new, out)
    if old.exists():
        shutil.rmtree(old)


#: the files of a folder of PNG samples: its images, labels.csv, and their temporary copies
PNG_FOLDER_FILES = r"^(?:\d{6,}\.png|labels\.csv|\.(?:\d{6,}\.png|labels\.csv)\.[^/]+\.tmp(?:\.\w+)?)$"


def check_png_folder(path: Path, option: str) -> None:
    """Refuse to replace a folder of PNGs that holds anything dumo did not write there."""
    if not path.is_dir():
        return
    others = sorted(p.name for p in path.iterdir() if not (re.match(PNG_FOLDER_FILES, p.name) and p.is_file()))
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise UsageError(
            f"{option} {path} holds files dumo did not write ({shown}); dumo replaces only a folder of its own "
            "PNGs: choose another folder"
        )


def write_png_folder(folder: Path, pixels: np.ndarray, first: int = 0) -> None:
    """One PNG per sample of uint8 (N, H, W, C) ``pixels``, named by global sample index: first
    ``{first:06d}.png``, then the next, ... (each rank writes its own)."""
    from PIL import Image

    from dumo.files import atomic_output

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(pixels, start=first):
        with atomic_output(folder / f"{i:06d}.png") as tmp:
            Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(tmp, format="PNG")


def write_labels_csv(folder: Path, labels: np.ndarray, space) -> None:
    """labels.csv beside the PNGs of class-conditional samples: file, label, class name."""
    from dumo.files import atomic_output

    if (labels >= 0).any():
        rows = "".join(f"{i:06d}.png,{int(c)},{space.class_name(int(c))}\n" for i, c in enumerate(labels))
        with atomic_output(folder / "labels.csv") as tmp:
            tmp.write_text("file,label,class\n" + rows)


def check_sample_output(path: Path, option: str, folder: bool) -> None:
    """--npz / --png-dir of dumo eval: a .npz file (replaced if it exists) or a folder."""
    if folder and path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is a file; name a folder for the PNGs")
    if not folder and (path.is_dir() or path.suffix.lower() != ".npz"):
        raise UsageError(f"{option} {path}: name a file ending in .npz")
    try:
        (path if folder else path.parent).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{option} {path}: cannot create the folder: {error.strerror}") from None


def command_eval(args: argparse.Namespace) -> int:
    import json

    import torch

    from dumo.data import ToyDataset
    from dumo.distributed import shutdown
    from dumo.evaluation import image_scorer, toy_scorer
    from dumo.sampling import ChunkGather, sampling_cost
    from dumo.training.logs import small_data_note

    dist, run = sampling_session(args)
    try:
        latent = run.space.kind == "latents"  # its training latents are not read: they can be large
        if latent and args.inception is None:
            raise UsageError("a latent-space run is scored with Inception metrics: give --inception (and --ref)")
        if (args.npz or args.png_dir) and len(args.nfe) != 1:
            raise UsageError("--npz and --png-dir keep the samples of one NFE; give one --nfe")
        if (args.npz or args.png_dir) and not run.space.is_images:
            raise UsageError("--npz and --png-dir write images; this run draws 2-D points (use 'dumo sample')")
        if args.num < EVAL_MINIMUM:
            metric = "FID" if latent else "MMD" if run.space.kind == "toy" else "domain FD"
            raise UsageError(f"-n {args.num}: {metric} needs at least {EVAL_MINIMUM} samples")
        # each NFE as shown ("2 NFE", or the steps and passes under guidance); an unfit sampler is refused here
        costs = {
            nfe: sampling_cost(run.model, run.objective_name, nfe, run.config.sample, args.method, run.num_classes > 0)
            for nfe in args.nfe
        }
        npz = None if args.npz is None else Path(args.npz).expanduser()
        png_dir = None if args.png_dir is None else Path(args.png_dir).expanduser()
        if npz is not None:
            check_sample_output(npz, "--npz", folder=False)
        if png_dir is not None:
            check_sample_output(png_dir, "--png-dir", folder=True)
            check_png_folder(png_dir, "--png-dir")
        if not latent:  # the domain metrics score all samples at once on rank 0: meant for small data
            size = math.prod(run.space.shape) * 4
            check_memory(3 * args.num * size, f"{args.num} samples gathered for the domain metrics")
        score = None
        if dist.is_main and not latent:  # the small domain metrics: rank 0 scores the gathered samples
            scorer = toy_scorer if isinstance(run.dataset, ToyDataset) else image_scorer
            score = scorer(run.dataset, args.num)
            note = small_data_note(run.dataset)
            if note:
                print(f"note: {note}")
        inception, reference = None, None
        if args.inception is not None:
            inception, reference = inception_reference(args, run, dist)
        if dist.is_main:
            shown = f"{run.objective_name}, step {run.step}, {args.num} samples, seed {args.seed}"
            print(f"{args.run_dir}: {shown}" + (f", {dist.world_size} processes" if dist.enabled else ""))
        names = {"mmd": "MMD", "sw": "SW", "fd": "domain FD", "fidelity": "class fidelity"}
        results = {}
        for nfe in args.nfe:
            labels = sample_labels(run, args.num, None)
            gather = None if latent else ChunkGather(args.num, run.space.shape, args.batch_size, dist, run.device)
            streamed, image_sinks, writer, png_writer = None, [], None, None
            if inception is not None:
                from dumo.metrics.fid_stats import inception_scores

                streamed = inception_scores(inception, args.num)

                def add_to_scores(first, images, pixels, streamed=streamed):
                    # the float images: a non-finite one is refused by number, not scored as black pixels
                    streamed.add(images, torch.arange(first, first + images.shape[0]))

                image_sinks.append(add_to_scores)
            if npz is not None:
                writer = sample_npz(npz, run, args.num, args.batch_size, labels, dist, float_images=False)
                image_sinks.append(npz_sink(writer, float_images=False))
            if png_dir is not None:
                png_labels = None if labels is None else label_array(labels, args.num)
                png_writer = PngFolder(png_dir, dist, png_labels, run.space)
                image_sinks.append(png_writer.sink)
            stream_from_run(
                run,
                nfe,
                args.num,
                args.seed,
                args.method,
                None,
                labels,
                args.batch_size,
                args.decode_batch,
                dist,
                image_sinks,
                [] if gather is None else [gather.add],
            )
            points = None if gather is None else gather.result().cpu()
            if streamed is not None:
                streamed.reduce(dist)
            if writer is not None:
                writer.finish()
            if png_writer is not None:
                png_writer.finish()
            if not dist.is_main:
                continue
            metrics = {} if score is None else score(points, labels)
            shown = "  ".join(f"{names[k]} {v:.5f}" for k, v in metrics.items())
            if streamed is not None:
                scores = streamed.scores(reference)
                metrics.update(scores)
                shown = f"{shown}  {inception_line(scores)}".strip()
            results[str(nfe)] = metrics
            print(f"  {costs[nfe]:>7}  {shown}")
        if args.json is not None and dist.is_main:
            from dumo.files import atomic_output

            record = {
                "run": str(args.run_dir),
                "step": run.step,
                "num": args.num,
                "seed": args.seed,
                "processes": dist.world_size,
                "guidance_scale": run.config.sample.guidance_scale if run.num_classes else None,
                "nfe": results,
            }
            with atomic_output(Path(args.json).expanduser()) as tmp:
                tmp.write_text(json.dumps(record, indent=2) + "\n")
        if dist.is_main and (npz is not None or png_dir is not None):
            print(f"  samples: {', '.join(str(p) for p in (npz, png_dir) if p is not None)}")
        return 0
    finally:
        shutdown()


def inception_reference(args: argparse.Namespace, run, dist):
    """The Inception network (on every rank) and the reference statistics: --ref, or the Inception
    statistics of --num of the run's own training images, shared among the ranks."""
    from dumo.metrics.inception import InceptionNetwork, Statistics

    inception = InceptionNetwork(args.inception, run.device)
    if args.ref is not None:
        return inception, Statistics.load(args.ref)
    if run.space.kind == "latents":
        raise UsageError("--ref is required for a latent-space run (make it with 'dumo fid-stats' on the images)")
    from dumo.evaluation import reference_images
    from dumo.metrics.inception import to_uint8

    images = reference_images(run.dataset, args.num)
    return inception, image_statistics(inception, len(images), lambda part: to_uint8(images[part]), dist, 100)


def image_statistics(inception, count: int, pixels, dist, batch_size: int):
    """Inception statistics of ``count`` images, ``pixels(slice)`` giving uint8 batches; each rank
    embeds its own batches and the sums are added over ranks."""
    from dumo.metrics.fid_stats import FeatureMoments, rank_batches
    from dumo.metrics.inception import FEATURE_DIM

    moments = FeatureMoments(FEATURE_DIM, inception.device)
    for part in rank_batches(count, batch_size, dist):
        moments.update(inception.embed(pixels(part))[0])
    moments.reduce(dist)
    return moments.statistics()


def inception_line(scores: dict[str, float]) -> str:
    return f"FID {scores['fid']:.3f}  IS {scores['is']:.3f} ± {scores['is_std']:.3f}"


def inception_session(args: argparse.Namespace):
    """torchrun's process group, if any, and the Inception network on this rank's device."""
    from dumo.distributed import from_environment, resolve_device
    from dumo.metrics.inception import InceptionNetwork

    dist = from_environment()
    device = resolve_device(args.device, dist.local_rank, option="--device")
    return dist, InceptionNetwork(args.inception, device, batch_size=args.batch_size)


def command_fid_stats(args: argparse.Namespace) -> int:
    from dumo.distributed import shutdown

    out = Path(args.out)
    check_output_file(out, (".npz",))
    count, pixels = read_pixels(args.source, args.num)
    dist, inception = inception_session(args)
    try:
        statistics = image_statistics(inception, count, pixels, dist, args.batch_size)
        if dist.is_main:
            statistics.save(out)
            print(f"wrote Inception statistics of {count} images from {args.source} to {out}")
        return 0
    finally:
        shutdown()


def command_fid(args: argparse.Namespace) -> int:
    import torch

    from dumo.distributed import shutdown
    from dumo.metrics.fid_stats import inception_scores, rank_batches
    from dumo.metrics.inception import Statistics

    count, pixels = read_pixels(args.samples, None)
    reference = Statistics.load(args.ref)
    dist, inception = inception_session(args)
    try:
        streamed = inception_scores(inception, count)
        for part in rank_batches(count, args.batch_size, dist):
            streamed.add(pixels(part), torch.arange(part.start, part.stop))
        streamed.reduce(dist)
        if dist.is_main:
            print(f"{args.samples}: {count} images  {inception_line(streamed.scores(reference))}")
        return 0
    finally:
        shutdown()


def command_encode(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    if out.suffix.lower() == ".safetensors":
        raise UsageError(
            f"--out {out}: dumo encode writes a folder of shards; name a folder (e.g. latents/imagenet256-sdvae). "
            "Latent files of earlier versions are still read."
        )
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    if args.resolution is not None and args.data != "image_folder":
        raise UsageError(f"--resolution applies to --data image_folder only, not {args.data}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0; got {args.workers}")
    from dumo.data.encode import DEFAULT_SHARD_SIZE, encode_images, image_source
    from dumo.data.latents import LatentCodec, load_autoencoder
    from dumo.distributed import from_environment, resolve_device, shutdown

    dist = from_environment()
    try:
        device = resolve_device(args.device, dist.local_rank, option="--device")
        source = image_source(args.data, args.data_path, args.resolution)
        codec = LatentCodec(load_autoencoder(args.kind, args.autoencoder, device), args.kind)
        summary = encode_images(
            source,
            codec,
            out,
            args.autoencoder,
            device=device,
            dist=dist,
            flip=not args.no_flip,
            batch_size=args.batch_size,
            shard_size=args.shard_size or DEFAULT_SHARD_SIZE,
            workers=args.workers,
        )
    finally:
        shutdown()  # leave the process group torchrun set up, if any
    if summary is None:  # under torchrun, rank 0 speaks for all
        return 0
    if summary.transparent:
        print(f"dumo: note: {summary.transparent} images have transparency; composited over white", file=sys.stderr)
    flips = "with flips" if not args.no_flip else "no flips"
    kept = f", {summary.skipped_shards} already there" if summary.skipped_shards else ""
    ranks = f" on {dist.world_size} processes" if dist.enabled else ""
    print(
        f"encoded {summary.num_images} images ({summary.num_latents} latents {flips}) of {args.data} with "
        f"{args.kind} to {out}: {summary.num_shards} shards{kept}{ranks}"
    )
    shape = "x".join(map(str, summary.latent_shape))
    print(
        f"latents {shape}; per-channel mean {' '.join(f'{m:.4f}' for m in summary.mean)}, "
        f"std {' '.join(f'{s:.4f}' for s in summary.std)}"
    )
    return 0


def command_info(args: argparse.Namespace) -> int:
    import torch
    import yaml

    from dumo.config import load_config
    from dumo.models import count_parameters
    from dumo.network import build_network
    from dumo.objectives import objective_class

    config = load_config(args.config, args.set)
    objective = objective_class(config.objective.name)
    shape = config.data.expected_shape()
    classes = config.data.expected_classes() if config.data.conditional else 0
    if shape is None or classes is None:
        missing = []
        if shape is None:
            missing.append("data.resolution" if config.data.name == "image_folder" else "data.latent_shape")
        if classes is None:
            missing.append(
                "data.path (an existing folder)" if config.data.name == "image_folder" else "data.num_classes"
            )
        raise UsageError(f"the data's shape or classes are known only from its files: set {' and '.join(missing)}")
    with torch.device("meta"):  # counts parameters without allocating them
        model = build_network(config, shape, classes)
    total = count_parameters(model)
    print(
        f"model {describe_model(config.model)}, data {config.data.name} {shape} ({classes} classes), "
        f"{objective.__name__}"
    )
    print(f"  parameters: {total:,} total ({total / 1e6:.2f}M)")
    print(f"    backbone: {count_parameters(model.backbone):,}")
    for name, head in model.heads.items():
        print(f"    {name}-head:   {count_parameters(head):,}")
    print("effective settings:")
    print("  " + yaml.safe_dump(config.to_dict(), sort_keys=False).replace("\n", "\n  ").rstrip())
    return 0


def describe_model(model_config) -> str:
    """The network's name, and its actual size where it differs from the standard size of that name
    (the digits configs' "DiT-S/2" is 96 wide and 4 deep: 0.74M parameters, not DiT-S/2's 33M)."""
    from dumo.models.dit import parse_dit_name

    parsed = parse_dit_name(model_config.name)
    if parsed is None:
        return model_config.name
    standard, actual = parsed[0], model_config.dit_size()
    if actual == standard:
        return model_config.name
    return (
        f"{model_config.name} with a custom size (width {actual.hidden_dim}, depth {actual.depth}, {actual.num_heads} "
        f"heads; the standard {model_config.name} is width {standard.hidden_dim}, depth {standard.depth})"
    )


TRAJECTORY_IMAGES = 8  # default rows of the trajectories figure of an image run
TRAJECTORY_PATHS = 32  # default paths per panel of the trajectories figure of a 2-D run


def command_trajectories(args: argparse.Namespace) -> int:
    from dumo.files import atomic_output
    from dumo.plotting import image_grid, paths_over_density
    from dumo.runs.loading import load_run
    from dumo.samplers import SAMPLERS, VELOCITY_SAMPLER, cost_label
    from dumo.sampling import balanced_labels, generate, head_for_sampler, is_guided, sampler_for

    out = Path(args.out).expanduser()
    check_output_file(out, (".png",))
    run = load_run(args.run_dir, args.checkpoint, args.weights)
    apply_guidance(run, args.guidance)
    # --method auto draws every head of the model with its own sampler (the objective's own head
    # first: DuMo's u-head, then Euler on its v-head); --head draws that head only; a named sampler
    # without --head draws the head it reads
    head_samplers = run.model.head_samplers
    if args.head is not None:
        check_head(run, args.head)
        if args.method == "auto" and args.head not in head_samplers:
            raise UsageError(f"--head {args.head}: no sampler is known for it; name one with --method")
        draws = [(args.head, head_samplers[args.head] if args.method == "auto" else args.method)]
    elif args.method == "auto":
        own = sampler_for(run.objective_name)
        draws = list(head_samplers.items()) or [(SAMPLERS[own].head, own)]
    else:  # the head the sampler fits (refused by name if none does)
        draws = [(head_for_sampler(run.model, run.objective_name, args.method), args.method)]
    heads = []
    for head, method in draws:
        if head not in run.model.heads:
            raise UsageError(
                f"--method {method} needs a {head}-head, which this model lacks (it has {', '.join(run.model.heads)})"
            )
        if SAMPLERS[method].head == "v":  # velocity samplers are told apart by their integrator
            shown = "Euler" if args.method == "auto" and method == VELOCITY_SAMPLER else method
            heads.append((f"{head}-head {shown}", head, method))
        else:
            heads.append((f"{head}-head", head, method))
    num = args.num or (TRAJECTORY_IMAGES if run.space.is_images else TRAJECTORY_PATHS)
    labels = balanced_labels(num, run.num_classes)
    guided = is_guided(run.config.sample, labels is not None)
    columns = {}  # (head, nfe) -> samples in the data's own space (2-D: every state of the sampler)
    costs = {}  # (head, nfe) -> "2 NFE", or under guidance the steps and passes
    for name, head, method in heads:
        for nfe in args.nfe:
            states: list = []
            x = generate(
                run.model,
                run.objective_name,
                (num, *run.space.shape),
                nfe,
                dataclasses.replace(run.config.sample, head=head),
                args.seed,
                labels,
                method,
                path=None if run.space.is_images else states,
            )
            costs[name, nfe] = cost_label(nfe, method, guided)
            if run.space.is_images:
                columns[name, nfe] = run.space.unstandardise(x).numpy()
            else:
                columns[name, nfe] = np.stack([run.space.unstandardise(state).numpy() for state in states])
    if run.space.is_images:
        title = f"{run.objective_name}, step {run.step}: the same noise at each NFE"
        # one row per sample (its class on the left), one column per (head, NFE)
        grid = [columns[key][i] for i in range(num) for key in columns]
        column_titles = [f"{name}\n{costs[name, nfe]}" for name, nfe in columns]
        rows = [run.space.class_name(int(c)) for c in labels] if labels is not None else None
        with atomic_output(out) as tmp:
            image_grid(
                np.stack(grid),
                None,
                tmp,
                title=title,
                columns=len(columns),
                column_titles=column_titles,
                row_titles=rows,
            )
    else:
        # one row per head, one column per NFE: each noise point's path through the sampler's states
        title = f"{run.objective_name}, step {run.step}: {num} paths from noise (grey) to sample (red)"
        reference = run.space.reference_points(50_000)
        panels = [(f"{name}, {costs[name, nfe]}", states) for (name, nfe), states in columns.items()]
        with atomic_output(out) as tmp:
            paths_over_density(panels, reference.numpy(), tmp, columns=len(args.nfe), title=title)
    passes = f", each 2 network passes with guidance {run.config.sample.guidance_scale}" if guided else ""
    print(
        f"wrote trajectories ({', '.join(name for name, _, _ in heads)}; NFE {', '.join(map(str, args.nfe))}{passes}) "
        f"to {out}"
    )
    return 0


def command_export(args: argparse.Namespace) -> int:
    from dumo.runs.loading import export_run

    path = export_run(args.run_dir, args.out_dir)
    print(f"exported EMA weights and config to {path.parent}")
    return 0


def command_import_weights(args: argparse.Namespace) -> int:
    from dumo.config import load_config
    from dumo.runs.importing import import_official_weights

    config = load_config(args.config, args.set)
    imported = import_official_weights(
        args.kind, args.checkpoint, config, args.out, num_heads=args.num_heads, autoencoder=args.autoencoder
    )
    print(f"wrote {imported.written} ({imported.describe()}) from {args.kind.upper()} weights to {args.out}")
    autoencoder = imported.space.autoencoder if imported.space is not None else None
    if autoencoder is not None:
        print(
            f"samples decode with {autoencoder['name']} from {autoencoder['path']} "
            f"(latents / {autoencoder['scaling_factor']}); no data needed: dumo sample {args.out} ..."
        )
    print(f"note: {imported.note}")
    return 0


def command_demo(args: argparse.Namespace) -> int:
    from dumo.config import load_config
    from dumo.evaluation import toy_scorer
    from dumo.plotting import scatter_over_density
    from dumo.samplers import VELOCITY_SAMPLER
    from dumo.sampling import generate
    from dumo.training import Trainer

    overrides = list(args.set) + ([f"train.steps={args.steps}"] if args.steps is not None else [])
    config = load_config(packaged_config("toy/moons-dumo.yaml"), overrides)
    out = Path(args.out)
    if out.exists():
        if not (out / DEMO_MARKER).exists():
            raise UsageError(f"{out} exists and was not made by 'dumo demo'; choose another --out")
        shutil.rmtree(out)  # a previous demo: start afresh
    out.mkdir(parents=True)
    (out / DEMO_MARKER).touch()

    print(f"dumo demo: training DuMo (beta={config.objective.beta}) on moons for {config.train.steps} steps")
    started = time.perf_counter()
    trainer = Trainer(config, out)
    result = trainer.run()
    trained = time.perf_counter() - started
    print(f"trained {result.step} steps in {trained:.1f} s ({result.step / trained:.0f} steps/s)")

    num = 2000
    score = toy_scorer(trainer.dataset, num)
    results = []  # (label, points, scores): each set of samples is drawn once, then scored and drawn
    for label, nfe, method in (
        ("DuMo u-head, 1 NFE", 1, "auto"),
        ("DuMo u-head, 2 NFE", 2, "auto"),
        ("same model, v-head Euler 32 NFE", 32, VELOCITY_SAMPLER),
    ):
        points = generate(trainer.ema.model, config.objective.name, (num, 2), nfe, config.sample, method=method)
        results.append((label, points, score(points, None)))
    reference, _ = trainer.dataset.sample(50_000)
    picture = out / "samples.png"
    scatter_over_density(
        [
            (f"{label} (MMD {scores['mmd']:.4f})", trainer.dataset.unstandardise(points).numpy())
            for label, points, scores in results
        ],
        reference.numpy(),
        picture,
    )
    for nfe, (_, _, scores) in zip((1, 2), results):
        print(f"  {nfe} NFE  MMD {scores['mmd']:.5f}  (sliced W2 {scores['sw']:.5f})")
    print(f"  v-head Euler 32 NFE  MMD {results[2][2]['mmd']:.5f}")
    print(f"picture: {picture}")
    print(f"total {time.perf_counter() - started:.1f} s")
    return 0


def command_plan(args: argparse.Namespace) -> int:
    from dumo.config import load_config
    from dumo.plan import format_plan, make_plan

    config = load_config(args.config, args.set)
    plan = make_plan(config, args.gpus, args.gpu, args.mfu, args.dataset_size, config_path=args.config)
    print(format_plan(plan, args.config))
    return 0


def command_eval_snapshots(args: argparse.Namespace) -> int:
    from dumo.distributed import resolve_device
    from dumo.runs.layout import SCORES_FILE, SNAPSHOT_DIR
    from dumo.training.snapshots import score_snapshots

    device = resolve_device(args.device, option="--device")
    print(f"{args.run_dir}: EMA snapshots, {args.num} samples each, seed {args.seed}")
    score_snapshots(args.run_dir, args.nfe, args.num, args.seed, args.batch_size, str(device), args.inception, args.ref)
    print(f"scores: {Path(args.run_dir) / SNAPSHOT_DIR / SCORES_FILE}")
    return 0


def command_shapes(args: argparse.Namespace) -> int:
    from dumo.data.shapes import evaluation_prompts, parse_held_out, read_prompt_file, render_prompts
    from dumo.files import atomic_output

    out = Path(args.out).expanduser()
    if args.action == "render":
        check_output_file(out, (".npz",), force=args.force)
        images = render_prompts(read_prompt_file(args.prompts), args.seed)
        with atomic_output(out) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, arr_0=images)
        print(f"wrote {len(images)} images of {args.prompts} (seed {args.seed}) to {out}")
        return 0
    check_output_file(out, (".txt",), force=args.force)
    prompts = evaluation_prompts(parse_held_out(args.held_out), args.per_category, args.seed)
    with atomic_output(out) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in prompts.seen + prompts.held_out))
    print(f"wrote {len(prompts.seen)} seen and {len(prompts.held_out)} held-out prompts to {out}")
    return 0


def command_eval_shapes(args: argparse.Namespace) -> int:
    from dumo.data.shapes import parse_held_out, read_prompt_file
    from dumo.metrics.shapes import judge

    prompts = read_prompt_file(args.prompts)
    count, pixels = read_pixels(args.samples, None)
    images = pixels(slice(0, count)).permute(0, 2, 3, 1).numpy()
    if images.shape[3] != 3 or count != len(prompts):
        raise UsageError(
            f"{args.samples} holds {count} images with {images.shape[3]} channel(s); the judge needs one RGB image "
            f"per line of {args.prompts} ({len(prompts)}), in order"
        )
    print(judge(images, prompts, parse_held_out(args.held_out)).format())
    return 0


# -- parser --------------------------------------------------------------------------------------


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    from dumo.objectives import OBJECTIVES
    from dumo.samplers import SAMPLERS

    own = ", ".join(f"{name}: {cls.default_sampler}" for name, (_, cls) in OBJECTIVES.items() if cls.default_sampler)
    velocity = "/".join(name for name, sampler in SAMPLERS.items() if sampler.head == "v")
    parser.add_argument("run_dir", help="run directory written by 'dumo train', or a folder from 'dumo export'")
    parser.add_argument(
        "-n",
        "--num",
        type=positive("--num"),
        default=DATA_SAMPLES,
        help=f"number of samples (default {DATA_SAMPLES}); under torchrun write -n N (torchrun takes --num for "
        "--numa-binding)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    parser.add_argument(
        "--method",
        choices=("auto", *SAMPLERS),
        default="auto",
        help=f"sampler: auto picks the objective's own ({own}); {velocity} integrate the v-head ODE "
        "(default: the config's sample.method)",
    )
    parser.add_argument(
        "--head",
        metavar="NAME",
        help="the head to draw, with its own sampler for --method auto (a multi-head model's u, m, v, ...; "
        "DuMo's v draws its velocity ODE); default: the config's sample.head, else the objective's own",
    )
    parser.add_argument(
        "--guidance",
        type=finite_non_negative("--guidance"),
        metavar="W",
        help="classifier-free guidance scale at sampling, uncond + W (cond - uncond) on the sampled head; "
        "two network passes per step; 1 = off (default: the config's sample.guidance_scale)",
    )
    parser.add_argument(
        "--checkpoint",
        help="a checkpoint file of the run, e.g. RUN/checkpoints/step_00001000.safetensors (default: the latest)",
    )
    parser.add_argument(
        "--weights", choices=("ema", "model"), default="ema", help="EMA weights (default) or the raw trained weights"
    )
    parser.add_argument(
        "--batch-size",
        type=positive("--batch-size"),
        default=256,
        help="samples per network call (default 256); the samples depend on it and the seed, not on the "
        "number of torchrun processes",
    )
    add_device_argument(parser)


DECODE_BATCH = 32  # images decoded (and scored) at a time: an SD-VAE decode of 32 at 256 px fits any GPU


def add_decode_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--decode-batch",
        type=positive("--decode-batch"),
        default=DECODE_BATCH,
        metavar="N",
        help=f"images decoded by the autoencoder (latent models), turned into 8 bits, written and scored at a "
        f"time on each rank's device (default {DECODE_BATCH}): no rank holds more float images than this",
    )


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. --set train.steps=500 objective.beta=0.5 (one or more pairs after one "
        "--set, and --set may be repeated; the value is read as YAML)",
    )


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="auto (default: this rank's GPU if there is one, else cpu), cpu, cuda:0, ..."
    )


def add_inception_arguments(parser: argparse.ArgumentParser, ref_help: str) -> None:
    parser.add_argument(
        "--inception",
        metavar="WEIGHTS",
        help="Inception-v3 weights for FID/IS (torch-fidelity's weights-inception-2015-12-05-6726825d.pth or "
        ".safetensors; read without executing code, never downloaded)",
    )
    parser.add_argument("--ref", metavar="STATS.npz", help=ref_help)


def add_inception_batch_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batch-size", type=positive("--batch-size"), default=100, help="images per Inception call (default 100)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="dumo",
        description="Duality Models (DuMo) and baselines for one- and few-step generation.",
    )
    parser.add_argument("--version", action="version", version=f"dumo {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    train = commands.add_parser(
        "train",
        help="train a model from a YAML config",
        description="Train a model. If --out already holds this run (same config, except train.steps and "
        "logging cadence), training resumes from its latest checkpoint; a different run there is refused "
        "unless --overwrite. dumo marks its run folders with dumo-run.json, the list of what it wrote there; a "
        "non-empty folder without it is refused, and with --overwrite trained beside its files (none of them "
        "deleted or replaced). SIGINT/SIGTERM save a checkpoint and stop.",
    )
    train.add_argument("config", nargs="?", help="YAML config, e.g. configs/toy/moons-dumo.yaml")
    train.add_argument("--out", required=True, help="run directory for config, logs and checkpoints")
    train.add_argument(
        "--resume", action="store_true", help="continue the run in --out with its own config.yaml (CONFIG optional)"
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in --out even if it holds another run: deletes what dumo wrote there as its "
        "dumo-run.json lists it (config, logs, checkpoints, sample pictures, TensorBoard events, snapshots; "
        "history.txt is kept) and nothing else",
    )
    add_set_argument(train)
    train.set_defaults(handler=command_train)

    sample = commands.add_parser(
        "sample",
        help="draw samples from a trained run",
        description="Draw samples with the run's EMA weights (a run folder or an export: no training data needed). "
        "For 2-D data: FILE.npy holds an (N, 2) array in the dataset's own coordinates; FILE.png shows the samples "
        f"over the data density. For images: FILE.npz holds 'images' (N, C, H, W) float32 in [0, 1], 'labels' (N,) "
        "int64 (-1: unconditional) and 'arr_0' (N, H, W, C) uint8 (what DiT/SiT/ADM FID scripts read); FILE.png is "
        f"a labelled grid (default -n {PICTURE_SAMPLES}); a path without suffix becomes a folder of PNGs "
        "(000000.png, ... by sample index, and labels.csv). The file is written to a temporary name and renamed, so "
        "an interrupted write leaves nothing half-written. Under torchrun each rank draws, decodes and writes its "
        "own chunks: a .npz is written as one part file per rank beside it (as much disk as the .npz, on a "
        "filesystem all ranks share) that rank 0 then copies in order into FILE.npz, one chunk (--batch-size "
        "samples) in memory at a time; no rank holds all samples.",
    )
    add_sampling_arguments(sample)
    add_decode_argument(sample)
    sample.set_defaults(num=None)
    sample.add_argument(
        "--nfe", type=positive("--nfe", MAX_NFE), required=True, help=f"network evaluations per sample (1 to {MAX_NFE})"
    )
    sample.add_argument(
        "--out",
        required=True,
        help="output: .npy (2-D) / .npz (images) or .png, or for images a folder (no suffix) of one PNG per sample; "
        "missing folders are created",
    )
    sample.add_argument(
        "--force",
        action="store_true",
        help="replace --out if it exists (default: refuse); a folder of PNGs is replaced as a whole, and only "
        "if it holds nothing but dumo's PNGs and labels.csv",
    )
    sample.add_argument(
        "--uint8",
        action="store_true",
        help="a .npz with only 'arr_0' and 'labels', the ADM layout, a quarter of the size without the float32 "
        "'images' (50,000 samples at 256 px: 9.8 GB instead of 49 GB)",
    )
    sample.add_argument(
        "--times", help="k-step times t_0,...,t_{k-1} in (0, 1], decreasing, e.g. 1.0,0.4 (default: config schedule)"
    )
    sample.add_argument(
        "--class",
        dest="class_label",
        metavar="CLASS",
        help="class to sample, by index or by name (an image folder's subfolder) (default: balanced over classes)",
    )
    sample.set_defaults(handler=command_sample)

    evaluate = commands.add_parser(
        "eval",
        help="score a trained run (2-D: MMD, sliced Wasserstein; images: domain FD, class fidelity)",
        description="Score samples of a run against the data. 2-D: MMD (multi-bandwidth RBF) and sliced "
        "Wasserstein-2 on standardised coordinates. Images: Frechet distance in the features of a small "
        "classifier trained once on the dataset (cached), and for class-conditional runs the classifier's "
        "accuracy on the requested classes. With --inception: FID and Inception Score; under torchrun each rank "
        "draws its own chunks, decodes and scores them --decode-batch at a time on its GPU, and only the feature "
        "sums (float64) are added across ranks, so 50,000 ImageNet-size samples need no more memory than a batch. "
        "The scores depend on the seed and --batch-size, not on the number of processes.",
    )
    add_sampling_arguments(evaluate)
    add_decode_argument(evaluate)
    evaluate.add_argument(
        "--nfe", type=positive("--nfe"), nargs="+", default=[1, 2], help="one or more NFE (default 1 2)"
    )
    add_inception_arguments(
        evaluate, "reference statistics from 'dumo fid-stats' (default: --num of the run's own training images)"
    )
    evaluate.add_argument(
        "--npz",
        metavar="FILE.npz",
        help="also write the scored images (one --nfe) as 'arr_0' (N, H, W, C) uint8 and 'labels', the layout of the "
        "ADM evaluation suite; each rank writes a part file beside it and rank 0 copies them in order, one chunk in "
        "memory at a time (the parts take as much disk as the .npz, on a filesystem every rank can write to)",
    )
    evaluate.add_argument(
        "--png-dir",
        metavar="FOLDER",
        help="also write the scored images (one --nfe) as 000000.png, ... by sample index (and labels.csv); a "
        "folder written before is replaced as a whole, and only if it holds nothing but such files",
    )
    evaluate.add_argument("--json", metavar="FILE.json", help="also write the scores as JSON (by rank 0)")
    evaluate.set_defaults(handler=command_eval)

    fid_stats = commands.add_parser(
        "fid-stats",
        help="Inception reference statistics (mu, sigma) of a dataset or of a samples .npz",
        description="Write STATS.npz with 'mu' (2048,) and 'sigma' (2048, 2048) of Inception-v3 pool features "
        "(torch-fidelity's network), the layout pytorch-fid and torch-fidelity read.",
    )
    fid_stats.add_argument("source", help="a config file or run directory (its image dataset), or a samples .npz")
    fid_stats.add_argument("--inception", metavar="WEIGHTS", required=True, help="local Inception-v3 weights")
    fid_stats.add_argument("--out", required=True, help="output .npz")
    fid_stats.add_argument("--num", type=positive("--num"), help="images to use (default: all)")
    add_inception_batch_argument(fid_stats)
    add_device_argument(fid_stats)
    fid_stats.set_defaults(handler=command_fid_stats)

    fid = commands.add_parser(
        "fid",
        help="FID and Inception Score of a samples .npz against reference statistics",
        description="Score the images of a .npz written by 'dumo sample' or an ADM-style sample file (e.g. 50,000 of "
        "them) against STATS.npz from 'dumo fid-stats'. The file is memory-mapped and read a batch at a time; under "
        "torchrun each rank scores its share of the batches.",
    )
    fid.add_argument(
        "samples", help="samples .npz: a uint8 'arr_0' (N, H, W, C), or 'images' (N, C, H, W) float in [0, 1]"
    )
    fid.add_argument("--ref", required=True, metavar="STATS.npz", help="reference statistics")
    fid.add_argument("--inception", metavar="WEIGHTS", required=True, help="local Inception-v3 weights")
    add_inception_batch_argument(fid)
    add_device_argument(fid)
    fid.set_defaults(handler=command_fid)

    trajectories = commands.add_parser(
        "trajectories",
        help="picture of samples against NFE, from the u-head and the v-head ODE",
        description="Draw the same noise with 1, 2, 4, 8, ... NFE. Images: one row per sample (labelled with its "
        "class), one column per (head, NFE), labelled. 2-D data: one row of panels per head, one column per NFE, "
        "over the data density; each noise point's path is a line through the sampler's states (v-head ODE: x at "
        "each step's time; u-head flow map: x at each time of the k-step schedule), from the noise to the sample.",
    )
    add_sampling_arguments(trajectories)
    trajectories.set_defaults(num=None)
    for action in trajectories._actions:
        if action.dest == "num":
            action.help = (
                f"samples (images: one row each, default {TRAJECTORY_IMAGES}; 2-D: paths per panel, "
                f"default {TRAJECTORY_PATHS})"
            )
        if action.dest == "method":
            action.help = "auto (default): every head with its own sampler (DuMo: the u-head's and the v-head's "
            "Euler); a named sampler draws only the head it reads (or --head)"
    trajectories.add_argument(
        "--nfe",
        type=positive("--nfe", MAX_NFE),
        nargs="+",
        default=[1, 2, 4, 8, 16],
        help="the NFE of each column (default 1 2 4 8 16)",
    )
    trajectories.add_argument("--out", required=True, help="output .png (replaced if it exists)")
    trajectories.set_defaults(handler=command_trajectories)

    encode = commands.add_parser(
        "encode",
        help="encode an image dataset once into latents (SD-VAE or DC-AE from a local folder)",
        description="Encode every image (and its horizontal mirror, unless --no-flip) with diffusers' AutoencoderKL "
        "(sd-vae) or AutoencoderDC (dc-ae), loaded from a local folder (nothing is downloaded), into a folder of "
        "safetensors shards (shard k: images [k*S, (k+1)*S) of the sorted list) and an index.json. Latents are "
        "stored already multiplied by the autoencoder's scaling factor; train on them with data.name=latents, "
        "data.path=FOLDER. Under torchrun (torchrun --nproc_per_node=N -m dumo encode ...) the ranks share the "
        "shards, each on its own device; a rerun skips the shards already written.",
    )
    encode.add_argument(
        "--data", required=True, choices=("digits", "fashion_mnist", "mnist", "cifar10", "image_folder")
    )
    encode.add_argument("--data-path", help="where the dataset's files are (default: its usual location)")
    encode.add_argument("--resolution", type=positive("--resolution"), help="image_folder: centre-crop size (ADM)")
    encode.add_argument("--kind", required=True, choices=("sd-vae", "dc-ae"), help="autoencoder family")
    encode.add_argument("--autoencoder", required=True, help="local diffusers folder (config.json + weights)")
    encode.add_argument("--out", required=True, help="output folder (shards and index.json; resumed if it has some)")
    encode.add_argument("--no-flip", action="store_true", help="do not add horizontally flipped copies")
    encode.add_argument("--batch-size", type=positive("--batch-size"), default=64, help="images per batch and rank")
    encode.add_argument(
        "--shard-size",
        type=positive("--shard-size"),
        help="images per shard file (default 4096; a rerun must use the same)",
    )
    encode.add_argument(
        "--workers", type=int, default=4, help="DataLoader processes reading images, per rank (0: this process)"
    )
    encode.add_argument("--device", default="auto", help="auto (default: cuda:LOCAL_RANK if available, else cpu)")
    encode.set_defaults(handler=command_encode)

    info = commands.add_parser(
        "info",
        help="parameter counts (total, backbone, each head) and effective settings of a config",
        description="Build the config's network on the meta device (no weights allocated) and print its parameter "
        "counts and the effective configuration after defaults and overrides.",
    )
    info.add_argument("config", help="YAML config")
    add_set_argument(info)
    info.set_defaults(handler=command_info)

    plan = commands.add_parser(
        "plan",
        help="parameters, FLOPs, images/s, memory per GPU, days and GPU-hours of a config's run",
        description="Estimate a configured run before starting it, on the CPU in seconds: parameters, FLOPs per "
        "image per training step (counted on fake tensors: every pass of the objective), images/s and step time "
        "(a measured throughput from dumo/plan_table.yaml where it has one for this GPU, network, objective and "
        "precision; else the GPU's peak FLOP/s times an assumed MFU), memory per GPU under DDP and FSDP (states "
        "plus a rough activation estimate), and the days, GPU-hours and epochs of train.steps.",
    )
    plan.add_argument("config", help="YAML config, e.g. configs/imagenet256/dumo-xl2.yaml")
    plan.add_argument("--gpus", type=positive("--gpus"), default=1, help="number of GPUs (default 1)")
    plan.add_argument(
        "--gpu", default="h100", help="GPU kind from dumo/plan_table.yaml: h100 (default), h100-pcie, h200, a100"
    )
    plan.add_argument("--mfu", type=float, help="assume this MFU instead of the table's (a fraction, e.g. 0.4)")
    plan.add_argument(
        "--dataset-size", type=positive("--dataset-size"), help="training images per epoch (default: from the data)"
    )
    add_set_argument(plan)
    plan.set_defaults(handler=command_plan)

    eval_snapshots = commands.add_parser(
        "eval-snapshots",
        help="score every EMA snapshot of a run (train.snapshot_steps), for a curve of quality against steps",
        description="Draw the same samples (seed, -n) from each RUN_DIR/snapshots/ema_step_*.safetensors and score "
        "them as 'dumo eval' does (2-D: MMD, sliced W2; images: domain FD, class fidelity; with --inception: FID "
        "and IS). The rows go to RUN_DIR/snapshots/scores.csv (step, nfe, metrics). One process.",
    )
    eval_snapshots.add_argument("run_dir", help="run directory written by 'dumo train' with snapshots")
    eval_snapshots.add_argument(
        "-n",
        "--num",
        type=positive("--num"),
        default=DATA_SAMPLES,
        help=f"samples per snapshot (default {DATA_SAMPLES})",
    )
    eval_snapshots.add_argument("--nfe", type=positive("--nfe"), nargs="+", default=[1], help="NFE (default 1)")
    eval_snapshots.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    eval_snapshots.add_argument("--batch-size", type=positive("--batch-size"), default=256, help="samples per call")
    add_inception_arguments(
        eval_snapshots, "reference statistics from 'dumo fid-stats' (default: --num of the run's training images)"
    )
    add_device_argument(eval_snapshots)
    eval_snapshots.set_defaults(handler=command_eval_snapshots)

    export = commands.add_parser(
        "export",
        help="write a run's EMA weights (safetensors) and config for sharing",
        description="Write OUT_DIR/model.safetensors (EMA weights of the latest checkpoint) and OUT_DIR/config.yaml. "
        "'dumo sample OUT_DIR ...' and 'dumo eval OUT_DIR ...' work on the result.",
    )
    export.add_argument("run_dir", help="run directory written by 'dumo train'")
    export.add_argument("out_dir", help="new (or empty) output directory")
    export.set_defaults(handler=command_export)

    import_weights = commands.add_parser(
        "import-weights",
        help="turn an official DiT or SiT checkpoint into a dumo model folder (v-head), as 'dumo export' writes",
        description="Convert the weights of the official DiT (facebookresearch/DiT) or SiT (willisma/SiT) code "
        "into OUT_DIR/model.safetensors and OUT_DIR/config.yaml, as 'dumo export' writes them: 'dumo sample OUT' "
        "needs no data. CONFIG (objective fm) supplies data, objective and training settings; its model section is "
        "replaced by what the checkpoint needs. SiT weights (Linear path, velocity prediction) map exactly to a Flow "
        "Matching model; DiT weights predict DDPM noise and are only a start for fine-tuning. .pt/.pth files are "
        "read with torch.load(weights_only=True): no code in them runs.",
    )
    import_weights.add_argument("kind", choices=("dit", "sit"), help="the code that trained the checkpoint")
    import_weights.add_argument("checkpoint", help="official checkpoint (.pt, .pth or .safetensors)")
    import_weights.add_argument("--config", required=True, help="YAML config, e.g. configs/imagenet256/fm-xl2.yaml")
    import_weights.add_argument("--out", required=True, help="new (or empty) output directory")
    import_weights.add_argument(
        "--num-heads",
        type=positive("--num-heads"),
        help="attention heads (default: the standard size's; needed only for a non-standard width)",
    )
    import_weights.add_argument(
        "--autoencoder",
        help="latents: local diffusers folder of the SD-VAE that decodes the samples (stabilityai/sd-vae-ft-ema "
        "or -mse; default: data.autoencoder_path), recorded in the weights with the official scale 0.18215",
    )
    add_set_argument(import_weights)
    import_weights.set_defaults(handler=command_import_weights)

    demo = commands.add_parser(
        "demo",
        help="train DuMo on moons briefly, draw 1- and 2-NFE samples, print their MMD",
        description="The built-in default run: DuMo on 2-D moons (the shipped configs/toy/moons-dumo.yaml), "
        "then a picture of 1-NFE and 2-NFE samples over the true density and their MMD.",
    )
    demo.add_argument("--out", default="runs/demo", help="output directory (default runs/demo; replaced if a demo)")
    demo.add_argument("--steps", type=positive("--steps"), help="training steps (default: the config's)")
    add_set_argument(demo)
    demo.set_defaults(handler=command_demo)

    held_out_help = 'held-out colour-shape pairs (default "yellow triangle,purple circle,green square"; "" for none)'
    default_held_out = "yellow triangle,purple circle,green square"
    shapes = commands.add_parser(
        "shapes",
        help="the shapes world: render prompts to images, or write its evaluation prompts",
        description="The shapes world: 32x32 images of coloured circles, squares and triangles on black, drawn "
        "from their prompts ('a red circle', 'a red circle and a blue square', 'three red circles', 'a red circle "
        "left of a blue square'). 'render' draws one image per line of a prompts file (image i from the seed and "
        "i); 'prompts' writes the fixed evaluation set, seen prompts then held-out ones. Judge images with "
        "'dumo eval-shapes'.",
    )
    actions = shapes.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=Parser)
    render = actions.add_parser("render", help="render a prompts file into a samples .npz (uint8 arr_0, NHWC)")
    render.add_argument("--prompts", required=True, help="text file, one prompt a line")
    render.add_argument("--seed", type=int, default=0, help="seed (>= 0, default 0)")
    render.add_argument("--out", required=True, help="output .npz")
    render.add_argument("--force", action="store_true", help="replace --out if it exists (default: refuse)")
    prompts = actions.add_parser("prompts", help="write the evaluation prompts (seen, then held-out) to a text file")
    prompts.add_argument("--out", required=True, help="output .txt")
    prompts.add_argument(
        "--per-category",
        type=positive("--per-category"),
        default=32,
        help="prompts per category and split (default 32; fewer where a category has fewer)",
    )
    prompts.add_argument("--seed", type=int, default=0, help="seed of the choice of prompts (>= 0, default 0)")
    prompts.add_argument("--held-out", default=default_held_out, help=held_out_help)
    prompts.add_argument("--force", action="store_true", help="replace --out if it exists (default: refuse)")
    shapes.set_defaults(handler=command_shapes)

    eval_shapes = commands.add_parser(
        "eval-shapes",
        help="judge images of the shapes world against their prompts (GenEval-style accuracy)",
        description="Judge image i of SAMPLES against line i of PROMPTS: its objects (found by palette colour, "
        "shape from their geometry) must be exactly those named, with the named relation. Prints the fraction "
        "passed per category (single, two_objects, counting, position) and their mean (overall), for prompts "
        "that name no held-out pair (seen), those that do (held-out) and all.",
    )
    eval_shapes.add_argument("samples", help="samples .npz (uint8 'arr_0' (N, 32, 32, 3), as 'dumo sample' writes)")
    eval_shapes.add_argument("prompts", help="text file, one prompt a line, one line per image")
    eval_shapes.add_argument("--held-out", default=default_held_out, help=held_out_help)
    eval_shapes.set_defaults(handler=command_eval_shapes)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    for stream in (sys.stdout, sys.stderr):
        # an ASCII-only terminal or pipe (LANG=C) must not turn "±" into a crash after the work is done
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return EXIT_USAGE
        return args.handler(args)
    except DumoError as error:
        if debug:
            raise
        print(f"dumo: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (MemoryError, RuntimeError) as error:
        # the allocator's "not enough memory" (CPU) / "out of memory" (CUDA) for a size the user chose
        text = str(error)
        if debug or not (isinstance(error, MemoryError) or "not enough memory" in text or "out of memory" in text):
            raise
        first = text.strip().splitlines()[0] if text.strip() else "allocation failed"
        print(
            f"dumo: error: out of memory ({first}); lower data.batch_size, --batch-size or -n",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dumo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except OSError as error:
        # a full disk in a write that does not name its file itself (a log, a library's own files)
        from dumo.files import DISK_FULL_ERRNOS

        if debug or error.errno not in DISK_FULL_ERRNOS:
            raise
        where = f" writing {error.filename}" if error.filename else ""
        print(f"dumo: error: {DISK_FULL_ERRNOS[error.errno]}{where}; free some space and run again", file=sys.stderr)
        return EXIT_USAGE

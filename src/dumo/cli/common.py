"""What the commands of the ``dumo`` command line share: the one-line usage error, argument types and
checks, the options several commands take, and the session of a command that samples a run."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from dumo.errors import DumoError


class UsageError(DumoError):
    pass


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (the usage is one ``--help`` away)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


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
DATA_SAMPLES = 2000  # default -n for data files and scoring


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
    """--guidance W: the run samples with guidance scale W (a class- or text-conditional model only)."""
    if guidance is not None:
        if not run.conditional and guidance != 1:
            raise UsageError("--guidance needs a class-conditional model")
        run.config.sample.guidance_scale = guidance


def check_head(run, head: str) -> None:
    """A one-line error unless the run's model has ``head`` (dumo sample --head)."""
    if head not in run.model.heads:
        raise UsageError(f"--head {head}: this model has no such head (its heads: {', '.join(run.model.heads)})")


def check_png_folder(path: Path, option: str) -> None:
    """Refuse to replace a folder of PNGs that holds anything dumo did not write there."""
    from dumo.runs.sample_files import PNG_FOLDER_FILES

    if not path.is_dir():
        return
    others = sorted(p.name for p in path.iterdir() if not (re.match(PNG_FOLDER_FILES, p.name) and p.is_file()))
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise UsageError(
            f"{option} {path} holds files dumo did not write ({shown}); dumo replaces only a folder of its own "
            "PNGs: choose another folder"
        )


def inception_line(scores: dict[str, float]) -> str:
    return f"FID {scores['fid']:.3f}  IS {scores['is']:.3f} ± {scores['is_std']:.3f}"


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

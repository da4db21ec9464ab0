"""dumo demo: train DuMo on moons briefly, draw 1- and 2-NFE samples and print their MMD."""

from __future__ import annotations

import argparse
import shutil
import time
from importlib import resources
from pathlib import Path

from dumo.cli.common import UsageError, add_set_argument, positive

DEMO_MARKER = ".dumo-demo"


def add_parser(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="train DuMo on moons briefly, draw 1- and 2-NFE samples, print their MMD",
        description="The built-in default run: DuMo on 2-D moons (the shipped configs/toy/moons-dumo.yaml), "
        "then a picture of 1-NFE and 2-NFE samples over the true density and their MMD.",
    )
    demo.add_argument("--out", default="runs/demo", help="output directory (default runs/demo; replaced if a demo)")
    demo.add_argument("--steps", type=positive("--steps"), help="training steps (default: the config's)")
    demo.add_argument(
        "--threads",
        type=positive("--threads"),
        default=1,
        help="CPU threads (default 1: the same numbers on every run on one kind of CPU, whatever the machine's "
        "core count; more threads sum in another order and this short run lands elsewhere)",
    )
    add_set_argument(demo)
    demo.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

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

    # The demo's MLP gains little from threads, and its printed numbers should not depend on how
    # many cores the machine has: a reduction over another number of threads rounds differently.
    torch.set_num_threads(args.threads)
    print(
        f"dumo demo: training DuMo (beta={config.objective.beta}) on moons for {config.train.steps} steps "
        f"({args.threads} CPU thread{'s' * (args.threads > 1)})"
    )
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


def packaged_config(name: str) -> Path:
    """A config shipped inside the package, e.g. ``toy/moons-dumo.yaml``."""
    return Path(str(resources.files("dumo") / "configs" / name))

"""Training speed at paper scale on one GPU, as one markdown table: images/s, MFU and peak memory
of Flow Matching, MeanFlow (finite difference) and DuMo (no-grad target passes in tf32 or bf16),
on DiT-B/2 and DiT-XL/2 (4x32x32 latents, 1000 classes, guidance zeta 0.5), eager and compiled,
then 1-NFE sampling of DiT-XL/2 against one bare forward pass.

    python benchmarks/gpu_speed.py [--budget 420] [--steps 5]      # one H100: about 8 minutes at most
    python benchmarks/gpu_speed.py --tiny --backend aot_eager      # a tiny DiT on the CPU, in seconds

The step is the trainer's: autocast, the objective, backward, gradient clipping, AdamW (fused on
CUDA) and the EMA update, the network compiled as ``train.compile`` does it (``true``: the whole
network; ``blocks``: each transformer block). MFU divides the FLOPs the training log counts
(every pass of the objective, :func:`dumo.training.throughput.count_step_cost`) by the GPU's peak
in ``dumo/plan_table.yaml``. Cases run in order of importance and stop when the time budget is
spent (the rest are listed as skipped); a case that runs out of memory says so and the run goes on.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from functools import cache

import torch

from dumo.config import Config, config_from_dict
from dumo.data.batch import Batch
from dumo.models import set_activation_checkpointing
from dumo.network import build_network
from dumo.objectives import build_objective
from dumo.samplers import flow_map_sample
from dumo.training import compiling
from dumo.training.ema import EMA
from dumo.training.throughput import count_step_cost, matmul_precision, peak_flops

CLASSES = 1000
SHAPE = (4, 32, 32)
TINY_SHAPE = (4, 8, 8)
TINY_MODEL = {"hidden_dim": 32, "depth": 2, "num_heads": 2}
ZETA = 0.5
MEANFLOW_FD = {"name": "meanflow", "derivative": "finite_difference", "zeta": ZETA}
OBJECTIVES = {  # label: the objective section (target passes in objective.target_precision)
    "FM": {"name": "fm"},
    "MeanFlow FD, tf32 targets": {**MEANFLOW_FD, "target_precision": "tf32"},
    "MeanFlow FD, bf16 targets": {**MEANFLOW_FD, "target_precision": "bf16"},
    "DuMo, tf32 targets": {"name": "dumo", "zeta": ZETA, "target_precision": "tf32"},
    "DuMo, bf16 targets": {"name": "dumo", "zeta": ZETA, "target_precision": "bf16"},
}
ALL = tuple(OBJECTIVES)
CHEAP = ("FM", "DuMo, tf32 targets")


@dataclass(frozen=True)
class Case:
    model: str
    batch: int
    precision: str  # train.precision: bf16 autocast, or fp32 (TF32 matmuls on CUDA)
    compile: bool | str  # train.compile
    objective: str  # a key of OBJECTIVES
    checkpointing: bool = False  # train.activation_checkpointing


def full_plan() -> list[Case]:
    """The cases in order of importance: eager bf16 first, then compiled, larger batches, fp32."""
    plan = [Case("DiT-B/2", 128, "bf16", False, o) for o in ALL]
    plan += [Case("DiT-XL/2", 64, "bf16", False, o) for o in ALL]
    plan += [Case("DiT-B/2", 128, "bf16", "blocks", o) for o in ALL]
    plan += [Case("DiT-XL/2", 64, "bf16", "blocks", o) for o in ALL]
    plan += [Case("DiT-B/2", 256, "bf16", False, o) for o in CHEAP]
    plan += [Case("DiT-XL/2", batch, "bf16", False, o) for batch in (128, 256) for o in CHEAP]
    plan += [Case("DiT-B/2", 64, "fp32", False, o) for o in ALL[:2] + ALL[3:4]]
    plan += [Case("DiT-XL/2", 256, "bf16", False, o, checkpointing=True) for o in CHEAP]
    plan += [Case("DiT-XL/2", 128, "bf16", "blocks", o) for o in CHEAP]
    plan += [Case("DiT-B/2", 128, "bf16", True, o) for o in CHEAP]  # whole-network compile builds slowest
    return plan


def tiny_plan() -> list[Case]:
    """Every column and kind of row, in seconds: each objective eager, one compiled, one in fp32."""
    plan = [Case("DiT-S/2", 4, "bf16", False, o) for o in ALL]
    plan += [Case("DiT-S/2", 4, "bf16", "blocks", "DuMo, tf32 targets", checkpointing=True)]
    return plan + [Case("DiT-S/2", 8, "fp32", False, "FM")]


def run_config(case: Case, tiny: bool) -> Config:
    objective = OBJECTIVES[case.objective]
    shape = TINY_SHAPE if tiny else SHAPE
    return config_from_dict(
        {
            "data": {"name": "random_latents", "latent_shape": list(shape), "num_classes": CLASSES},
            "model": {"name": case.model, **(TINY_MODEL if tiny else {})},
            "objective": objective,
            "train": {
                "precision": case.precision,
                "compile": case.compile,
                "activation_checkpointing": case.checkpointing,
                "tf32": True,
            },
        }
    )


@cache
def flops_per_image(model: str, objective: str, tiny: bool) -> float:
    """Counted once per network and objective: batch, precision and compilation do not change it."""
    config = run_config(Case(model, 1, "bf16", False, objective), tiny)
    return count_step_cost(config, config.data.latent_shape, CLASSES).flops_per_image


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(case: Case, device: torch.device, steps: int, tiny: bool) -> dict[str, float]:
    """Median step time, the warm-up steps' time (compilation happens there) and peak memory of
    the trainer's step for one case."""
    config = run_config(case, tiny)
    shape = tuple(config.data.latent_shape)
    torch.manual_seed(0)
    objective = build_objective(config.objective, CLASSES)
    with torch.device(device):  # built in place: a DiT-XL/2 initialised on the CPU takes seconds
        model = build_network(config, shape, CLASSES)
    set_activation_checkpointing(model, case.checkpointing)
    ema = EMA(model, 0.9999)
    step_model = compiling.compile_network(model, case.compile)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = Batch(torch.randn(case.batch, *shape, device=device), torch.arange(case.batch, device=device) % CLASSES)
    bf16 = case.precision == "bf16"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    warmup = 3 if case.compile else 2
    warmup_started = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            warmup_seconds = time.perf_counter() - warmup_started
        synchronise(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = objective(step_model, batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.update(model, i + 1)
        synchronise(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss.item()}")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"seconds": statistics.median(times), "warmup_seconds": warmup_seconds, "peak_gib": peak}


def row(case: Case, result: dict[str, float], device: torch.device, tiny: bool) -> str:
    images_per_sec = case.batch / result["seconds"]
    achieved = flops_per_image(case.model, case.objective, tiny) * images_per_sec
    peak, _ = peak_flops(device, matmul_precision(case.precision))
    mfu = f"{achieved / peak:.3f}" if peak else "-"
    memory = f"{result['peak_gib']:.1f}" if result["peak_gib"] is not None else "-"
    numbers = [f"{images_per_sec:.1f}", f"{1000 * result['seconds']:.1f}", f"{achieved / 1e12:.3g}", mfu, memory]
    return cells(case) + " " + " | ".join([*numbers, f"{result['warmup_seconds']:.0f}"]) + " |"


def cells(case: Case) -> str:
    compiled = {False: "eager", True: "whole", "blocks": "blocks"}[case.compile]
    compiled += ", checkpointed blocks" if case.checkpointing else ""
    return f"| {case.model} | {case.batch} | {case.precision} | {compiled} | {case.objective} |"


def sampling_ratio(model_name: str, batch: int, device: torch.device, steps: int, tiny: bool) -> tuple[float, float]:
    """(bare forward passes/s, 1-NFE samples/s as forward passes/s) of a DuMo model under bf16 autocast."""
    config = run_config(Case(model_name, batch, "bf16", False, "DuMo, tf32 targets"), tiny)
    shape = tuple(config.data.latent_shape)
    with torch.device(device):
        model = build_network(config, shape, CLASSES).eval()
    noise = torch.randn(batch, *shape, device=device)
    labels = torch.arange(batch, device=device) % CLASSES
    t = torch.ones(batch, device=device)

    def median_time(call) -> float:
        times = []
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            for i in range(2 + steps):
                synchronise(device)
                start = time.perf_counter()
                call()
                synchronise(device)
                if i >= 2:
                    times.append(time.perf_counter() - start)
        return statistics.median(times)

    bare = median_time(lambda: model(noise, t, cond=labels))
    sampled = median_time(lambda: flow_map_sample(model, noise, [1.0], labels))
    return batch / bare, batch / sampled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny DiT on small latents: checks the script in seconds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; cases left when it is spent are skipped")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (after warm-up steps)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: no code generation)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    compiling.BACKEND = args.backend
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # train.tf32: the fp32 rows use TF32 matmuls
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type}, {torch.get_num_threads()} threads"
    print(f"{name}, torch {torch.__version__}, guidance zeta {ZETA}, median of {args.steps} steps\n")
    columns = ("network", "batch", "precision", "compile", "objective", "images/s", "step ms", "TFLOP/s", "MFU")
    print("| " + " | ".join([*columns, "peak GiB", "warm-up s"]) + " |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    plan = tiny_plan() if args.tiny else full_plan()
    for case in plan:
        # a compiled case starts only with time left to build (whole DiT-B/2 took over 75 s on an H100)
        if time.perf_counter() - started + (90 if case.compile else 15) > args.budget:
            print(cells(case) + " skipped (time budget) | | | | | |", flush=True)
            continue
        build_started = time.perf_counter()
        try:
            line = row(case, measure(case, device, args.steps, args.tiny), device, args.tiny)
        except torch.cuda.OutOfMemoryError:
            line = cells(case) + " out of memory | | | | | |"
        except Exception as error:  # one failed case must not cost the rest of the table
            line = cells(case) + f" failed: {type(error).__name__}: {str(error).splitlines()[0][:80]} | | | | | |"
        print(line, flush=True)
        print(f"  ({time.perf_counter() - build_started:.0f}s with building)", file=sys.stderr, flush=True)
        torch._dynamo.reset()  # each case builds its own graphs: the warm-up column is its whole build
        if device.type == "cuda":
            torch.cuda.empty_cache()
    model, batch = ("DiT-S/2", 4) if args.tiny else ("DiT-XL/2", 64)
    forward, sampled = sampling_ratio(model, batch, device, args.steps, args.tiny)
    print(f"\n| 1-NFE sampling, {model}, batch {batch}, bf16 | images/s | relative to a bare forward |")
    print("|---|---|---|")
    print(f"| bare forward pass | {forward:.1f} | 1.000 |")
    print(f"| flow_map_sample, 1 step | {sampled:.1f} | {sampled / forward:.3f} |")
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

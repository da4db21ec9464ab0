"""Median training-step time of each objective on the same network, batch and machine, in one run.

    .venv/bin/python benchmarks/step_cost.py [--networks mlp dit28 dit-s2] [--steps 10] [--device cpu]
        [--batch N] [--precision bf16] [--target-precision fp32|tf32|bf16] [--compile [blocks]] [--methods NAME ...]

Reports ratios to Flow Matching and to MeanFlow (JVP-free), next to the pass accounting (a
forward+backward costs about 3 forward passes): with guidance, DuMo = 3 + 3 = 6 units (u at t +- e,
unconditional v), MeanFlow JVP-free = 3 + 4 = 7 (u at t +- e, conditional and unconditional v at
r = t), Flow Matching = 3. Also 1-NFE sampling throughput relative to one bare forward pass.
The dit-s2 network, data shape and batch are read from configs/bench/dit-s2-dumo.yaml, the
settings that 'dumo train configs/bench/dit-s2-*.yaml' times. On CUDA the peak memory of each
objective's step is printed too. Not a test: numbers depend on the machine; compare ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dumo.config import load_config
from dumo.data.batch import Batch
from dumo.models import ModelConfig, build_model
from dumo.objectives import DuMoConfig, FlowMatchingConfig, MeanFlowConfig, build_objective
from dumo.samplers import flow_map_sample
from dumo.training.compiling import compile_network

BENCH = load_config(Path(__file__).resolve().parents[1] / "configs" / "bench" / "dit-s2-dumo.yaml")
NETWORKS = {
    # name: (model config, data shape, batch size)
    "mlp": (ModelConfig(name="mlp", hidden_dim=256, depth=4), (2,), 256),
    "dit28": (ModelConfig(name="DiT-S/4", hidden_dim=192, depth=6, num_heads=3), (1, 28, 28), 32),
    "dit-s2": (BENCH.model, tuple(BENCH.data.latent_shape), BENCH.data.batch_size),
    "dit-b2": (ModelConfig(name="DiT-B/2"), (4, 32, 32), 8),
    "dit-xl2": (ModelConfig(name="DiT-XL/2"), (4, 32, 32), 8),
}
ZETA = 0.5
METHODS = {
    "Flow Matching": FlowMatchingConfig(),
    "MeanFlow (exact JVP)": MeanFlowConfig(derivative="jvp", zeta=ZETA),
    "MeanFlow (JVP-free)": MeanFlowConfig(derivative="finite_difference", zeta=ZETA),
    "DuMo (FD, batched)": DuMoConfig(zeta=ZETA),
    "DuMo (FD, unbatched)": DuMoConfig(zeta=ZETA, batch_target_passes=False),
    "DuMo (exact JVP)": DuMoConfig(derivative="jvp", zeta=ZETA),
}
UNITS = {"Flow Matching": 3, "MeanFlow (JVP-free)": 7, "DuMo (FD, batched)": 6, "DuMo (FD, unbatched)": 6}
CLASSES = BENCH.data.num_classes


@dataclass
class Settings:
    steps: int
    device: torch.device
    batch_size: int | None = None  # None: the network's own
    bf16: bool = False
    compile: bool | str = False  # train.compile: True (the whole network) or "blocks"


def time_steps(network: str, objective_config, settings: Settings) -> tuple[float, float]:
    """Median step time (s) and peak CUDA memory (GiB; 0 on the CPU) of one objective."""
    model_config, shape, batch_size = NETWORKS[network]
    batch_size = settings.batch_size or batch_size
    device = settings.device
    torch.manual_seed(0)
    objective = build_objective(objective_config, num_classes=CLASSES)
    model = build_model(model_config, shape, objective.heads, CLASSES, objective.time_inputs).to(device)
    # as the trainer does: the no-grad target passes go through the compiled network too (the exact
    # JVP runs eagerly inside torch.func.jvp either way)
    step_model = compile_network(model, settings.compile)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = Batch(torch.randn(batch_size, *shape, device=device), torch.arange(batch_size, device=device) % CLASSES)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if settings.bf16 else contextlib.nullcontext()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(settings.steps + 3):  # three warm-up steps (compilation happens there)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = objective(step_model, batch).loss
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return statistics.median(times), peak


def sampling_ratio(network: str, settings: Settings) -> float:
    """1-NFE samples per second over bare forward passes per second, same network and batch."""
    model_config, shape, batch_size = NETWORKS[network]
    batch_size = settings.batch_size or batch_size
    device, steps = settings.device, settings.steps
    model = build_model(model_config, shape, ("v", "u"), CLASSES).to(device).eval()
    noise = torch.randn(batch_size, *shape, device=device)
    labels = torch.arange(batch_size, device=device) % CLASSES
    t = torch.ones(batch_size, device=device)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if settings.bf16 else contextlib.nullcontext()

    def median_time(fn) -> float:
        with torch.no_grad(), autocast:
            for _ in range(3):
                fn()
            times = []
            for _ in range(steps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    bare = median_time(lambda: model(noise, t, cond=labels))
    sampled = median_time(lambda: flow_map_sample(model, noise, [1.0], labels))
    return bare / sampled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", default=["mlp", "dit28", "dit-s2"], choices=list(NETWORKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, help="batch size for every network (default: each network's own)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast the network")
    parser.add_argument(
        "--compile",
        nargs="?",
        const=True,
        default=False,
        choices=("blocks",),
        help="compile the network as train.compile does: the whole network, or with 'blocks' each transformer block",
    )
    parser.add_argument(
        "--target-precision", choices=("fp32", "tf32", "bf16"), help="objective.target_precision of DuMo and MeanFlow"
    )
    args = parser.parse_args()
    if args.target_precision:
        for config in METHODS.values():
            if hasattr(config, "target_precision"):
                config.target_precision = args.target_precision
    methods = list(dict.fromkeys(["Flow Matching", "MeanFlow (JVP-free)", *args.methods]))  # the two baselines
    settings = Settings(args.steps, torch.device(args.device), args.batch, args.precision == "bf16", args.compile)
    print(
        f"device {settings.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.precision}, "
        f"compile {args.compile}, guidance zeta {ZETA}, target passes {args.target_precision or 'fp32'}"
    )
    for network in args.networks:
        measured = {name: time_steps(network, METHODS[name], settings) for name in methods}
        fm, mf = measured["Flow Matching"][0], measured["MeanFlow (JVP-free)"][0]
        batch = settings.batch_size or NETWORKS[network][2]
        print(f"\n{network} (batch {batch}), median of {args.steps} steps")
        print(f"{'method':24s} {'vs FM':>7s} {'vs MeanFlow FD':>15s} {'units (FM=3)':>13s} {'peak GiB':>9s}")
        for name, (median, peak) in measured.items():
            units = UNITS.get(name)
            shown = f"{units}" if units else "-"
            print(f"{name:24s} {median / fm:7.3f} {median / mf:15.3f} {shown:>13s} {peak:9.2f}")
        ratio = sampling_ratio(network, settings)
        print(f"1-NFE sampling throughput / bare forward throughput: {ratio:.3f}")
        if settings.device.type == "cuda":  # single-GPU training throughput, no DDP
            shown = ", ".join(f"{name} {batch / median:.0f}" for name, (median, _) in measured.items())
            print(f"training images/s: {shown}")


if __name__ == "__main__":
    main()

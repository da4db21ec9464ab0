"""Median training-step time of each objective on the same network, batch and machine, in one run.

    .venv/bin/python benchmarks/step_cost.py [--networks mlp dit28 dit-s2] [--steps 10] [--device cpu]

Reports ratios to Flow Matching and to MeanFlow (JVP-free), next to the pass accounting (a
forward+backward costs about 3 forward passes): with guidance, DuMo = 3 + 3 = 6 units (u at t +- e,
unconditional v), MeanFlow JVP-free = 3 + 4 = 7 (u at t +- e, conditional and unconditional v at
r = t), Flow Matching = 3. Also 1-NFE sampling throughput relative to one bare forward pass.
Not a test: numbers depend on the machine; compare ratios, not times.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dumo.data.batch import Batch
from dumo.models import ModelConfig, build_model
from dumo.objectives import DuMoConfig, FlowMatchingConfig, MeanFlowConfig, build_objective
from dumo.samplers import flow_map_sample

NETWORKS = {
    # name: (model config, data shape, batch size)
    "mlp": (ModelConfig(name="mlp", hidden_dim=256, depth=4), (2,), 256),
    "dit28": (ModelConfig(name="DiT-S/4", hidden_dim=192, depth=6, num_heads=3), (1, 28, 28), 32),
    "dit-s2": (ModelConfig(name="DiT-S/2"), (4, 32, 32), 8),
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
CLASSES = 10


def time_steps(network: str, objective_config, steps: int, device: torch.device) -> float:
    model_config, shape, batch_size = NETWORKS[network]
    torch.manual_seed(0)
    objective = build_objective(objective_config, num_classes=CLASSES)
    model = build_model(model_config, shape, objective.heads, CLASSES, objective.time_inputs).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = Batch(torch.randn(batch_size, *shape, device=device), torch.arange(batch_size, device=device) % CLASSES)
    times = []
    for i in range(steps + 3):  # three warm-up steps
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        objective(model, batch).loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def sampling_ratio(network: str, steps: int, device: torch.device) -> float:
    """1-NFE samples per second over bare forward passes per second, same network and batch."""
    model_config, shape, batch_size = NETWORKS[network]
    model = build_model(model_config, shape, ("v", "u"), CLASSES).to(device).eval()
    noise = torch.randn(batch_size, *shape, device=device)
    labels = torch.arange(batch_size, device=device) % CLASSES
    t = torch.ones(batch_size, device=device)

    def median_time(fn) -> float:
        with torch.no_grad():
            for _ in range(3):
                fn()
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
        return statistics.median(times)

    bare = median_time(lambda: model(noise, t, labels=labels))
    sampled = median_time(lambda: flow_map_sample(model, noise, [1.0], labels))
    return bare / sampled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, guidance zeta {ZETA}")
    for network in args.networks:
        medians = {name: time_steps(network, config, args.steps, device) for name, config in METHODS.items()}
        fm, mf = medians["Flow Matching"], medians["MeanFlow (JVP-free)"]
        print(f"\n{network} (batch {NETWORKS[network][2]}), median of {args.steps} steps")
        print(f"{'method':24s} {'vs FM':>7s} {'vs MeanFlow FD':>15s} {'units (FM=3)':>13s}")
        for name, median in medians.items():
            units = UNITS.get(name)
            shown = f"{units}" if units else "-"
            print(f"{name:24s} {median / fm:7.3f} {median / mf:15.3f} {shown:>13s}")
        print(f"1-NFE sampling throughput / bare forward throughput: {sampling_ratio(network, args.steps, device):.3f}")


if __name__ == "__main__":
    main()

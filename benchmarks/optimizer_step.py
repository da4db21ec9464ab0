"""Cost of the per-step bookkeeping on a large network: AdamW (per-tensor, foreach, fused) and the
EMA update (per-tensor loop, foreach), with no forward or backward pass.

    .venv/bin/python benchmarks/optimizer_step.py [--model DiT-XL/2] [--device cuda] [--steps 20]

The trainer uses fused AdamW on CUDA (foreach on the CPU) and the foreach EMA update. Prints the
median time of each variant relative to the per-tensor one; compare ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dumo.models import ModelConfig, build_model
from dumo.training.ema import EMA


def median_seconds(function, steps: int, device: torch.device) -> float:
    times = []
    for i in range(steps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DiT-XL/2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    model = build_model(ModelConfig(name=args.model), (4, 32, 32), ("v", "u"), 1000).to(device)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter) * 1e-3
    count = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {count / 1e6:.0f}M parameters in {len(list(model.parameters()))} tensors, on {device}")
    variants = {"per-tensor": {"foreach": False}, "foreach": {"foreach": True}}
    if device.type == "cuda":
        variants["fused"] = {"fused": True}
    timings = {}
    for name, options in variants.items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **options)
        timings[f"AdamW {name}"] = median_seconds(optimizer.step, args.steps, device)
        del optimizer
    ema = EMA(model, decay=0.9999)

    def ema_loop() -> None:
        with torch.no_grad():
            for average, current in zip(ema.model.parameters(), model.parameters()):
                average.lerp_(current, 1e-4)

    timings["EMA per-tensor"] = median_seconds(ema_loop, args.steps, device)
    timings["EMA foreach (dumo)"] = median_seconds(lambda: ema.update(model, 10_000), args.steps, device)
    base_adam, base_ema = timings["AdamW per-tensor"], timings["EMA per-tensor"]
    for name, seconds in timings.items():
        base = base_adam if name.startswith("AdamW") else base_ema
        extra = f"  {seconds * 1e3:.2f} ms" if device.type == "cuda" else ""
        print(f"{name:22s} {seconds / base:6.3f} x per-tensor{extra}")


if __name__ == "__main__":
    main()

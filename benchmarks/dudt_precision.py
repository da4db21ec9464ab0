"""Error of DuMo's finite-difference du/dt for each ``objective.target_precision``, against fp64.

    .venv/bin/python benchmarks/dudt_precision.py [--device cpu|cuda] [--model DiT-B/2] [--batch 8]
        [--epsilons 0.05 0.005] [--precisions fp32 bf16]      (tf32 only means something on CUDA)

A DiT with random weights (its zero-initialised output layers given small random ones, so that u
depends on t at all) on ImageNet-256 latents (4x32x32), times spread over [0.05, 0.95]. Each
choice runs the training objective as a bf16 run does (autocast bf16 around the step) and reads
its du/dt target. Two references, both in fp64 on the same inputs:
  - the exact derivative (forward-mode JVP): total error = stencil truncation + rounding;
  - the same central difference in fp64: the rounding error alone, what the precision adds.
Errors are relative: |du/dt - reference| / |reference| over the whole batch.
"""

from __future__ import annotations

import argparse

import torch
from gpu_checks import CLASSES, model_and_batch

from dumo.objectives import DuMoConfig, build_objective


def du_dt(model, config: DuMoConfig, x, z, t, labels, autocast: bool) -> torch.Tensor:
    objective = build_objective(config, CLASSES)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        return objective.loss(model, x, z, t, labels).targets["du_dt"].double()


def relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="DiT-B/2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.05, 0.005])
    parser.add_argument("--precisions", nargs="+", default=None, help="default: fp32 bf16 (+ tf32 on CUDA)")
    args = parser.parse_args()
    device = torch.device(args.device)
    precisions = args.precisions or (["fp32", "tf32", "bf16"] if device.type == "cuda" else ["fp32", "bf16"])
    objective = build_objective(DuMoConfig(), CLASSES)
    model, batch = model_and_batch(objective, device, args.model, args.batch)
    model.eval()
    generator = torch.Generator(device="cpu").manual_seed(1)
    x = batch.x
    z = torch.randn(x.shape, generator=generator).to(device)
    t = torch.linspace(0.05, 0.95, args.batch, device=device)
    labels = batch.cond
    model64 = model.double()
    exact = du_dt(model64, DuMoConfig(derivative="jvp"), x.double(), z.double(), t.double(), labels, False)
    print(
        f"{args.model} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
        f"batch {args.batch}, |du/dt| RMS {exact.pow(2).mean().sqrt().item():.3f}"
    )
    print("| epsilon | target_precision | error vs exact JVP (fp64) | error vs fp64 difference (rounding) |")
    print("|---|---|---|---|")
    for epsilon in args.epsilons:
        stencil = du_dt(model64, DuMoConfig(epsilon=epsilon), x.double(), z.double(), t.double(), labels, False)
        model32 = model.float()
        for precision in precisions:
            value = du_dt(model32, DuMoConfig(epsilon=epsilon, target_precision=precision), x, z, t, labels, True)
            print(f"| {epsilon} | {precision} | {relative(value, exact):.2e} | {relative(value, stencil):.2e} |")
        print(f"| {epsilon} | fp64 | {relative(stencil, exact):.2e} | 0 |")
        model64 = model.double()


if __name__ == "__main__":
    main()

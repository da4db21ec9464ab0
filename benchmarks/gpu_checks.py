"""Checks only a GPU can make, run by benchmarks/gpu.sh (never by the tests).

1. The DuMo finite-difference step (bf16 autocast) runs with scaled_dot_product_attention limited
   to the fused kernels (flash, memory-efficient; no math kernel): its no-grad target passes (fp32
   by default, so memory-efficient) and its gradient pass (bf16, flash) all use fused attention.
   With objective.target_precision bf16, the whole step runs on the flash kernel alone.
2. The exact-JVP objectives run under the same limit: their forward-mode pass switches to the
   math kernel by itself, and nowhere else.
3. On the GPU, fp32: du/dt by finite difference (epsilon 0.005) against the exact JVP on a DiT-B/2
   with random weights (its zero-initialised output layers given small random ones, so that u
   depends on t at all).

    .venv/bin/python benchmarks/gpu_checks.py [--device cuda] [--model DiT-B/2] [--batch 16]
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dumo.data.batch import Batch
from dumo.models import ModelConfig, build_model
from dumo.objectives import DuMoConfig, MeanFlowConfig, TimeConfig, build_objective

CLASSES = 1000


def model_and_batch(objective, device, name, batch_size):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name), (4, 32, 32), objective.heads, CLASSES, objective.time_inputs)
    with torch.no_grad():  # zero-initialised output layers would make every derivative 0
        for parameter in model.parameters():
            if parameter.abs().max() == 0:
                parameter.normal_(0, 0.02)
    batch = Batch(torch.randn(batch_size, 4, 32, 32, device=device), torch.arange(batch_size, device=device) % CLASSES)
    return model.to(device), batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="DiT-B/2")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    device = torch.device(args.device)
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    flash = [SDPBackend.FLASH_ATTENTION]
    for name, config, kernels, shown in (
        ("DuMo (finite difference)", DuMoConfig(zeta=0.5), fused, "fused kernels"),
        ("DuMo (FD, bf16 passes)", DuMoConfig(zeta=0.5, target_precision="bf16"), flash, "the flash kernel"),
        # its fp32 guidance pass needs the memory-efficient kernel (flash takes bf16 only)
        ("DuMo (exact JVP)", DuMoConfig(zeta=0.5, derivative="jvp"), fused, "fused kernels"),
        ("MeanFlow (exact JVP)", MeanFlowConfig(zeta=0.5, derivative="jvp"), flash, "the flash kernel"),
    ):
        objective = build_objective(config, CLASSES)
        model, batch = model_and_batch(objective, device, args.model, args.batch)
        try:
            with sdpa_kernel(kernels), torch.autocast(device.type, dtype=torch.bfloat16):
                loss = objective(model, batch).loss
            loss.backward()
            print(f"{name}: bf16 step with attention limited to {shown}: ok (loss {loss.item():.4f})")
        except RuntimeError as error:
            print(f"{name}: bf16 step with attention limited to {shown}: FAILED ({str(error).splitlines()[0]})")

    middle = TimeConfig(theta1=20.0, theta2=20.0)  # t near 0.5, away from the stencil's cut at 0 and 1
    objective = build_objective(DuMoConfig(derivative="jvp", time=middle), CLASSES)
    model, batch = model_and_batch(objective, device, args.model, args.batch)
    torch.manual_seed(1)
    exact = objective(model, batch).targets["du_dt"]
    torch.manual_seed(1)
    approx = build_objective(DuMoConfig(time=middle), CLASSES)(model, batch).targets["du_dt"]
    error = ((approx - exact).norm() / exact.norm()).item()
    print(f"{args.model} fp32 on {device.type}: finite-difference du/dt vs exact JVP, relative error {error:.2e}")


if __name__ == "__main__":
    main()

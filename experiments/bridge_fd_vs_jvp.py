"""How far DuMo's finite-difference du/dt is from the exact one (torch.func.jvp) on diffusers
transformers, per family and stencil half-width e.

    OMP_NUM_THREADS=1 PYTHONPATH=src python experiments/bridge_fd_vs_jvp.py [--steps 300]

Tiny random SANA, SD3 and FLUX transformers (the ones of tests/helpers/diffusers_tiny.py), each at
random initialisation and after ``--steps`` of Flow Matching on a small synthetic text-to-latent set
(the u-head then copies the trained v-head, as DuMo starts from a teacher). du/dt is taken along the
conditional path (z - x) at 8 times in [0.1, 0.9] (8 samples); each cell gives ||FD - JVP|| / ||JVP||
over the batch and, in brackets, the median of the per-sample ratios, in fp32 (dumo's target passes)
and with fp64 weights (diffusers computes the sinusoidal time embedding, and SANA its linear
attention, in fp32 whatever the model's dtype, so this column is not all fp64).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny models of the tests

from helpers.diffusers_tiny import CHANNELS, SIDE, random_prompts, tiny_transformer  # noqa: E402

from dumo.bridge import DualHeadTransformer  # noqa: E402
from dumo.objectives.base import central_difference_times, difference_quotient, time_derivative_jvp  # noqa: E402
from dumo.paths import LinearPath  # noqa: E402

FAMILIES = ("sana", "sd3", "flux")
EPSILONS = (1e-2, 1e-3, 1e-4, 1e-5)


def synthetic_set(rows: int = 32, seed: int = 0):
    """Prompts and, for each, one smooth latent that depends on the prompt (a 2x2 field upsampled)."""
    generator = torch.Generator().manual_seed(seed)
    cond = random_prompts(rows, seed=seed + 1)
    projection = torch.randn(cond.tokens.shape[-1], CHANNELS * 4, generator=generator) / 2
    coarse = (cond.tokens[:, 0] @ projection).reshape(rows, CHANNELS, 2, 2)
    latents = torch.nn.functional.interpolate(coarse, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    return latents, cond


def train_flow_matching(model: DualHeadTransformer, steps: int, seed: int = 0) -> DualHeadTransformer:
    """Flow Matching on the v-head (the whole transformer), then the u-head copies the v-head."""
    latents, cond = synthetic_set()
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(model.transformer.parameters(), lr=1e-3)
    path = LinearPath()
    for _ in range(steps):
        rows = torch.randint(0, latents.shape[0], (16,), generator=generator)
        x, c = latents[rows], cond.rows(rows)
        z = torch.randn(x.shape, generator=generator)
        t = torch.rand(16, generator=generator)
        loss = (model(path.sample(x, z, t), t, cond=c).v - path.velocity(x, z, t)).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return DualHeadTransformer(model.transformer)  # a fresh copy of the trained output layers


def relative_errors(model: DualHeadTransformer, dtype: torch.dtype, seed: int = 5) -> dict[float, tuple[float, float]]:
    """Per stencil half-width: (error over the batch, median per-sample error)."""
    model = model.to(dtype).eval()
    latents, cond = synthetic_set()
    generator = torch.Generator().manual_seed(seed)
    rows = torch.arange(8)
    x, c = latents[rows].to(dtype), cond.rows(rows)
    c = type(c)(c.tokens.to(dtype), c.mask, None if c.pooled is None else c.pooled.to(dtype))
    z = torch.randn(x.shape, generator=generator).to(dtype)
    t = torch.linspace(0.1, 0.9, 8, dtype=dtype)
    path = LinearPath()
    x_t, direction = path.sample(x, z, t), path.velocity(x, z, t)

    def flow_map(x_in, t_in):
        return model(x_in, t_in, cond=c).u

    with torch.no_grad():
        _, exact = time_derivative_jvp(flow_map, x_t, t, direction)
        errors = {}
        for epsilon in EPSILONS:
            t_low, t_high = central_difference_times(t, epsilon, 0.0, 1.0)
            high = flow_map(path.sample(x, z, t_high), t_high)
            low = flow_map(path.sample(x, z, t_low), t_low)
            estimate = difference_quotient(high, low, t_high, t_low)
            per_sample = (estimate - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)
            errors[epsilon] = (((estimate - exact).norm() / exact.norm()).item(), per_sample.median().item())
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="Flow Matching steps before the trained rows")
    args = parser.parse_args()
    torch.manual_seed(0)
    print("| family | weights | dtype | " + " | ".join(f"e = {e:g}" for e in EPSILONS) + " |")
    print("|---|---|---|" + "---|" * len(EPSILONS))
    for family in FAMILIES:
        fresh = DualHeadTransformer(tiny_transformer(family))
        trained = train_flow_matching(DualHeadTransformer(tiny_transformer(family)), args.steps)
        for label, model in (("random init", fresh), (f"FM {args.steps} steps", trained)):
            for dtype in (torch.float32, torch.float64):
                errors = relative_errors(model, dtype)
                cells = " | ".join(f"{errors[e][0]:.1e} ({errors[e][1]:.1e})" for e in EPSILONS)
                print(f"| {family} | {label} | {str(dtype).removeprefix('torch.')} | {cells} |", flush=True)


if __name__ == "__main__":
    main()

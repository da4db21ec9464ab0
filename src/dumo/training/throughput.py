"""FLOPs of a training step, and the throughput columns of the training log (images/s, MFU, memory).

The FLOPs are counted, not derived from a formula: one forward and backward of the run's own
objective on a batch of one sample, under :class:`torch.utils.flop_counter.FlopCounterMode`, with
the network built as fake tensors (:class:`FakeTensorMode`: shapes only, no weights allocated, no
arithmetic done). So every pass the objective makes is in the count: DuMo's two finite-difference
passes and its unconditional guidance pass, MeanFlow's, the exact JVP's forward-mode pass. Counted
are matrix products, convolutions and attention (2 FLOPs per multiply-add), the usual convention
for MFU; elementwise work, the optimiser and the EMA update are left out. The count is the same
for fp32 and bf16, and the cost of a step is linear in its batch: FLOPs per image times batch.

MFU = achieved FLOP/s per GPU / the GPU's peak dense FLOP/s at the run's precision, from the table
in ``dumo/plan_table.yaml``; a device not in the table gets no MFU (an empty column), not a guess.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import torch
import yaml
from torch import nn

from dumo.conditioning import TextCondition
from dumo.data.batch import Batch

TABLE_FILE = "plan_table.yaml"  # peak FLOP/s per GPU kind and measured training throughput


@cache
def throughput_table() -> dict[str, Any]:
    """The parsed ``dumo/plan_table.yaml`` (GPU kinds, assumed MFU, measured images/s)."""
    return yaml.safe_load((resources.files("dumo") / TABLE_FILE).read_text())


def gpu_kind(device_name: str) -> str | None:
    """The table's key for a CUDA device name (``NVIDIA H100 80GB HBM3`` -> ``h100``), None if unknown."""
    for kind, entry in throughput_table()["gpus"].items():
        if any(m in device_name for m in entry["match"]) and not any(
            x in device_name for x in entry.get("exclude", [])
        ):
            return kind
    return None


def matmul_precision(train_precision: str) -> str:
    """What the network's matrix products run in: bf16 under autocast; for fp32, tf32 when PyTorch lets
    CUDA round fp32 matmuls to TF32 (``torch.set_float32_matmul_precision('high')``), else fp32."""
    if train_precision == "bf16":
        return "bf16"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def peak_flops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """Peak dense FLOP/s of ``device`` at ``precision`` and a description; (None, why) when unknown."""
    if device.type != "cuda":
        return None, f"no peak figure for device {device.type}"
    name = torch.cuda.get_device_name(device)
    kind = gpu_kind(name)
    if kind is None:
        return None, f"no peak figure for {name} in dumo/{TABLE_FILE}"
    tflops = throughput_table()["gpus"][kind]["peak_tflops"][precision]
    return tflops * 1e12, f"{name}, {precision} dense peak {tflops:g} TFLOP/s"


def format_flops(value: float) -> str:
    """``1.428e12`` -> ``1.428 TFLOP``."""
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if value >= scale:
            return f"{value / scale:.4g} {unit}"
    return f"{value:.4g} FLOP"


# -- counting ----------------------------------------------------------------------------------


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward_flops(grad_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


def flop_counter() -> torch.utils.flop_counter.FlopCounterMode:
    """A quiet FlopCounterMode that also counts the CPU flash-attention kernel (the fake tensors
    live on the CPU, and torch's table only names the CUDA attention kernels)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _attention_flops
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _attention_backward_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


@dataclass
class StepCost:
    """What one training step costs, per image of the batch."""

    flops_per_image: float  # forward + backward of every pass of the objective
    parameters: int  # of the network (trainable and not)
    # Tensors the gradient pass saves for backward (activations), per image and independent of the
    # batch (under bf16 autocast: the bf16 copies of the weights); None when not measured.
    activation_bytes_per_image: float | None = None
    fixed_activation_bytes: float | None = None


COUNTED_BATCH = 64


@contextlib.contextmanager
def _fixed_times(objective) -> Iterator[None]:
    """Times t = 0.5 instead of a random draw (the Beta sampler has no fake-tensor kernel; the cost
    does not depend on t), restored afterwards."""
    sampler = objective.time_sampler
    original = sampler.sample
    sampler.sample = lambda n, device="cpu": torch.full((n,), 0.5, device=device)
    try:
        yield
    finally:
        sampler.sample = original


def count_step_cost(config, shape: tuple[int, ...], num_classes: int, activations: bool = False, text=None) -> StepCost:
    """FLOPs per image of one training step of ``config`` on data of ``shape`` with ``num_classes``
    conditioning classes (0: unconditional), counted on fake tensors in a few seconds even for
    DiT-XL/2. With ``activations`` also the bytes saved for backward, from batches of 1 and 2.

    Touches no random stream, allocates no weights and needs no GPU.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dumo.models import count_parameters
    from dumo.network import build_network
    from dumo.objectives import build_objective

    bf16 = config.train.precision == "bf16"
    objective = build_objective(config.objective, num_classes)
    with torch.random.fork_rng(devices=[]), FakeTensorMode(), _fixed_times(objective):
        model = build_network(config, shape, num_classes, text)
        teacher = model if objective.wants_teacher() else None
        parameters = count_parameters(model)

        def step(batch_size: int, backward: bool) -> tuple[int, int]:
            saved = 0

            def pack(tensor: torch.Tensor) -> torch.Tensor:
                nonlocal saved
                saved += tensor.numel() * tensor.element_size()
                return tensor

            x = torch.zeros(batch_size, *shape)
            labels = torch.zeros(batch_size, dtype=torch.long) if num_classes else None
            if text is not None:  # prompts of the full length: ids of the small encoder, or embeddings
                width = () if text.encoder == "small" else (text.text_dim,)
                tokens = torch.zeros(batch_size, text.max_tokens, *width, dtype=None if width else torch.long)
                pooled = None  # a diffusers pipeline's pooled vector (SD3, FLUX)
                if text.encoder == "pipeline" and text.pooled_dim:
                    pooled = torch.zeros(batch_size, text.pooled_dim)
                labels = TextCondition(tokens, torch.ones(batch_size, text.max_tokens, dtype=torch.bool), pooled)
            counter = flop_counter()
            model.zero_grad(set_to_none=True)
            with counter:
                with (
                    torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
                    torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
                ):
                    output = objective(model.train(), Batch(x, labels), teacher_model=teacher)
                if backward:
                    output.loss.backward()
            return counter.get_total_flops(), saved

        # Counted on a batch of COUNTED_BATCH rows so that a share of the batch (Shortcut's 1/8
        # self-consistency rows) comes out as in training; a batch of 1 would give it every row.
        flops, _ = step(COUNTED_BATCH, backward=True)
        cost = StepCost(float(flops) / COUNTED_BATCH, parameters)
        if activations:
            _, saved_one = step(1, backward=False)
            _, saved_two = step(2, backward=False)
            cost.activation_bytes_per_image = float(saved_two - saved_one)
            cost.fixed_activation_bytes = float(max(2 * saved_one - saved_two, 0))
    return cost


# -- the log's throughput columns --------------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class ThroughputMeter:
    """The throughput columns of a logged row, computed only when a row is logged.

    Per step nothing is measured or synchronised: the trainer counts steps and reads the clock at
    log steps, and :meth:`measure` turns that window into images/s (global, over all ranks), mean
    step time, this process's peak memory (CUDA: ``max_memory_allocated`` since the last row;
    CPU: peak resident memory of the process's whole life, ``peak_rss_gib``) and the MFU estimate.
    """

    def __init__(
        self,
        flops_per_image: float | None,
        batch_size: int,
        world_size: int,
        device: torch.device,
        peak: float | None,
    ):
        self.flops_per_image = flops_per_image
        self.batch_size = batch_size  # the global batch: images of one step over every rank
        self.world_size = world_size
        self.device = device
        self.peak = peak  # FLOP/s of one GPU at the run's precision; None: no MFU
        self.restart_memory()

    @classmethod
    def for_run(
        cls, config, shape: tuple[int, ...], num_classes: int, device: torch.device, world_size: int, text=None
    ):
        """Count the run's step once and look its device up; also returns a line saying what was found."""
        try:
            flops = count_step_cost(config, shape, num_classes, text=text).flops_per_image
            counted = f"{format_flops(flops)} per image per training step (counted, all passes of the objective)"
        except Exception as error:  # a network the fake tensors cannot run: no MFU, but the run goes on
            flops, counted = None, f"FLOPs not counted ({type(error).__name__}: {error})"
        precision = matmul_precision(config.train.precision)
        peak, described = peak_flops(device, precision)
        meter = cls(flops, config.data.batch_size, world_size, device, peak if flops else None)
        mfu = f"MFU against {described}" if meter.peak else f"MFU column left empty: {described}"
        return meter, f"throughput: {counted}; {mfu}"

    def restart_memory(self) -> None:
        """Start a new interval for the CUDA peak (call after each logged row, evaluation or save)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def measure(self, steps: int, seconds: float) -> dict[str, float | None]:
        """The columns for ``steps`` steps that took ``seconds``; starts the next memory interval."""
        step_seconds = seconds / max(steps, 1)
        images_per_sec = self.batch_size / max(step_seconds, 1e-12)
        row: dict[str, float | None] = {"images_per_sec": images_per_sec, "step_seconds": step_seconds}
        if self.device.type == "cuda":
            row["peak_cuda_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            row["peak_rss_gib"] = peak_rss_bytes() / 2**30
        achieved = None if self.flops_per_image is None else self.flops_per_image * images_per_sec / self.world_size
        row["tflops_per_gpu"] = None if achieved is None else achieved / 1e12
        row["mfu"] = None if achieved is None or self.peak is None else achieved / self.peak
        self.restart_memory()
        return row


def model_flops_of(module: nn.Module, *inputs: Any, **kwargs: Any) -> int:
    """FLOPs of one call ``module(*inputs, **kwargs)`` under the same counter (for tests and checks)."""
    counter = flop_counter()
    with counter:
        module(*inputs, **kwargs)
    return counter.get_total_flops()

"""Writing a two-headed diffusers transformer back as a plain diffusers pipeline folder.

The folder loads and samples without dumo: it is the source pipeline with

- ``transformer/``: the trained backbone (LoRA merged in) whose output layers are the u-head's, so
  that the transformer's output is u;
- ``scheduler/``: ``FlowMatchEulerDiscreteScheduler`` with shift 1 and no dynamic shifting, whose
  Euler step ``x + (sigma_next - sigma) u`` is dumo's flow-map step: with ``sigmas=[1.0]`` it gives
  ``x_1 - u(x_1, 1)`` (1 NFE) and with ``sigmas=[1.0, t_1, ...]`` dumo's deterministic multistep
  flow-map sampler (``flow_map_sample`` with stochasticity 0). A shift other than 1 would move
  custom sigmas too, which is why it is 1.

Every other component (VAE, text encoders, tokenizers) is copied from the source folder unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

from dumo.bridge.dual_head import DualHeadTransformer
from dumo.bridge.folder import read_pipeline_folder
from dumo.bridge.lora import merged_transformer
from dumo.errors import CheckpointError

#: the scheduler of an exported pipeline, as model_index.json names it
SCHEDULER = ("diffusers", "FlowMatchEulerDiscreteScheduler")
#: where the sampling advice of an export is written (diffusers ignores unknown files)
EXPORT_NOTE = "dumo_export.json"


def u_head_transformer(model: DualHeadTransformer) -> nn.Module:
    """A plain copy of the transformer (LoRA merged) whose output layers carry the u-head's weights."""
    transformer = merged_transformer(model.transformer)
    state = model.u_head_state()
    missing, unexpected = transformer.load_state_dict(state, strict=False)
    if unexpected:
        raise CheckpointError(f"the u-head has weights the transformer lacks: {unexpected[0]}")
    return transformer


def flow_map_scheduler():
    """Euler on sigma = t with no shift: one step from sigma to sigma' is ``x + (sigma' - sigma) u``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def write_transformer_and_scheduler(model: DualHeadTransformer, out: Path) -> None:
    """``out/transformer`` (u as its output) and ``out/scheduler`` (the flow-map Euler step)."""
    u_head_transformer(model).save_pretrained(out / "transformer", safe_serialization=True)
    flow_map_scheduler().save_pretrained(out / "scheduler")


def export_diffusers_pipeline(
    model: DualHeadTransformer, source: str | Path, out: str | Path, overwrite: bool = False
) -> Path:
    """Write ``out``: the pipeline folder ``source`` with the u-head's transformer and the flow-map scheduler.

    ``out`` is written beside itself under a temporary name and moved into place at the end, so an
    interrupted export leaves no half folder under the final name. An existing ``out`` is replaced
    only with ``overwrite``.
    """
    folder = read_pipeline_folder(source)
    family = model.family
    if folder.transformer_class != family.transformer_class:
        raise CheckpointError(
            f"{folder.path} holds a {folder.transformer_class}, the model is a {family.transformer_class}"
        )
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} exists; pass overwrite to replace it")
    if out.resolve() == folder.path.resolve():
        raise CheckpointError(f"the export cannot replace its own source folder {out}")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    for name in folder.components:
        if name not in ("transformer", "scheduler"):
            shutil.copytree(folder.path / name, partial / name)
    write_transformer_and_scheduler(model, partial)
    index = json.loads((folder.path / "model_index.json").read_text())
    index["scheduler"] = list(SCHEDULER)
    (partial / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    # FLUX's guidance scale is an input of the distilled model (the one it was trained with);
    # elsewhere a scale above 1 is classifier-free guidance, two passes per step
    guidance = getattr(family, "guidance", 1.0)
    note = {
        "written_by": "dumo",
        "transformer_output": "the DuMo flow-map head u (one step from t to t' is x + (t' - t) u)",
        "one_step": {"sigmas": [1.0], "guidance_scale": guidance},
        "two_steps": {"sigmas": [1.0, 0.5], "guidance_scale": guidance},
    }
    (partial / EXPORT_NOTE).write_text(json.dumps(note, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out


def export_run_diffusers(run_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """The EMA weights of a run on a diffusers pipeline (``model.name: diffusers``), written as that
    pipeline's folder with the u-head's transformer and the flow-map scheduler
    (see :func:`export_diffusers_pipeline`)."""
    from dumo.runs.loading import load_run

    out = Path(out).expanduser()
    if out.exists() and not overwrite:  # before loading the model: refusing costs nothing
        raise CheckpointError(f"{out} exists; pass --force to replace it")
    run = load_run(run_dir)
    if not isinstance(run.model, DualHeadTransformer):
        raise CheckpointError(f"{run_dir} is not a run on a diffusers pipeline (model.name: diffusers)")
    return export_diffusers_pipeline(run.model, run.config.model.pretrained, out, overwrite=overwrite)


__all__ = [
    "EXPORT_NOTE",
    "export_diffusers_pipeline",
    "export_run_diffusers",
    "flow_map_scheduler",
    "u_head_transformer",
]

"""Exporting a two-headed diffusers transformer as a plain diffusers pipeline: the stock scheduler's
Euler steps are dumo's flow-map sampler, and the folder samples without dumo."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from helpers.diffusers_tiny import (  # noqa: E402
    random_latents,
    random_prompts,
    run_stock_pipeline,
    save_sana_pipeline,
    stock_pipeline,
    tiny_transformer,
)

from dumo.bridge import DualHeadTransformer  # noqa: E402
from dumo.bridge.folder import load_transformer  # noqa: E402
from dumo.conditioning import TextCondition  # noqa: E402
from dumo.errors import CheckpointError  # noqa: E402
from dumo.runs.diffusers_export import EXPORT_NOTE, export_diffusers_pipeline, write_transformer_and_scheduler  # noqa: E402
from dumo.samplers import flow_map_sample  # noqa: E402

FAMILIES = ("sana", "sd3", "flux")


def trained_looking(model: DualHeadTransformer, seed: int = 3) -> DualHeadTransformer:
    """Move the u-head away from its copy of the v-head, as training does, so that u and v differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.u_head.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= 1e-5 * b.abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_the_exported_schedulers_euler_steps_are_dumos_flow_map_sampler(family, tmp_path):
    import diffusers

    model = trained_looking(DualHeadTransformer(tiny_transformer(family)))
    write_transformer_and_scheduler(model, tmp_path)
    transformer = getattr(diffusers, model.family.transformer_class).from_pretrained(tmp_path / "transformer")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path / "scheduler")
    assert scheduler.config.shift == 1.0 and not scheduler.config.use_dynamic_shifting
    pipe = stock_pipeline(family, transformer)
    pipe.scheduler = scheduler
    x, cond = random_latents(2), random_prompts(2)
    with torch.no_grad():
        u = model(x, torch.ones(2), cond=cond).u
        v = model(x, torch.ones(2), cond=cond).v
        one_step = run_stock_pipeline(family, pipe, x, cond, [1.0])
        default_one_step = run_stock_pipeline(family, pipe, x, cond, None, steps=1)
        two_steps = run_stock_pipeline(family, pipe, x, cond, [1.0, 0.5])
        dumo_two_steps = flow_map_sample(model, x, [1.0, 0.5], cond, stochasticity=0.0)
    assert close(one_step, x - u) and close(default_one_step, x - u)
    assert not close(one_step, x - v)  # the export's output is the u-head, not the v-head
    assert close(two_steps, dumo_two_steps)


SAMPLE_WITHOUT_DUMO = textwrap.dedent(
    """
    import sys
    sys.modules["dumo"] = None  # any import of dumo fails
    import numpy as np, torch
    from diffusers import DiffusionPipeline
    folder, latents_file, out_file = sys.argv[1:]
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.from_numpy(np.load(latents_file))
    common = dict(guidance_scale=1.0, height=32, width=32, use_resolution_binning=False,
                  max_sequence_length=8, complex_human_instruction=None)
    with torch.no_grad():
        embeds, mask, _, _ = pipe.encode_prompt("a red cat", do_classifier_free_guidance=False,
                                                max_sequence_length=8, complex_human_instruction=None)
    one = pipe("a red cat", latents=latents, num_inference_steps=1, output_type="latent", **common).images
    two = pipe("a red cat", latents=latents, sigmas=[1.0, 0.5], output_type="latent", **common).images
    image = pipe("a red cat", latents=latents, sigmas=[1.0, 0.5], output_type="np", **common).images
    np.savez(out_file, embeds=embeds.numpy(), mask=mask.numpy(), one=one.numpy(), two=two.numpy(), image=image,
             pipeline=type(pipe).__name__)
    """
)


def test_an_exported_pipeline_folder_samples_in_one_and_two_steps_without_dumo(tmp_path):
    source = save_sana_pipeline(tmp_path / "sana")
    transformer, _ = load_transformer(source)
    model = trained_looking(DualHeadTransformer(transformer))
    out = export_diffusers_pipeline(model, source, tmp_path / "one-step")
    assert json.loads((out / EXPORT_NOTE).read_text())["one_step"]["sigmas"] == [1.0]
    assert json.loads((out / "model_index.json").read_text())["scheduler"] == [
        "diffusers",
        "FlowMatchEulerDiscreteScheduler",
    ]
    latents = random_latents(1, seed=5).repeat(1, 1, 2, 2)  # the 32x32 image's 16x16 latents
    np.save(tmp_path / "latents.npy", latents.numpy())
    script = tmp_path / "sample.py"
    script.write_text(SAMPLE_WITHOUT_DUMO)
    result = subprocess.run(
        [sys.executable, str(script), str(out), str(tmp_path / "latents.npy"), str(tmp_path / "out.npz")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    produced = np.load(tmp_path / "out.npz")
    assert str(produced["pipeline"]) == "SanaPipeline"
    cond = TextCondition(torch.from_numpy(produced["embeds"]), torch.from_numpy(produced["mask"]).bool())
    with torch.no_grad():
        one_step = latents - model(latents, torch.ones(1), cond=cond).u
        two_steps = flow_map_sample(model, latents, [1.0, 0.5], cond, stochasticity=0.0)
    assert close(torch.from_numpy(produced["one"]), one_step)
    assert close(torch.from_numpy(produced["two"]), two_steps)
    image = produced["image"]
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_an_export_never_replaces_a_folder_unasked_nor_takes_another_family(tmp_path):
    source = save_sana_pipeline(tmp_path / "sana")
    model = DualHeadTransformer(load_transformer(source)[0])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="exists; pass overwrite"):
        export_diffusers_pipeline(model, source, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    with pytest.raises(CheckpointError, match="holds a SanaTransformer2DModel, the model is a SD3Transformer2DModel"):
        export_diffusers_pipeline(DualHeadTransformer(tiny_transformer("sd3")), source, tmp_path / "sd3-out")
    with pytest.raises(CheckpointError, match="cannot replace its own source"):
        export_diffusers_pipeline(model, source, source, overwrite=True)

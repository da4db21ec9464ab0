"""Training runs on a diffusers pipeline folder (model.name: diffusers): the shipped configs train on
tiny pipelines of each family, runs resume exactly, checkpoints keep only what trains, a changed
pipeline folder is refused, and the prompts and latents are the pipeline's own."""

import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from helpers.diffusers_tiny import PIPELINE_BUILDERS, save_caption_folder  # noqa: E402

from dumo.config import config_from_dict, load_config  # noqa: E402
from dumo.errors import CheckpointError, ConfigError  # noqa: E402
from dumo.files import load_checkpoint  # noqa: E402
from dumo.runs.layout import LORA_DIR, list_checkpoints  # noqa: E402
from dumo.training import Trainer  # noqa: E402

CONFIGS = {"sana": "t2i/sana-dumo.yaml", "sd3": "t2i/sd35-medium-dumo.yaml", "flux": "t2i/flux-dev-lora-dumo.yaml"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny pipeline folders of each family, a caption folder and a prompt cache."""
    root = tmp_path_factory.mktemp("bridge-runs")
    pipelines = {family: build(root / family) for family, build in PIPELINE_BUILDERS.items()}
    return {"root": root, "captions": save_caption_folder(root / "captions"), "cache": root / "cache", **pipelines}


def tiny(files, family: str, *extra: str):
    """The shipped config of ``family`` on its tiny pipeline: 32 px captioned images, 8 prompt tokens, CPU."""
    overrides = [
        f"model.pretrained={files[family]}", f"data.path={files['captions']}", "data.resolution=32",
        "data.batch_size=2", "text.max_tokens=8", f"text.cache={files['cache']}", "train.precision=fp32",
        "train.steps=2", "train.log_every=1", "train.progress=false", "train.device=cpu", *extra,
    ]  # fmt: skip
    return load_config(CONFIGS[family], overrides)


@pytest.mark.parametrize("family", CONFIGS)
def test_each_shipped_config_trains_two_steps_on_a_tiny_pipeline(files, family, tmp_path):
    config = tiny(files, family)
    assert config.objective.epsilon == 1e-4 and config.objective.target_precision == "fp32"
    trainer = Trainer(config, tmp_path / "run")
    assert (
        trainer.model.transformer.gradient_checkpointing
    )  # the shipped configs turn it on (train.activation_checkpointing)
    trainable = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert {id(p) for group in trainer.optimizer.param_groups for p in group["params"]} == trainable
    result = trainer.run()
    assert result.step == 2 and not result.interrupted
    tensors, metadata = load_checkpoint(list_checkpoints(tmp_path / "run")[-1])
    assert all(torch.isfinite(tensor).all() for tensor in tensors.values() if tensor.is_floating_point())
    saved = {key[len("model.") :] for key in tensors if key.startswith("model.")}
    assert {"null_tokens", "null_mask"} <= saved
    assert json.loads(metadata["data"])["kind"] == "latents"  # the pipeline's VAE made them
    assert json.loads(metadata["pretrained"])["fingerprint"]
    if config.model.lora is not None:  # LoRA: the adapters and the u-head, never the frozen base
        assert all("lora_" in key or key.startswith(("u_head.", "null_")) for key in saved)
        assert (tmp_path / "run" / LORA_DIR / "pytorch_lora_weights.safetensors").is_file()
    else:  # full fine-tuning: every weight of the transformer trains
        assert any(key.startswith("transformer.transformer_blocks.") for key in saved)
        assert not (tmp_path / "run" / LORA_DIR).exists()


def weights(run, index: int = -1) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(list_checkpoints(run)[index])
    return {key: value for key, value in tensors.items() if not key.startswith("rng.")}


def test_an_interrupted_lora_run_resumes_to_the_weights_of_an_uninterrupted_one(files, tmp_path):
    settings = ["model.lora={rank: 2}", "train.checkpoint_every=2", "objective.label_dropout=0.5"]
    Trainer(tiny(files, "sana", *settings, "train.steps=4"), tmp_path / "straight").run()
    Trainer(tiny(files, "sana", *settings, "train.steps=2"), tmp_path / "resumed").run()
    result = Trainer(tiny(files, "sana", *settings, "train.steps=4"), tmp_path / "resumed").run()
    assert result.resumed_from == 2 and result.step == 4
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    assert any(key.startswith("optimizer.state.") for key in straight)
    assert (tmp_path / "resumed" / LORA_DIR / "step.txt").read_text().strip() == "4"


def test_a_changed_pipeline_folder_is_refused_in_one_line(files, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from dumo.cli import main

    folder = shutil.copytree(files["sana"], tmp_path / "sana")
    run = tmp_path / "run"
    Trainer(tiny({**files, "sana": folder}, "sana", "train.steps=1"), run).run()
    weights_file = next((folder / "transformer").glob("*.safetensors"))
    state = load_file(weights_file)
    name = next(key for key in state if key.endswith("weight") and "transformer_blocks.0" in key)
    state[name] = state[name] + 0.01
    save_file(state, weights_file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="is not the pipeline .* was trained on"):
        Trainer(tiny({**files, "sana": folder}, "sana", "train.steps=2"), run).run()
    status = main(["sample", str(run), "--nfe", "1", "--prompt", "a red cat", "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "is not the pipeline" in err, err


def raw_config(**objective):
    return {
        "data": {"name": "captions", "path": "captions"},
        "model": {"name": "diffusers", "pretrained": "pipeline"},
        "objective": {"name": "dumo", **objective},
    }


def test_a_diffusers_config_takes_the_families_stencil_and_refuses_coarse_targets():
    from dumo.bridge.families import FAMILIES
    from dumo.models.registry import DIFFUSERS_FD_EPSILON

    assert {family().fd_epsilon for family in FAMILIES.values()} == {DIFFUSERS_FD_EPSILON}
    config = config_from_dict(raw_config())
    assert (config.objective.epsilon, config.objective.target_precision) == (DIFFUSERS_FD_EPSILON, "fp32")
    assert (config.text.encoder, config.text.path) == ("pipeline", "pipeline")
    assert config_from_dict(raw_config(epsilon=0.05)).objective.target_precision == "tf32"  # the user's stencil
    with pytest.raises(ConfigError, match="target_precision=bf16 rounds the target passes"):
        config_from_dict(raw_config(target_precision="bf16"))
    insisted = raw_config(target_precision="tf32")
    insisted["model"]["allow_coarse_targets"] = True
    assert config_from_dict(insisted).objective.target_precision == "tf32"
    refused = {
        "model.name=diffusers needs model.pretrained": {"model": {"name": "diffusers"}},
        "model.pretrained applies to model.name=diffusers only": {"model": {"name": "DiT-S/2", "pretrained": "x"}},
        "set text.encoder=pipeline": {"text": {"encoder": "small"}},
        "it starts from model.pretrained": {"train": {"init_from": "runs/teacher"}},
        "model.lora applies to model.name=diffusers only": {"model": {"name": "TextDiT-XS/4", "lora": {"rank": 4}}},
    }
    for message, change in refused.items():
        raw = raw_config()
        for section, values in change.items():
            raw[section] = values
        with pytest.raises(ConfigError, match=message):
            config_from_dict(raw)


SAMPLE_WITHOUT_DUMO = """
import sys
sys.modules["dumo"] = None  # any import of dumo fails
import numpy as np, torch
from diffusers import DiffusionPipeline
folder, latents_file, out_file = sys.argv[1:]
pipe = DiffusionPipeline.from_pretrained(folder)
pipe.set_progress_bar_config(disable=True)
latents = torch.from_numpy(np.load(latents_file))
common = dict(guidance_scale=1.0, height=32, width=32, use_resolution_binning=False, max_sequence_length=8)
seen = []  # what the pipeline gives its transformer: its own encoding of the prompt
pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
one = pipe("a red cat", latents=latents, num_inference_steps=1, output_type="latent", **common).images
embeds, mask = seen[0]["encoder_hidden_states"], seen[0]["encoder_attention_mask"]
two = pipe("a red cat", latents=latents, sigmas=[1.0, 0.5], output_type="latent", **common).images
image = pipe("a red cat", latents=latents, sigmas=[1.0, 0.5], output_type="np", **common).images
np.savez(out_file, embeds=embeds.detach().numpy(), mask=mask.numpy(), one=one.numpy(), two=two.numpy(), image=image)
"""


def test_export_diffusers_writes_a_pipeline_that_samples_one_and_two_steps_without_dumo(files, tmp_path, capsys):
    import subprocess
    import sys

    import numpy as np

    from dumo.cli import main
    from dumo.runs.loading import load_run
    from dumo.samplers import flow_map_sample

    run, out = tmp_path / "run", tmp_path / "one-step"
    Trainer(tiny(files, "sana", "model.lora={rank: 2}", "optim.lr=0.01"), run).run()
    assert main(["export", str(run), "--diffusers", str(out)]) == 0
    (out / "mine.txt").write_text("keep")
    capsys.readouterr()
    assert main(["export", str(run), "--diffusers", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "exists; pass --force" in err, err
    assert (out / "mine.txt").read_text() == "keep"
    assert main(["export", str(run), "--diffusers", str(out), "--force"]) == 0
    assert not (out / "mine.txt").exists()
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    np.save(tmp_path / "latents.npy", latents.numpy())
    (tmp_path / "sample.py").write_text(SAMPLE_WITHOUT_DUMO)
    result = subprocess.run(
        [sys.executable, str(tmp_path / "sample.py"), str(out), str(tmp_path / "latents.npy"), str(tmp_path / "o.npz")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    produced = np.load(tmp_path / "o.npz")
    loaded = load_run(run)
    cond = loaded.prompt_condition(["a red cat"])  # dumo's cached encoding: the pipeline's own
    assert torch.equal(cond.mask, torch.from_numpy(produced["mask"]).bool())
    real = cond.mask[..., None]  # the transformer masks the padding out; dumo stores it as zeros
    assert torch.allclose(cond.tokens * real, torch.from_numpy(produced["embeds"]) * real, atol=1e-5)
    with torch.no_grad():
        one_step = latents - loaded.model(latents, torch.ones(1), cond=cond).u
        two_steps = flow_map_sample(loaded.model, latents, [1.0, 0.5], cond, stochasticity=0.0)
    assert main(["export", str(run), str(tmp_path / "own")]) == 0  # dumo's own export: the trained tensors only
    own = load_run(tmp_path / "own")
    with torch.no_grad():
        assert torch.equal(
            own.model(latents, torch.ones(1), cond=cond).u, loaded.model(latents, torch.ones(1), cond=cond).u
        )
    capsys.readouterr()
    assert main(["export", str(run)]) == 2 and "one of them" in capsys.readouterr().err
    scale = one_step.abs().max()
    assert (torch.from_numpy(produced["one"]) - one_step).abs().max() <= 1e-5 * scale
    assert (torch.from_numpy(produced["two"]) - two_steps).abs().max() <= 1e-5 * scale
    assert produced["image"].shape == (1, 32, 32, 3) and np.isfinite(produced["image"]).all()


@pytest.mark.parametrize("family", CONFIGS)
def test_dumo_sample_draws_a_bridged_run_decoded_by_the_pipelines_vae(files, family, tmp_path, capsys):
    import numpy as np

    from dumo.cli import main

    run = tmp_path / "run"
    Trainer(tiny(files, family, "train.steps=1"), run).run()
    out = tmp_path / "samples.npz"
    guidance = ["--guidance", "2"] if family != "flux" else []
    status = main(["sample", str(run), "--nfe", "2", "--prompt", "a red cat", "-n", "2", *guidance, "--out", str(out)])
    assert status == 0, capsys.readouterr().err
    images = np.load(out)["arr_0"]
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8


@pytest.mark.parametrize("family", CONFIGS)
def test_prompts_are_encoded_as_the_pipeline_gives_them_to_its_transformer(files, family):
    import diffusers

    from dumo.conditioning.pipeline_text import NULL_PROMPT, PipelineTextEncoder

    pipe = diffusers.DiffusionPipeline.from_pretrained(files[family])
    pipe.set_progress_bar_config(disable=True)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs), with_kwargs=True)
    guidance = 3.5 if family == "flux" else 2.0  # SANA and SD3: the negative prompt "" in the same call
    extra = {"use_resolution_binning": False} if family == "sana" else {}
    pipe("a red cat", num_inference_steps=1, guidance_scale=guidance, height=32, width=32, max_sequence_length=8,
         output_type="latent", **extra)  # fmt: skip
    given = seen[0]
    encoder = PipelineTextEncoder(files[family], max_length=8)
    cond = encoder.encode([NULL_PROMPT, "a red cat"])
    rows = slice(0, 2) if family != "flux" else slice(1, 2)
    real = cond.mask[rows, :, None]  # the transformer masks padding out (SANA); dumo stores it as zeros
    assert torch.allclose(cond.tokens[rows], given["encoder_hidden_states"].float() * real, atol=1e-5)
    if family == "sana":
        assert torch.equal(cond.mask, given["encoder_attention_mask"].bool())
        assert cond.mask[0].sum() < cond.mask[1].sum()  # "" without the instruction, the prompt with it
    else:
        assert torch.allclose(cond.pooled[rows], given["pooled_projections"].float(), atol=1e-5)
        assert bool(cond.mask.all())  # SD3 and FLUX attend to every token


def test_dumo_info_counts_the_transformer_and_the_u_head(files, capsys):
    from dumo.cli import main

    args = [f"model.pretrained={files['sana']}", f"data.path={files['captions']}", "data.resolution=32",
            "text.max_tokens=8", f"text.cache={files['cache']}"]  # fmt: skip
    assert main(["info", "configs/t2i/sana-dumo.yaml", "--set", *args]) == 0
    out = capsys.readouterr().out
    assert "transformer (v-head included):" in out and "u-head:" in out


def torchrun_train(config: str, out, overrides: list[str], processes: int):
    """``dumo train`` in ``processes`` processes under torchrun (gloo on CPU), or in one without it."""
    import subprocess
    import sys
    from pathlib import Path

    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    sets = [item for override in overrides for item in ("--set", override)]
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, *launcher, "-m", "dumo", "train", str(root / "configs" / config), "--out", str(out)]
    result = subprocess.run([*command, *sets], capture_output=True, text=True, cwd=root, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("family", ["sana", "flux"])  # full fine-tuning; LoRA on a frozen base
def test_fsdp_shards_a_bridged_transformer_resumes_and_matches_one_process(files, family, tmp_path):
    """FSDP2 over two ranks for 2 steps, resumed under FSDP2 to 4, equals 4 steps in one process
    with the same global batch: weights, EMA, optimiser state and the LoRA adapter files."""
    from safetensors.torch import load_file

    overrides = [
        f"model.pretrained={files[family]}", f"data.path={files['captions']}", "data.resolution=32",
        "data.batch_size=2", "text.max_tokens=8", f"text.cache={files['cache']}", "train.precision=fp32",
        "train.log_every=1", "train.progress=false", "train.device=cpu", "train.checkpoint_every=2",
        # attention's key biases get a zero gradient in exact arithmetic; Adam with the default eps would
        # divide their rounding noise by its own size and move them by lr either way
        "optim.lr=0.001", "optim.eps=1e-6",
    ]  # fmt: skip
    fsdp = [*overrides, "train.parallel=fsdp"]
    torchrun_train(CONFIGS[family], tmp_path / "fsdp", [*fsdp, "train.steps=2"], processes=2)
    resumed = torchrun_train(CONFIGS[family], tmp_path / "fsdp", [*fsdp, "train.steps=4"], processes=2)
    assert "resumed from step 2" in resumed.stdout
    torchrun_train(CONFIGS[family], tmp_path / "one", [*overrides, "train.steps=4", "train.grad_accumulation=2"], 1)
    sharded, one = weights(tmp_path / "fsdp"), weights(tmp_path / "one")
    assert sharded.keys() == one.keys()  # one checkpoint format, the optimiser's numbering included
    worst = max((sharded[key].float() - one[key].float()).abs().max().item() for key in one)
    start = weights(tmp_path / "one", 0)
    moved = max((one[key].float() - start[key].float()).abs().max().item() for key in one if key.startswith("model."))
    # float32 reduction order only, which Adam's first steps (about lr times the sign of each gradient) can
    # make visible in weights whose gradient is near zero: far below how far the weights moved
    assert worst < moved / 50, (worst, moved)
    if family == "flux":
        for name in ("pytorch_lora_weights.safetensors", "u_head.safetensors"):
            a, b = (load_file(str(run / LORA_DIR / name)) for run in (tmp_path / "fsdp", tmp_path / "one"))
            assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < moved / 50

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
    result = Trainer(config, tmp_path / "run").run()
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


def weights(run) -> dict[str, torch.Tensor]:
    tensors, _ = load_checkpoint(list_checkpoints(run)[-1])
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
        "model.lora applies to model.name=diffusers only": {"model": {"name": "TextDiT-XS/4", "lora": {"rank": 4}}},
    }
    for message, change in refused.items():
        raw = raw_config()
        for section, values in change.items():
            raw[section] = values
        with pytest.raises(ConfigError, match=message):
            config_from_dict(raw)

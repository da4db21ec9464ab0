"""The text-to-image configs for GPU runs (configs/t2i) load, train 2 steps with tiny stand-ins for the
network, autoencoder, encoder and data, and are planned with their text encoder."""

import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from helpers.autoencoders import tiny_vae  # noqa: E402
from helpers.text_encoders import save_qwen_pipeline, save_t5  # noqa: E402
from PIL import Image  # noqa: E402

from dumo.cli import main  # noqa: E402
from dumo.conditioning.pretrained_text import describe_encoder  # noqa: E402
from dumo.config import load_config  # noqa: E402
from dumo.plan import format_plan, make_plan  # noqa: E402
from dumo.runs.layout import list_snapshots  # noqa: E402
from dumo.training import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"textdit-xl2-sdvae-t5.yaml": "t5", "textdit-xl1-dcae-gemma.yaml": "qwen"}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Caption latents of 4 images with the embeddings of two tiny encoders (a T5 and a decoder-only LM),
    added by two runs of dumo encode into one folder."""
    root = tmp_path_factory.mktemp("t2i-configs")
    tiny_vae().save_pretrained(root / "vae")
    save_t5(root / "t5")
    save_qwen_pipeline(root / "qwen")
    (root / "captions").mkdir()
    for i, caption in enumerate(["a red cat", "a blue dog", "the green bird", "a big sky"]):
        pixels = np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "captions" / f"{i}.png")
        (root / "captions" / f"{i}.txt").write_text(caption)
    for encoder in ("t5", "qwen"):
        args = ["encode", "--data", "captions", "--data-path", root / "captions", "--kind", "sd-vae", "--workers", 0]
        args += ["--autoencoder", root / "vae", "--out", root / "latents", "--text-encoder", root / encoder]
        assert main([str(a) for a in [*args, "--text-max-tokens", 8]]) == 0
    return root


def tiny(name: str, parts: Path, *extra: str):
    """The shipped config with a tiny network, the tiny parts and 2 steps."""
    overrides = [
        f"data.path={parts / 'latents'}",
        "data.latent_shape=[4, 8, 8]",
        "data.batch_size=4",
        "model.hidden_dim=32",
        "model.depth=1",
        "model.num_heads=2",
        f"text.path={parts / CONFIGS[name]}",
        "text.max_tokens=8",
        "train.steps=2",
        "train.checkpoint_every=2",
        "train.snapshot_steps=[1, 2]",
        "train.progress=false",
        *extra,
    ]
    return load_config(ROOT / "configs" / "t2i" / name, overrides)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shipped_t2i_configs_train_two_steps_on_precomputed_embeddings(name, parts, tmp_path):
    shipped = load_config(ROOT / "configs" / "t2i" / name)
    assert shipped.text.precomputed and shipped.train.parallel == "fsdp" and shipped.train.precision == "bf16"
    assert shipped.objective.name == "dumo" and shipped.data.batch_size == 512
    result = Trainer(tiny(name, parts), tmp_path / "run").run()
    assert result.step == 2 and result.skipped_steps == 0 and math.isfinite(result.metrics.get("loss", 0.0))
    assert [step for step, _ in list_snapshots(tmp_path / "run")] == [1, 2]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_plan_counts_the_text_encoder_unless_its_embeddings_are_precomputed(name, parts, tmp_path):
    encoder = describe_encoder(parts / CONFIGS[name])
    precomputed = format_plan(make_plan(tiny(name, parts), 8, "h100"))
    assert f"text encoder {encoder.class_name}" in precomputed and "training never loads it" in precomputed
    assert "4 images" in precomputed  # the epoch's size, from the latent folder's index
    loaded = make_plan(tiny(name, parts, "text.precomputed=false", f"data.path={tmp_path / 'elsewhere'}"), 8, "h100")
    text = format_plan(loaded)
    assert loaded.text_encoder.parameters == encoder.parameters and not loaded.text_encoder.precomputed
    assert f"{(loaded.cost.parameters + encoder.parameters) / 1e6:,.1f}M" in text and "host memory per rank" in text
    assert "memory/GPU" in text and "FSDP" in text


def test_plan_of_an_encoder_it_cannot_find_fails_in_one_line(capsys):
    status = main(["plan", str(ROOT / "configs/t2i/textdit-xl2-sdvae-t5.yaml"), "--set", "text.path=/no/such/t5"])
    assert status == 2
    assert (
        capsys.readouterr().err.strip()
        == "dumo: error: no text encoder config at /no/such/t5 (config.json of a transformers folder)"
    )

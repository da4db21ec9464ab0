"""Latent text-to-image: dumo encode of captioned images keeps the captions (and a frozen encoder's
embeddings of them), data.name caption_latents trains a TextDiT on them, sampling decodes."""

import json

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from helpers.autoencoders import tiny_vae  # noqa: E402
from helpers.text_encoders import WIDTH, save_t5  # noqa: E402
from PIL import Image  # noqa: E402

from dumo.cli import main  # noqa: E402
from dumo.config import config_from_dict  # noqa: E402
from dumo.data import build_dataset, build_stream, dataset_prompts  # noqa: E402
from dumo.data.caption_latents import PrecomputedPrompts  # noqa: E402
from dumo.training import Trainer  # noqa: E402

CAPTIONS = ["a red cat", "a blue dog on a mat", "the red dog", "a green bird", "the big sky", "a small cat"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """6 captioned 16x16 images, a tiny SD-VAE, a tiny T5, and their latents with T5 embeddings."""
    root = tmp_path_factory.mktemp("caption-latents")
    tiny_vae().save_pretrained(root / "vae")
    save_t5(root / "t5")
    rng = np.random.default_rng(0)
    (root / "captions").mkdir()
    for i, caption in enumerate(CAPTIONS):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "captions" / f"{i}.png")
        (root / "captions" / f"{i}.txt").write_text(caption)
    status = main(encode_args(root, root / "latents", "--text-encoder", root / "t5", "--text-max-tokens", 8))
    assert status == 0
    return root


def encode_args(root, out, *extra):
    args = ["encode", "--data", "captions", "--data-path", root / "captions", "--kind", "sd-vae"]
    args += ["--autoencoder", root / "vae", "--out", out, "--shard-size", 4, "--batch-size", 2, "--workers", 0]
    return [str(a) for a in [*args, *extra]]


def config(root, **text):
    return config_from_dict(
        {
            "data": {"name": "caption_latents", "path": str(root / "latents"), "batch_size": 4},
            "model": {"name": "TextDiT-XS/2", "hidden_dim": 32, "depth": 1, "num_heads": 2},
            "text": {
                "encoder": "pretrained",
                "path": str(root / "t5"),
                "max_tokens": 8,
                "cache": str(root / "cache"),
                **text,
            },
            "objective": {"name": "dumo"},
            "train": {"steps": 2, "log_every": 1, "checkpoint_every": 2, "progress": False, "ema_decay": 0.9},
        }
    )


def last_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()  # (transformers may show a loading bar first)
    assert lines[-1].startswith("dumo: error: ") and "Traceback" not in "".join(lines), lines
    return lines[-1]


def test_encoded_captions_stay_with_their_latents_and_their_embeddings(parts):
    index = json.loads((parts / "latents" / "index.json").read_text())
    assert index["captions"] and not index["flipped_copies"]  # no mirrors of captions by default
    (record,) = index["text_encoders"]
    assert record["max_tokens"] == 8 and record["text_dim"] == WIDTH and record["prompts"] == len(CAPTIONS)
    dataset = build_dataset(config(parts).data)
    assert dataset.captions == CAPTIONS and dataset.shape == (4, 8, 8) and len(dataset) == 6
    prompts = dataset_prompts(dataset, config(parts).text)
    assert isinstance(prompts, PrecomputedPrompts) and prompts.spec.fingerprint == record["fingerprint"]
    batch = build_stream(dataset, config(parts).data, 0, prompts).next_batch()
    assert batch.x.shape == (4, 4, 8, 8) and batch.cond.tokens.shape == (4, 8, WIDTH)


def test_a_textdit_trains_on_precomputed_embeddings_and_samples_decoded_images(parts, tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(config(parts), run).run()
    assert not (parts / "cache").exists()  # the encoder was never asked for an embedding in training
    out = tmp_path / "cat.npz"
    status = main(["sample", str(run), "--nfe", "1", "--prompt", "a red cat", "-n", "2", "--out", str(out)])
    assert status == 0, capsys.readouterr().err
    with np.load(out) as samples:
        assert samples["arr_0"].shape == (2, 16, 16, 3) and list(samples["prompts"]) == ["a red cat"] * 2


def test_a_mismatched_encoder_or_missing_captions_fail_in_one_line(parts, tmp_path, capsys):
    raw = config(parts, max_tokens=6).to_dict()
    (tmp_path / "c.yaml").write_text(json.dumps(raw))
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert "holds caption embeddings of another text encoder" in last_error(capsys)

    (parts / "captions" / "2.txt").rename(parts / "2.txt")  # an image without its caption
    try:
        assert main(encode_args(parts, tmp_path / "other")) == 2
        assert "has no caption: expected 2.txt" in last_error(capsys)
    finally:
        (parts / "2.txt").rename(parts / "captions" / "2.txt")


def test_latents_without_captions_are_refused_for_caption_latents(parts, tmp_path, capsys):
    images = tmp_path / "images" / "only"
    images.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
    args = ["encode", "--data", "image_folder", "--data-path", tmp_path / "images", "--kind", "sd-vae"]
    args += ["--autoencoder", parts / "vae", "--out", tmp_path / "plain", "--workers", 0]
    assert main([str(a) for a in args]) == 0
    capsys.readouterr()
    raw = config(parts).to_dict()
    raw["data"]["path"] = str(tmp_path / "plain")
    (tmp_path / "c.yaml").write_text(json.dumps(raw))
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert "holds latents without captions" in last_error(capsys)


def test_the_small_encoder_learns_the_captions_words_from_the_latent_folder(parts, tmp_path):
    raw = config(parts).to_dict()
    raw["text"] = {"width": 16, "depth": 1, "heads": 2, "max_tokens": 8}
    dataset = build_dataset(config_from_dict(raw).data)
    prompts = dataset_prompts(dataset, config_from_dict(raw).text)
    assert prompts.tokenizer.vocab_size == 2 + len({w for c in CAPTIONS for w in c.split()})
    Trainer(config_from_dict(raw), tmp_path / "run").run()

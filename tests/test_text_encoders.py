"""Text encoders: the trainable word-level one and frozen transformers ones loaded from local folders."""

import json
import shutil

import pytest
import torch

pytest.importorskip("tokenizers")

from dumo.conditioning import TextCondition  # noqa: E402
from dumo.conditioning.text import (  # noqa: E402
    PretrainedTextEncoder,
    SmallTextEncoder,
    TextEncoderError,
    WordTokenizer,
)
from dumo.errors import DumoError  # noqa: E402

PROMPTS = ["A red cat on the mat", "a dog", "the big blue bird in the sky"]


# -- the word tokenizer and the trainable encoder -----------------------------------------------------


def test_word_tokenizer_lowercases_splits_pads_and_masks():
    tokenizer = WordTokenizer.from_sentences(["A cat, a dog.", "a cat"])
    ids, mask = tokenizer.encode(["a Cat", "DOG zebra", ""], max_length=4)
    assert ids.dtype == torch.long and ids.shape == (3, 4) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [2, 2, 0]
    assert torch.all(ids[~mask] == tokenizer.pad_id)
    vocabulary = tokenizer.tokenizer.get_vocab()
    assert ids[0, :2].tolist() == [vocabulary["a"], vocabulary["cat"]]
    assert ids[1, 1].item() == vocabulary["[UNK]"]  # an unknown word
    # most frequent first, ties alphabetically: the same ids on every machine
    assert [vocabulary[w] for w in ("a", "cat", ",", ".", "dog")] == [2, 3, 4, 5, 6]


def test_word_tokenizer_cuts_long_prompts_and_says_so(capsys):
    tokenizer = WordTokenizer.from_words(["one", "two", "three"])
    ids, mask = tokenizer.encode(["one two three", "one"], max_length=2)
    assert mask.all(dim=1).tolist() == [True, False] and ids.shape == (2, 2)
    assert "1 prompt(s) longer than 2 tokens" in capsys.readouterr().err


def test_word_tokenizer_round_trips_through_tokenizer_json(tmp_path):
    tokenizer = WordTokenizer.from_sentences(PROMPTS)
    tokenizer.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["model"]["type"] == "WordLevel"
    loaded = WordTokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.vocab_size == tokenizer.vocab_size
    for a, b in zip(loaded.encode(PROMPTS, 8), tokenizer.encode(PROMPTS, 8)):
        assert torch.equal(a, b)
    condition = loaded.condition(PROMPTS, 8)
    assert isinstance(condition, TextCondition) and condition.tokens.shape == (3, 8)


def test_word_tokenizer_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(TextEncoderError, match="word tokenizer not found"):
        WordTokenizer.load(tmp_path / "nothing.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TextEncoderError, match="is not a tokenizer.json file"):
        WordTokenizer.load(tmp_path)


def test_small_encoder_shapes_padding_and_pooled():
    tokenizer = WordTokenizer.from_sentences(PROMPTS)
    encoder = SmallTextEncoder(tokenizer.vocab_size, dim=16, depth=2, heads=2, max_length=12)
    ids, mask = tokenizer.encode(PROMPTS, max_length=8)
    tokens, out_mask, pooled = encoder(ids, mask)
    assert tokens.shape == (3, 8, 16) and pooled.shape == (3, 16) and torch.equal(out_mask, mask)
    assert torch.all(tokens[~mask] == 0)
    expected = torch.stack([tokens[i][mask[i]].mean(dim=0) for i in range(3)])
    torch.testing.assert_close(pooled, expected)
    # more padding leaves the real tokens' features as they were
    long_ids, long_mask = tokenizer.encode(PROMPTS, max_length=12)
    long_tokens, _, long_pooled = encoder(long_ids, long_mask)
    torch.testing.assert_close(long_tokens[:, :8], tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(long_pooled, pooled, atol=1e-5, rtol=1e-5)
    # training mode (slow path) and eval under no_grad (torch's fast path) agree
    encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids, mask)[0], tokens.detach(), atol=1e-5, rtol=1e-5)


def test_small_encoder_gives_zeros_not_nan_for_the_empty_prompt_and_trains():
    tokenizer = WordTokenizer.from_words(["cat"])
    encoder = SmallTextEncoder(tokenizer.vocab_size, dim=8, depth=1, heads=2, max_length=4)
    ids, mask = tokenizer.encode(["", "cat"], max_length=4)
    tokens, _, pooled = encoder(ids, mask)
    assert torch.isfinite(tokens).all() and torch.all(tokens[0] == 0) and torch.all(pooled[0] == 0)
    (tokens.square().sum() + pooled.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in encoder.parameters() if p.grad is not None)
    encoder.eval()  # torch's fast inference path gives nan for a row that attends to nothing
    with torch.no_grad():
        tokens, _, pooled = encoder(ids, mask)
    assert torch.isfinite(tokens).all() and torch.all(tokens[0] == 0) and torch.all(pooled[0] == 0)


def test_small_encoder_init_follows_torch_rng():
    torch.manual_seed(3)
    first = SmallTextEncoder(10, dim=8, depth=1, heads=2, max_length=4)
    torch.manual_seed(3)
    second = SmallTextEncoder(10, dim=8, depth=1, heads=2, max_length=4)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="exceed"):
        first(torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.bool))


# -- pretrained encoders --------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
import safetensors.torch  # noqa: E402
from helpers.text_encoders import WIDTH, save_clip, save_qwen_pipeline, save_t5  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {
        "t5": save_t5(root / "t5"),
        "clip": save_clip(root / "clip"),
        "clip_projection": save_clip(root / "clip_projection", projection=True),
        "qwen": save_qwen_pipeline(root / "qwen"),
    }


def real_token_counts(encoder: PretrainedTextEncoder, prompts: list[str]) -> list[int]:
    return [len(ids) for ids in encoder.tokenizer(prompts)["input_ids"]]


@pytest.mark.parametrize("kind", ["t5", "clip", "clip_projection", "qwen"])
def test_pretrained_encoder_shapes_mask_pooled_and_determinism(folders, kind):
    encoder = PretrainedTextEncoder.from_pretrained(folders[kind], max_length=12)
    condition = encoder.encode(PROMPTS)
    assert condition.tokens.shape == (3, 12, WIDTH) and condition.tokens.dtype == torch.float32
    assert condition.mask.dtype == torch.bool and condition.mask.shape == (3, 12)
    counts = real_token_counts(encoder, PROMPTS)
    assert condition.mask.sum(dim=1).tolist() == counts  # prompt words and the special tokens
    assert all(condition.mask[i, :n].all() for i, n in enumerate(counts))  # padding on the right
    assert torch.all(condition.tokens[~condition.mask] == 0)
    assert torch.isfinite(condition.tokens).all() and not condition.null.any()
    assert condition.pooled.shape == (3, 8 if kind == "clip_projection" else WIDTH)
    if kind in ("t5", "qwen"):  # the mean of the real tokens
        expected = torch.stack([condition.tokens[i, :n].mean(dim=0) for i, n in enumerate(counts)])
        torch.testing.assert_close(condition.pooled, expected)
    again = PretrainedTextEncoder.from_pretrained(folders[kind], max_length=12)
    assert again.fingerprint() == encoder.fingerprint()
    assert torch.equal(again.encode(PROMPTS).tokens, condition.tokens)


@pytest.mark.parametrize("kind", ["t5", "clip", "qwen"])
def test_padding_does_not_change_the_real_tokens(folders, kind):
    short = PretrainedTextEncoder.from_pretrained(folders[kind], max_length=10).encode(PROMPTS)
    long = PretrainedTextEncoder.from_pretrained(folders[kind], max_length=16).encode(PROMPTS)
    torch.testing.assert_close(long.tokens[:, :10], short.tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(long.pooled, short.pooled, atol=1e-5, rtol=1e-5)
    # alone or beside a longer prompt: the same embedding
    alone = PretrainedTextEncoder.from_pretrained(folders[kind], max_length=10).encode(PROMPTS[1:2])
    torch.testing.assert_close(alone.tokens[0], short.tokens[1], atol=1e-5, rtol=1e-5)


def test_t5_runs_the_encoder_only_and_a_chosen_layer_differs(folders):
    encoder = PretrainedTextEncoder.from_pretrained(folders["t5"], max_length=8)
    assert type(encoder.model).__name__ == "T5EncoderModel"
    qwen = PretrainedTextEncoder.from_pretrained(folders["qwen"], max_length=8)
    middle = PretrainedTextEncoder.from_pretrained(folders["qwen"], max_length=8, layer=-2)
    assert type(qwen.model).__name__ == "Qwen2Model"  # the LM head is not loaded
    assert middle.fingerprint() != qwen.fingerprint()
    assert not torch.allclose(middle.encode(PROMPTS).tokens, qwen.encode(PROMPTS).tokens)


def test_fingerprint_follows_weights_length_dtype_and_tokenizer(folders, tmp_path):
    base = PretrainedTextEncoder.from_pretrained(folders["clip"], max_length=12).fingerprint()
    assert PretrainedTextEncoder.from_pretrained(folders["clip"], max_length=8).fingerprint() != base
    assert PretrainedTextEncoder.from_pretrained(folders["clip"], max_length=12, dtype="bfloat16").fingerprint() != base
    # the same model elsewhere, re-saved: the same fingerprint
    copy = tmp_path / "copy"
    transformers.CLIPTextModel.from_pretrained(folders["clip"]).save_pretrained(copy)
    transformers.AutoTokenizer.from_pretrained(folders["clip"]).save_pretrained(copy)
    assert PretrainedTextEncoder.from_pretrained(copy, max_length=12).fingerprint() == base
    # one weight changed (the folder otherwise the same): another
    weights = safetensors.torch.load_file(copy / "model.safetensors")
    name = next(key for key in weights if key.endswith("final_layer_norm.weight"))
    weights[name][0] += 1
    safetensors.torch.save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert PretrainedTextEncoder.from_pretrained(copy, max_length=12).fingerprint() != base
    # another vocabulary: another
    shutil.copytree(folders["clip"], tmp_path / "words")
    tokenizer = json.loads((tmp_path / "words" / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["zebra"] = len(tokenizer["model"]["vocab"])
    (tmp_path / "words" / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert PretrainedTextEncoder.from_pretrained(tmp_path / "words", max_length=12).fingerprint() != base


def test_bfloat16_encoder_gives_bfloat16_embeddings(folders):
    condition = PretrainedTextEncoder.from_pretrained(folders["t5"], max_length=8, dtype="bfloat16").encode(PROMPTS)
    assert condition.tokens.dtype == torch.bfloat16 and torch.isfinite(condition.tokens.float()).all()


def test_pipeline_text_encoder_folder_finds_the_tokenizer_beside_it(folders):
    whole = PretrainedTextEncoder.from_pretrained(folders["qwen"], max_length=8)
    direct = PretrainedTextEncoder.from_pretrained(folders["qwen"] / "text_encoder", max_length=8)
    assert whole.fingerprint() == direct.fingerprint()


def test_an_empty_prompt_without_special_tokens_gives_zeros(folders):
    condition = PretrainedTextEncoder.from_pretrained(folders["qwen"], max_length=8).encode(["", "a cat"])
    assert condition.mask.sum(dim=1).tolist() == [0, 2]
    assert torch.all(condition.tokens[0] == 0) and torch.all(condition.pooled[0] == 0)
    assert torch.isfinite(condition.tokens).all()


def test_long_prompts_are_cut_with_a_note(folders, capsys):
    encoder = PretrainedTextEncoder.from_pretrained(folders["t5"], max_length=4)
    condition = encoder.encode(PROMPTS)
    assert condition.mask.all(dim=1).tolist() == [True, False, True]
    assert "2 prompt(s) longer than 4 tokens" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root, folders: root / "absent", "text encoder folder not found"),
        (lambda root, folders: root, "no config.json in .*: not a transformers model folder"),
        (lambda root, folders: _without(root, folders["t5"], "tokenizer.json"), "no tokenizer for the text encoder"),
        (lambda root, folders: _without(root, folders["t5"], "model.safetensors"), "no .safetensors weights"),
        (lambda root, folders: _garbled_config(root, folders["t5"]), "cannot load the text encoder"),
    ],
)
def test_missing_or_foreign_folders_give_one_line_errors(folders, tmp_path, make, message):
    with pytest.raises(TextEncoderError, match=message) as caught:
        PretrainedTextEncoder.from_pretrained(make(tmp_path, folders), max_length=8)
    assert isinstance(caught.value, DumoError) and "\n" not in str(caught.value)


def test_weights_missing_from_the_file_are_refused_not_made_up(folders, tmp_path):
    target = tmp_path / "t5"
    shutil.copytree(folders["t5"], target)
    weights = safetensors.torch.load_file(target / "model.safetensors")
    del weights[next(key for key in weights if key.endswith("encoder.final_layer_norm.weight"))]
    safetensors.torch.save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(TextEncoderError, match="lacks 1 weights of T5EncoderModel: encoder.final_layer_norm"):
        PretrainedTextEncoder.from_pretrained(target, max_length=8)


def test_unknown_dtype_is_refused(folders):
    with pytest.raises(TextEncoderError, match="unknown text encoder dtype 'int8'"):
        PretrainedTextEncoder.from_pretrained(folders["t5"], dtype="int8")


def test_max_length_beyond_the_position_table_is_refused(folders):
    with pytest.raises(TextEncoderError, match="outside 1..16"):
        PretrainedTextEncoder.from_pretrained(folders["clip"], max_length=77)
    assert PretrainedTextEncoder.from_pretrained(folders["clip"]).max_length == 16  # the default: all it has


def _without(root, source, name):
    target = root / "model"
    shutil.copytree(source, target)
    (target / name).unlink()
    if name == "tokenizer.json":
        (target / "tokenizer_config.json").unlink()
    return target


def _garbled_config(root, source):
    target = _without(root, source, "model.safetensors")
    (target / "config.json").write_text('{"model_type": "no-such-model"}')
    (target / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    return target

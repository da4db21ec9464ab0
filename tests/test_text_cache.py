"""Text embeddings computed once per prompt and encoder, stored in safetensors shards."""

from collections.abc import Sequence

import pytest
import torch

from dumo.conditioning import TextCondition
from dumo.data.images import DataError
from dumo.data.text_cache import TextEmbeddingCache, prompt_key

PROMPTS = ["a red cat", "the big blue bird on the mat", "a dog", ""]


class ToyEncoder:
    """A deterministic stand-in for a frozen encoder: one token per character, pooled = its mean;
    counts the prompts it encodes."""

    def __init__(self, max_length: int = 40, dim: int = 3, pooled: bool = True, salt: str = "toy") -> None:
        self.max_length, self.dim, self.with_pooled, self.salt = max_length, dim, pooled, salt
        self.encoded: list[str] = []
        self.calls = 0

    def fingerprint(self) -> str:
        return f"{self.salt}-{self.max_length}-{self.dim}"

    def encode(self, prompts: Sequence[str]) -> TextCondition:
        self.calls += 1
        self.encoded.extend(prompts)
        tokens = torch.zeros(len(prompts), self.max_length, self.dim)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            codes = torch.tensor([float(ord(c)) for c in prompt[: self.max_length]])
            tokens[row, : len(codes)] = codes[:, None] * torch.arange(1.0, self.dim + 1)
            mask[row, : len(codes)] = True
        pooled = tokens.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1) if self.with_pooled else None
        return TextCondition(tokens, mask, pooled)


def assert_same(a: TextCondition, b: TextCondition) -> None:
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
    assert (a.pooled is None) == (b.pooled is None)
    if a.pooled is not None:
        assert torch.equal(a.pooled, b.pooled)


def test_second_call_reads_instead_of_encoding(tmp_path):
    encoder = ToyEncoder()
    first = TextEmbeddingCache(tmp_path, encoder, batch_size=3).embed(PROMPTS)
    assert encoder.calls == 2 and sorted(encoder.encoded) == sorted(PROMPTS)  # batches of 3: 2 calls
    assert_same(first, ToyEncoder().encode(PROMPTS))
    again = TextEmbeddingCache(tmp_path, encoder).embed(list(reversed(PROMPTS)))  # a new process
    assert encoder.calls == 2
    assert_same(again, ToyEncoder().encode(list(reversed(PROMPTS))))


def test_only_missing_prompts_are_encoded_once_each(tmp_path):
    encoder = ToyEncoder()
    cache = TextEmbeddingCache(tmp_path, encoder)
    cache.embed(PROMPTS[:2])
    encoder.encoded.clear()
    out = cache.embed([PROMPTS[1], PROMPTS[2], PROMPTS[2], PROMPTS[3]])
    assert encoder.encoded == [PROMPTS[2], PROMPTS[3]]
    assert_same(out, ToyEncoder().encode([PROMPTS[1], PROMPTS[2], PROMPTS[2], PROMPTS[3]]))
    assert len(cache) == 4 and PROMPTS[0] in cache and "never seen" not in cache


def test_another_fingerprint_misses(tmp_path):
    TextEmbeddingCache(tmp_path, ToyEncoder()).embed(PROMPTS)
    other = ToyEncoder(salt="other weights")
    cache = TextEmbeddingCache(tmp_path, other)
    assert len(cache) == 0
    cache.embed(PROMPTS)
    assert sorted(other.encoded) == sorted(PROMPTS)
    assert prompt_key("a", "b") != prompt_key("a", "c") != prompt_key("b", "b")


def test_shards_hold_trimmed_tokens_and_stay_atomic(tmp_path):
    from safetensors import safe_open

    cache = TextEmbeddingCache(tmp_path, ToyEncoder(), shard_prompts=2)
    cache.embed(PROMPTS)
    shards = sorted(cache.folder.glob("shard-*.safetensors"))
    assert len(shards) == 2 and not list(cache.folder.glob(".*tmp*"))
    with safe_open(str(shards[0]), framework="pt") as handle:
        keys = {name.split(".")[0] for name in handle.keys()}  # noqa: SIM118
        lengths = {handle.get_tensor(f"{key}.tokens").shape[0] for key in keys}
    assert lengths <= {len(p) for p in PROMPTS} and len(keys) == 2


def test_encoders_without_pooled_vectors_and_in_bfloat16(tmp_path):
    class HalfEncoder(ToyEncoder):
        def encode(self, prompts):
            condition = super().encode(prompts)
            return TextCondition(condition.tokens.bfloat16(), condition.mask)

    encoder = HalfEncoder(pooled=False)
    out = TextEmbeddingCache(tmp_path, encoder).embed(PROMPTS)
    again = TextEmbeddingCache(tmp_path, encoder).embed(PROMPTS)
    assert out.pooled is None and again.tokens.dtype == torch.bfloat16
    assert_same(again, encoder.encode(PROMPTS))


def test_foreign_or_torn_shards_are_named(tmp_path):
    cache = TextEmbeddingCache(tmp_path, ToyEncoder())
    (cache.folder).mkdir(parents=True, exist_ok=True)
    (cache.folder / "shard-torn.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(DataError, match="shard-torn.safetensors is not a readable safetensors file"):
        TextEmbeddingCache(tmp_path, ToyEncoder())
    (cache.folder / "shard-torn.safetensors").unlink()
    TextEmbeddingCache(tmp_path, ToyEncoder()).embed(PROMPTS[:1])
    shard = next(cache.folder.glob("shard-*.safetensors"))
    other = ToyEncoder(salt="other")
    other_folder = tmp_path / other.fingerprint()[:16]
    other_folder.mkdir()
    (other_folder / shard.name).write_bytes(shard.read_bytes())
    with pytest.raises(DataError, match="does not hold text embeddings of this encoder"):
        TextEmbeddingCache(tmp_path, other)


def test_left_padding_is_refused(tmp_path):
    class LeftPadded(ToyEncoder):
        def encode(self, prompts):
            condition = super().encode(prompts)
            return TextCondition(condition.tokens.flip(1), condition.mask.flip(1), condition.pooled)

    with pytest.raises(ValueError, match="padding on the right"):
        TextEmbeddingCache(tmp_path, LeftPadded()).embed(["ab"])


def test_a_pretrained_encoder_through_the_cache_equals_its_direct_output(tmp_path):
    pytest.importorskip("transformers")
    from helpers.text_encoders import save_t5

    from dumo.conditioning.text import PretrainedTextEncoder

    encoder = PretrainedTextEncoder.from_pretrained(save_t5(tmp_path / "t5"), max_length=10)
    direct = encoder.encode(PROMPTS)
    cache = TextEmbeddingCache(tmp_path / "cache", encoder)
    assert_same(cache.embed(PROMPTS), direct)
    assert_same(TextEmbeddingCache(tmp_path / "cache", encoder).embed(PROMPTS), direct)

"""Prompts as training data and at sampling: the ``text`` config section, the record of a run's text
encoder, and the turning of prompts into the :class:`~dumo.conditioning.TextCondition` a network reads.

Two kinds of encoder (``text.encoder``):

- ``small``: a word-level tokenizer (its vocabulary is the data's words) and a
  :class:`~dumo.conditioning.text.SmallTextEncoder` inside the network, trained with it; data
  carries token ids and a mask;
- ``pretrained``: a frozen ``transformers`` encoder from the local folder ``text.path``; data
  carries its embeddings, computed once per prompt and kept in a
  :class:`~dumo.data.text_cache.TextEmbeddingCache`;
- ``pipeline``: the text encoders of the diffusers pipeline folder ``text.path``, called as that
  pipeline calls them (:class:`~dumo.conditioning.pipeline_text.PipelineTextEncoder`; the encoder of
  ``model.name: diffusers``), cached alike.

What sampling needs (the tokenizer's vocabulary itself, or the frozen encoder's folder,
fingerprint and widths) is a :class:`TextSpec`, recorded with the data in every checkpoint and
export, so a run samples from prompts with nothing but its weights (and, for a frozen encoder,
that encoder's folder).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from dumo.conditioning import TextCondition
from dumo.conditioning.text import TextEncoderError, WordTokenizer
from dumo.data.images import DataError
from dumo.schema import require

TEXT_DATASETS = ("shapes", "captions", "caption_latents")  # the datasets whose samples come with a prompt
DEFAULT_CACHE = "~/.cache/dumo/text-embeddings"


@dataclass
class TextConfig:
    """The ``text`` section: how prompts are encoded (used by the datasets of :data:`TEXT_DATASETS`)."""

    encoder: Literal["small", "pretrained", "pipeline"] = "small"
    # pretrained: a local transformers folder (or a diffusers pipeline folder); pipeline: the pipeline folder
    path: str | None = None
    max_tokens: int = 16  # prompts are padded to this many tokens, longer ones cut (pipeline: max_sequence_length)
    width: int = 128  # small: width of the encoder (the text_dim the TextDiT reads)
    depth: int = 2  # small: transformer layers
    heads: int = 4  # small: attention heads
    min_count: int = 1  # small, captions: words seen fewer times become [UNK]
    layer: int | None = None  # pretrained: the hidden state to read (null: the last; e.g. -2)
    cache: str | None = None  # pretrained: folder of the embedding cache (default ~/.cache/dumo/text-embeddings)
    # pretrained, caption_latents: the embeddings must come from the latent folder (dumo encode --text-encoder);
    # training never loads the encoder, and refuses data without them
    precomputed: bool = False

    def validate(self, prefix: str) -> None:
        require(self.max_tokens >= 1, f"{prefix}.max_tokens must be >= 1; got {self.max_tokens}")
        require(self.width >= 1 and self.depth >= 0 and self.heads >= 1, f"{prefix}.width, depth and heads must be > 0")
        require(
            self.width % self.heads == 0, f"{prefix}.width ({self.width}) must be divisible by heads ({self.heads})"
        )
        require(self.min_count >= 1, f"{prefix}.min_count must be >= 1; got {self.min_count}")
        require(
            self.encoder == "small" or self.path is not None,
            f"{prefix}.encoder={self.encoder} needs {prefix}.path: a local "
            f"{'transformers' if self.encoder == 'pretrained' else 'diffusers pipeline'} folder",
        )
        require(
            not self.precomputed or self.encoder == "pretrained",
            f"{prefix}.precomputed applies to text.encoder=pretrained (the small encoder is trained with the model)",
        )


@dataclass(frozen=True)
class TextSpec:
    """What a network and sampling need to know of a run's text encoder, without the data."""

    encoder: str  # "small", "pretrained" or "pipeline"
    max_tokens: int
    tokenizer: str | None = None  # small: the tokenizer.json text (its vocabulary)
    vocab_size: int = 0  # small
    path: str | None = None  # pretrained: the encoder's folder
    fingerprint: str | None = None  # pretrained: the encoder's fingerprint (weights, tokenizer, length, layer)
    text_dim: int = 0  # pretrained: width of the token embeddings
    pooled_dim: int | None = None  # pretrained: width of the pooled vector

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> TextSpec:
        try:
            return cls(**record)
        except TypeError as error:
            raise DataError(f"the text encoder record in the weights is unreadable: {error}") from None

    def digest(self) -> str:
        """The spec as stable text, for the data's fingerprint."""
        return json.dumps(self.to_dict(), sort_keys=True)


class Prompts:
    """Prompts to the :class:`TextCondition` of a run's network: token ids of the small encoder's
    tokenizer, or the cached embeddings of the frozen encoder (loaded on first use)."""

    def __init__(self, spec: TextSpec, config: TextConfig):
        self.spec, self.config = spec, config
        self.tokenizer = WordTokenizer.from_json(spec.tokenizer) if spec.encoder == "small" else None
        self._cache = None

    def condition(self, prompts: Sequence[str]) -> TextCondition:
        """The prompts as the network reads them, on the CPU."""
        prompts = list(prompts)
        if self.tokenizer is not None:
            return self.tokenizer.condition(prompts, self.spec.max_tokens)
        return self.cache().embed(prompts)

    def cache(self):
        """The frozen encoder's embedding cache (the encoder is loaded here, once)."""
        if self._cache is None:
            from dumo.data.text_cache import TextEmbeddingCache

            encoder = load_pretrained(self.config, self.spec.path, self.spec.encoder)
            if self.spec.fingerprint is not None and encoder.fingerprint() != self.spec.fingerprint:
                raise DataError(
                    f"the text encoder in {self.spec.path} is not the one this run was trained with (another "
                    "fingerprint: other weights, tokenizer, length or layer)"
                )
            self._cache = TextEmbeddingCache(Path(self.config.cache or DEFAULT_CACHE), encoder)
        return self._cache


def load_pretrained(config: TextConfig, path: str | None = None, kind: str | None = None):
    """The frozen encoder of ``config`` (from ``path`` when given: the folder a run recorded): a
    transformers encoder, or (``kind`` or ``config.encoder`` ``pipeline``) a diffusers pipeline's
    text encoders, loaded when a prompt is first encoded."""
    from dumo.conditioning.pipeline_text import PipelineTextEncoder
    from dumo.conditioning.pretrained_text import PretrainedTextEncoder

    folder = path or config.path
    if folder is None:
        raise TextEncoderError(f"text.encoder={config.encoder} needs text.path: a local folder")
    if (kind or config.encoder) == "pipeline":
        return PipelineTextEncoder(folder, max_length=config.max_tokens)
    return PretrainedTextEncoder.from_pretrained(folder, max_length=config.max_tokens, layer=config.layer)


def text_spec(
    config: TextConfig, sentences: Iterable[str] | None = None, words: Iterable[str] | None = None
) -> TextSpec:
    """The spec of a new run: the small encoder's tokenizer over ``words`` (a known vocabulary) or
    the words of ``sentences`` (most frequent first); or the frozen encoder's record."""
    if config.encoder == "small":
        if words is not None:
            tokenizer = WordTokenizer.from_words(words)
        else:
            tokenizer = WordTokenizer.from_sentences(sentences or [], min_count=config.min_count)
        return TextSpec("small", config.max_tokens, tokenizer.to_json(), tokenizer.vocab_size)
    encoder = load_pretrained(config)
    if config.encoder == "pipeline":  # the embedding of the null prompt, cached: no encoder loaded on a hit
        from dumo.conditioning.pipeline_text import NULL_PROMPT
        from dumo.data.text_cache import TextEmbeddingCache

        probe = TextEmbeddingCache(Path(config.cache or DEFAULT_CACHE), encoder).embed([NULL_PROMPT])
    else:
        probe = encoder.encode(["a"])
    pooled = None if probe.pooled is None else int(probe.pooled.shape[-1])
    return TextSpec(
        config.encoder,
        encoder.max_length,
        path=str(Path(config.path).expanduser().resolve()),
        fingerprint=encoder.fingerprint(),
        text_dim=int(probe.tokens.shape[-1]),
        pooled_dim=pooled,
    )


class PromptStream:
    """Training batches of a source whose ``next_batch`` gives (images, prompts), with the prompts
    turned into the network's condition; its state is the source's."""

    def __init__(self, source, prompts: Prompts):
        self.source, self.prompts = source, prompts

    def next_batch(self, device: torch.device | str = "cpu"):
        from dumo.data.batch import Batch

        x, texts = self.source.next_batch()
        return Batch(x.to(device), self.prompts.condition(texts).to(device))

    def state(self) -> Tensor:
        return self.source.state()

    def load_state(self, state: Tensor) -> None:
        self.source.load_state(state)


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a text file, one a line (blank lines at the end ignored; another blank line,
    or none at all, is an error naming the file)."""
    file = Path(path).expanduser()
    try:
        lines = file.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read the prompts file {file}: {error}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataError(f"the prompts file {file} holds no prompts")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise DataError(f"{file} line {number} is blank: one prompt a line")
    return [" ".join(line.split()) for line in lines]


__all__ = [
    "DEFAULT_CACHE",
    "TEXT_DATASETS",
    "PromptStream",
    "Prompts",
    "TextConfig",
    "TextSpec",
    "load_pretrained",
    "read_prompts",
    "text_spec",
]

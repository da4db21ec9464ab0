"""Text encoders: prompts to the :class:`~dumo.conditioning.TextCondition` networks read.

Two kinds:

- a small trainable encoder (:class:`SmallTextEncoder`) over a word-level tokenizer
  (:class:`WordTokenizer`): data carries token ids, the network runs the encoder inside itself and
  trains it with the image model;
- a frozen pretrained encoder (:class:`~dumo.conditioning.pretrained_text.PretrainedTextEncoder`,
  importable from here too) from a local ``transformers`` folder (T5 / UMT5 encoders, CLIP text
  models, decoder-only language models such as Gemma or Qwen): its embeddings are computed once,
  ahead of training (see :mod:`dumo.data.text_cache`).

Both pad on the right to a fixed ``max_length`` and cut longer prompts there (a note on stderr says
how many were cut). Nothing is ever downloaded: a pretrained encoder loads from a local folder or
not at all.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from dumo.conditioning import TextCondition
from dumo.errors import DumoError
from dumo.files import atomic_write

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"


class TextEncoderError(DumoError):
    """A text encoder or tokenizer is missing, foreign, or cannot be loaded."""


class TextEncoder(Protocol):
    """A frozen encoder whose embeddings can be computed once and cached."""

    max_length: int

    def encode(self, prompts: Sequence[str]) -> TextCondition:
        """(B, max_length, D) float embeddings, zero at padding, with mask and pooled vectors."""
        ...

    def fingerprint(self) -> str:
        """A stable hash of everything that decides the embeddings (weights, tokenizer, length)."""
        ...


def note_truncated(owner: object, count: int, max_length: int) -> None:
    """Say once per encoder that prompts were cut, rather than dropping words silently."""
    if count and not getattr(owner, "_noted_truncation", False):
        print(
            f"dumo: note: {count} prompt(s) longer than {max_length} tokens were cut to {max_length}",
            file=sys.stderr,
        )
        owner._noted_truncation = True  # type: ignore[attr-defined]


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """The mean of each row's real tokens (zeros for a row without any)."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


# -- the trainable kind -------------------------------------------------------------------------------


class WordTokenizer:
    """Lower-cased words (split on whitespace and punctuation) to ids, ``[PAD]`` = 0, ``[UNK]`` = 1.

    Stored as a standard ``tokenizer.json`` of the ``tokenizers`` library (a WordLevel model).
    """

    def __init__(self, tokenizer) -> None:
        if not isinstance(tokenizer.model, _tokenizers().models.WordLevel):
            raise TextEncoderError(f"not a word-level tokenizer (its model is {type(tokenizer.model).__name__})")
        missing = [token for token in (PAD_TOKEN, UNK_TOKEN) if tokenizer.token_to_id(token) is None]
        if missing:
            raise TextEncoderError(f"the word tokenizer has no {' or '.join(missing)} token")
        self.tokenizer = tokenizer
        self.pad_id: int = tokenizer.token_to_id(PAD_TOKEN)

    @classmethod
    def from_words(cls, words: Iterable[str]) -> WordTokenizer:
        """A tokenizer knowing ``words`` (lower-cased, first occurrence kept) after [PAD] and [UNK]."""
        vocabulary = {PAD_TOKEN: 0, UNK_TOKEN: 1}
        for word in words:
            vocabulary.setdefault(word.lower(), len(vocabulary))
        return cls(_word_level(vocabulary))

    @classmethod
    def from_sentences(
        cls, sentences: Iterable[str], min_count: int = 1, max_words: int | None = None
    ) -> WordTokenizer:
        """A tokenizer for the words of ``sentences`` that occur at least ``min_count`` times, most
        frequent first (ties alphabetically, so the ids are the same on every machine), at most
        ``max_words`` of them; other words become [UNK]."""
        splitter = _word_level({PAD_TOKEN: 0, UNK_TOKEN: 1})
        counts: Counter[str] = Counter()
        for sentence in sentences:
            normalised = splitter.normalizer.normalize_str(sentence)
            counts.update(piece for piece, _ in splitter.pre_tokenizer.pre_tokenize_str(normalised))
        ranked = sorted((word for word, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls.from_words(ranked[:max_words] if max_words is not None else ranked)

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        """A tokenizer saved by :meth:`save` (a ``tokenizer.json`` file, or a folder holding one)."""
        file = Path(path).expanduser()
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise TextEncoderError(f"word tokenizer not found: {file}")
        try:
            tokenizer = _tokenizers().Tokenizer.from_file(str(file))
        except Exception as error:  # tokenizers raises a bare Exception for malformed files
            raise TextEncoderError(f"{file} is not a tokenizer.json file: {error}") from None
        return cls(tokenizer)

    @classmethod
    def from_json(cls, text: str) -> WordTokenizer:
        """A tokenizer from the text of a ``tokenizer.json`` (as :meth:`to_json` gives it)."""
        try:
            tokenizer = _tokenizers().Tokenizer.from_str(text)
        except Exception as error:  # tokenizers raises a bare Exception for malformed text
            raise TextEncoderError(f"not a tokenizer.json: {error}") from None
        return cls(tokenizer)

    def to_json(self) -> str:
        """The text of this tokenizer's ``tokenizer.json``."""
        return self.tokenizer.to_str()

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` (at ``path``, or inside it when it is a folder) atomically."""
        file = Path(path).expanduser()
        if file.is_dir():
            file = file / "tokenizer.json"
        atomic_write(file, self.tokenizer.to_str(pretty=True).encode())

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, prompts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
        """Token ids (B, max_length) int64, [PAD] after each prompt, and the mask (True: a word)."""
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1; got {max_length}")
        ids = torch.full((len(prompts), max_length), self.pad_id, dtype=torch.long)
        encodings = self.tokenizer.encode_batch(list(prompts))
        lengths = [len(encoding.ids) for encoding in encodings]
        for row, encoding in enumerate(encodings):
            kept = encoding.ids[:max_length]
            ids[row, : len(kept)] = torch.tensor(kept, dtype=torch.long)
        note_truncated(self, sum(n > max_length for n in lengths), max_length)
        mask = torch.arange(max_length)[None, :] < torch.tensor(lengths, dtype=torch.long)[:, None]
        return ids, mask

    def condition(self, prompts: Sequence[str], max_length: int) -> TextCondition:
        """The prompts as ids for a network that holds a :class:`SmallTextEncoder`."""
        return TextCondition(*self.encode(prompts, max_length))


def _tokenizers():
    try:
        import tokenizers
        import tokenizers.models
    except ImportError:
        raise TextEncoderError("the word tokenizer needs the tokenizers library: pip install tokenizers") from None
    return tokenizers


def _word_level(vocabulary: dict[str, int]):
    library = _tokenizers()
    tokenizer = library.Tokenizer(library.models.WordLevel(vocabulary, unk_token=UNK_TOKEN))
    tokenizer.normalizer = library.normalizers.Lowercase()
    tokenizer.pre_tokenizer = library.pre_tokenizers.Whitespace()
    return tokenizer


class SmallTextEncoder(nn.Module):
    """Token embedding + learned positions + ``depth`` pre-norm transformer layers + a final norm.

    ``forward(ids, mask)`` gives per-token features (B, L, dim), zero at padding, the mask, and the
    masked mean of the features as pooled vector (B, dim). Weights come from torch's RNG, so a
    seeded run builds the same encoder.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 256,
        depth: int = 4,
        heads: int = 4,
        max_length: int = 77,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"text encoder width {dim} is not a multiple of its {heads} heads")
        self.max_length = max_length
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Parameter(torch.empty(1, max_length, dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, heads, int(dim * mlp_ratio), dropout, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        length = ids.shape[1]
        if length > self.max_length:
            raise ValueError(f"{length} tokens exceed the text encoder's {self.max_length} positions")
        mask = mask.bool()
        x = self.token_embedding(ids) + self.position_embedding[:, :length]
        # An empty prompt has no token to attend to, and torch's fast inference path (eval, no grad)
        # then gives nan: let such a row attend to its first position; its outputs are zeroed below.
        attend = mask.clone()
        attend[:, 0] |= ~mask.any(dim=1)
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=~attend)
        tokens = self.norm(x) * mask.unsqueeze(-1)
        return tokens, mask, masked_mean(tokens, mask)


def __getattr__(name: str):
    # The frozen kind lives in its own module (it needs transformers only when loading); it is
    # importable from here too, without a circular import at load time.
    if name == "PretrainedTextEncoder":
        from dumo.conditioning.pretrained_text import PretrainedTextEncoder

        return PretrainedTextEncoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SmallTextEncoder",
    "TextEncoder",
    "TextEncoderError",
    "WordTokenizer",
    "masked_mean",
]

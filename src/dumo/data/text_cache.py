"""Text embeddings of a frozen encoder, computed once per prompt and kept on disk.

A text-to-image dataset encodes its captions once, as it encodes its images to latents once.
:class:`TextEmbeddingCache` keeps them in ``FOLDER/<fingerprint[:16]>/``: safetensors shards,
each written atomically and never rewritten, holding for every prompt its key (SHA-256 of the
encoder's fingerprint, a NUL byte and the prompt) ``<key>.tokens`` (the real tokens only, (n, D))
and ``<key>.pooled`` (D_pooled,) where the encoder gives one. Another encoder (other weights,
tokenizer, length, layer or dtype) has another fingerprint and so misses. An interrupted
precomputation keeps every shard it finished; the next call computes only what is missing.

Shards are memory-mapped, not read into memory; tokens come back padded with zeros to the
encoder's ``max_length``, exactly as the encoder gives them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from dumo.conditioning import TextCondition
from dumo.conditioning.text import TextEncoder
from dumo.data.images import DataError
from dumo.files import save_checkpoint

CACHE_FORMAT = "dumo-text-embeddings"
SHARD_GLOB = "shard-*.safetensors"


def prompt_key(fingerprint: str, prompt: str) -> str:
    """The cache key of ``prompt`` under the encoder with ``fingerprint``."""
    return hashlib.sha256(f"{fingerprint}\0{prompt}".encode()).hexdigest()


class TextEmbeddingCache:
    """Embeddings of ``encoder`` for any prompts, computing (in batches of ``batch_size``) only the
    prompts not stored yet, and storing them ``shard_prompts`` to a shard."""

    def __init__(self, folder: str | Path, encoder: TextEncoder, batch_size: int = 64, shard_prompts: int = 4096):
        if batch_size < 1 or shard_prompts < 1:
            raise ValueError("batch_size and shard_prompts must be positive")
        self.encoder = encoder
        self.fingerprint = encoder.fingerprint()
        self.folder = Path(folder).expanduser() / self.fingerprint[:16]
        self.batch_size = batch_size
        self.shard_prompts = shard_prompts
        self._handles: dict[Path, object] = {}
        self._shard_of: dict[str, Path] = {}
        self._pooled: set[str] = set()  # keys stored with a pooled vector
        for shard in sorted(self.folder.glob(SHARD_GLOB)):
            self._open(shard)

    def __len__(self) -> int:
        return len(self._shard_of)

    def __contains__(self, prompt: str) -> bool:
        return prompt_key(self.fingerprint, prompt) in self._shard_of

    def _open(self, shard: Path) -> None:
        try:
            handle = safe_open(str(shard), framework="pt")
            metadata = handle.metadata() or {}
        except Exception as error:  # safetensors raises several types for torn or foreign files
            raise DataError(f"{shard} is not a readable safetensors file: {error}") from None
        if metadata.get("format") != CACHE_FORMAT or metadata.get("fingerprint") != self.fingerprint:
            raise DataError(f"{shard} does not hold text embeddings of this encoder (move it out of {self.folder})")
        self._handles[shard] = handle
        for name in handle.keys():  # noqa: SIM118 (not a dict)
            key, part = name.split(".", 1)
            self._shard_of[key] = shard
            if part == "pooled":
                self._pooled.add(key)

    def embed(self, prompts: Sequence[str]) -> TextCondition:
        """The embeddings of ``prompts`` on the CPU, equal to ``encoder.encode(prompts)``."""
        self.precompute(prompts)
        return self._read([prompt_key(self.fingerprint, prompt) for prompt in prompts])

    def precompute(self, prompts: Sequence[str]) -> int:
        """Encode and store the prompts not stored yet, reading nothing back; how many were encoded."""
        missing = list(dict.fromkeys(p for p in prompts if prompt_key(self.fingerprint, p) not in self._shard_of))
        for start in range(0, len(missing), self.shard_prompts):
            self._store(missing[start : start + self.shard_prompts])
        return len(missing)

    def _store(self, prompts: list[str]) -> None:
        tensors: dict[str, Tensor] = {}
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            condition = self.encoder.encode(batch).to("cpu")
            lengths = condition.mask.sum(dim=1)
            positions = torch.arange(condition.mask.shape[1])
            if not torch.equal(condition.mask, positions[None, :] < lengths[:, None]):
                raise ValueError("text embeddings can be cached only with padding on the right")
            for row, prompt in enumerate(batch):
                key = prompt_key(self.fingerprint, prompt)
                tensors[f"{key}.tokens"] = condition.tokens[row, : int(lengths[row])].clone()
                if condition.pooled is not None:
                    tensors[f"{key}.pooled"] = condition.pooled[row].clone()
        # Named by content: two processes filling in the same prompts write the same file.
        name = hashlib.sha256("".join(sorted(tensors)).encode()).hexdigest()[:20]
        shard = self.folder / f"shard-{name}.safetensors"
        save_checkpoint(shard, tensors, {"fingerprint": self.fingerprint}, kind=CACHE_FORMAT)
        self._open(shard)

    def _read(self, keys: list[str]) -> TextCondition:
        length = self.encoder.max_length
        tokens = [self._tensor(key, "tokens") for key in keys]
        if not tokens:
            raise ValueError("no prompts to embed")
        with_pooled = sum(key in self._pooled for key in keys)
        if 0 < with_pooled < len(keys):
            raise DataError(f"{self.folder} holds prompts with and without pooled vectors")
        pooled = [self._tensor(key, "pooled") for key in keys] if with_pooled else None
        padded = tokens[0].new_zeros((len(keys), length, tokens[0].shape[-1]))
        mask = torch.zeros(len(keys), length, dtype=torch.bool)
        for row, real in enumerate(tokens):
            padded[row, : len(real)] = real
            mask[row, : len(real)] = True
        return TextCondition(padded, mask, None if pooled is None else torch.stack(pooled))

    def _tensor(self, key: str, part: str) -> Tensor:
        return self._handles[self._shard_of[key]].get_tensor(f"{key}.{part}")  # type: ignore[attr-defined]


__all__ = ["CACHE_FORMAT", "TextEmbeddingCache", "prompt_key"]

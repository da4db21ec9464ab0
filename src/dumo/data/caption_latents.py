"""Captioned latents: a caption folder or manifest encoded once by ``dumo encode --data captions``,
each latent with its image's caption and, optionally, a frozen text encoder's embeddings.

The shards of a caption dataset carry their images' captions (``captions`` in each shard's metadata:
a JSON list in image order; the mirrored copies, when there are any, repeat them) and the index says
``"captions": true``. With ``--text-encoder PATH`` every distinct caption is also encoded once by that
frozen encoder into ``FOLDER/text-embeddings`` (a :class:`~dumo.data.text_cache.TextEmbeddingCache`,
keyed by the encoder's fingerprint and the prompt), and the index lists the encoder under
``text_encoders`` (folder, fingerprint, max_tokens, layer and widths); several encoders may be listed.

``data.name: caption_latents`` trains a TextDiT on them. With ``text.encoder: pretrained`` naming a
listed encoder (same folder, ``max_tokens`` and ``layer``) the embeddings are read from the folder and
the encoder is never loaded; an encoder at another folder is loaded once to compare fingerprints, and
one that is not listed is refused in one line. Without any listed encoder the prompts are encoded as
for captioned images (the small encoder's vocabulary, or the frozen encoder and its cache).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from dumo.conditioning import TextCondition
from dumo.data.images import DataError
from dumo.data.latents import INDEX_NAME, LatentDataset, read_shard_header
from dumo.data.prompts import Prompts, TextConfig, TextSpec, load_pretrained, text_spec
from dumo.data.text_cache import TextEmbeddingCache

TEXT_EMBEDDINGS = "text-embeddings"  # the embedding cache inside a latent folder


class CaptionLatentDataset(LatentDataset):
    """Latents of captioned images: ``captions[i]`` is the prompt of ``images[i]``."""

    def __init__(self, path: str | Path, autoencoder_path: str | None = None):
        super().__init__(path, autoencoder_path)
        if not self.path.is_dir() or not self.metadata.get("captions"):
            source = self.metadata.get("source", "a dataset without captions")
            raise DataError(
                f"{self.path} holds latents without captions (encoded from {source}); data.name=caption_latents "
                "needs latents of a caption folder or manifest: dumo encode --data captions --data-path ..."
            )
        captions: list[str] = []
        for entry in self.metadata["shards"]:
            file = self.path / entry["file"]
            metadata, _ = read_shard_header(file)
            try:
                shard = json.loads(metadata["captions"])
            except (KeyError, ValueError):
                raise DataError(f"{file} carries no captions; encode the captions again into a new folder") from None
            if not isinstance(shard, list) or len(shard) != int(entry["images"]):
                raise DataError(f"{file} carries {len(shard)} captions for {entry['images']} images")
            copies = 2 if self.metadata.get("flipped_copies") else 1
            captions += shard * copies  # originals, then their mirrors, as the latents are laid out
        self.name = "caption_latents"
        self.captions = captions
        self.num_classes = 0
        self.class_names = None
        self.labels = torch.zeros(len(captions), dtype=torch.long)

    @property
    def embedding_folder(self) -> Path:
        return self.path / TEXT_EMBEDDINGS

    @property
    def text_encoders(self) -> list[dict]:
        """The frozen encoders whose embeddings of every caption the folder holds."""
        return list(self.metadata.get("text_encoders") or [])


class PrecomputedEncoder:
    """Stands in for a frozen encoder whose embeddings of the training prompts are all stored: it has
    the encoder's fingerprint and length but no weights, so training never loads the encoder."""

    def __init__(self, record: dict, folder: Path):
        self.max_length = int(record["max_tokens"])
        self._fingerprint = str(record["fingerprint"])
        self.folder = folder

    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, prompts: Sequence[str]) -> TextCondition:
        raise DataError(
            f"prompt {prompts[0]!r} has no precomputed embedding in {self.folder}: training on precomputed "
            "embeddings encodes no new prompts"
        )


class PrecomputedPrompts(Prompts):
    """Prompts of a run trained on embeddings precomputed by ``dumo encode --text-encoder``."""

    def __init__(self, spec: TextSpec, config: TextConfig, record: dict, folder: Path):
        super().__init__(spec, config)
        self._cache = TextEmbeddingCache(folder, PrecomputedEncoder(record, folder))


def spec_of_record(record: dict) -> TextSpec:
    """The TextSpec of a run trained on the embeddings an index lists."""
    return TextSpec(
        "pretrained",
        int(record["max_tokens"]),
        path=record["path"],
        fingerprint=record["fingerprint"],
        text_dim=int(record["text_dim"]),
        pooled_dim=record.get("pooled_dim"),
    )


def matching_record(records: list[dict], config: TextConfig, where: Path) -> dict | None:
    """The listed encoder the ``text`` section names (None: none listed); a DataError in one line when
    encoders are listed but the section's is none of them."""
    if not records:
        return None
    folder = str(Path(config.path).expanduser().resolve())
    for record in records:
        same = record["path"] == folder and record["max_tokens"] == config.max_tokens
        if same and record.get("layer") == config.layer:
            return record
    if Path(folder).is_dir():  # the same encoder elsewhere (moved or copied) has the same fingerprint
        fingerprint = load_pretrained(config).fingerprint()
        for record in records:
            if record["fingerprint"] == fingerprint:
                return record
    listed = "; ".join(f"{r['path']} (max_tokens {r['max_tokens']}, layer {r.get('layer')})" for r in records)
    raise DataError(
        f"{where} holds caption embeddings of another text encoder: text.path {config.path} (max_tokens "
        f"{config.max_tokens}, layer {config.layer}) is not {listed}; set the text section to one of these, or add "
        f"this one: dumo encode ... --out {where} --text-encoder {config.path}"
    )


def caption_latent_prompts(dataset: CaptionLatentDataset, config: TextConfig) -> Prompts:
    """How the captions of ``dataset`` become conditions for a new run: the precomputed embeddings of the
    listed encoder the ``text`` section names, else as for captioned images."""
    if config.encoder != "pretrained":
        return Prompts(text_spec(config, sentences=dataset.captions), config)
    record = matching_record(dataset.text_encoders, config, dataset.path)
    if record is None and config.precomputed:
        raise DataError(
            f"text.precomputed: {dataset.path} holds no text embeddings; add them with "
            f"dumo encode ... --out {dataset.path} --text-encoder {config.path}"
        )
    if record is None:
        return Prompts(text_spec(config), config)
    prompts = PrecomputedPrompts(spec_of_record(record), config, record, dataset.embedding_folder)
    cache = prompts.cache()
    missing = sum(caption not in cache for caption in dict.fromkeys(dataset.captions))
    if missing:
        raise DataError(
            f"{dataset.embedding_folder} lacks the embeddings of {missing} captions; rerun the same "
            f"'dumo encode ... --text-encoder {record['path']}' to complete them"
        )
    return prompts


def precompute_caption_embeddings(out: Path, captions: Sequence[str], encoder, rank: int, world_size: int) -> int:
    """This rank's share of the distinct captions encoded into ``out/text-embeddings`` (the ones not stored
    yet); how many it encoded. Shards are named by their content, so ranks never write the same file."""
    distinct = sorted(set(captions))
    cache = TextEmbeddingCache(out / TEXT_EMBEDDINGS, encoder)
    return cache.precompute(distinct[rank::world_size])


def record_text_encoder(out: Path, captions: Sequence[str], encoder, path: str | Path, layer: int | None) -> dict:
    """Check that every caption's embedding is stored, then list the encoder in ``out/index.json``
    (atomically; an entry of the same fingerprint is replaced). Rank 0, after every rank's share."""
    from dumo.files import atomic_write

    cache = TextEmbeddingCache(out / TEXT_EMBEDDINGS, encoder)
    distinct = set(captions)
    missing = sum(caption not in cache for caption in distinct)
    if missing:
        raise DataError(f"{missing} caption embeddings are missing after encoding; rerun the same command")
    probe = encoder.encode(["a"])
    record = {
        "path": str(Path(path).expanduser().resolve()),
        "fingerprint": encoder.fingerprint(),
        "max_tokens": int(encoder.max_length),
        "layer": layer,
        "text_dim": int(probe.tokens.shape[-1]),
        "pooled_dim": None if probe.pooled is None else int(probe.pooled.shape[-1]),
        "prompts": len(distinct),
    }
    index = json.loads((out / INDEX_NAME).read_text())
    others = [r for r in index.get("text_encoders") or [] if r.get("fingerprint") != record["fingerprint"]]
    index["text_encoders"] = [*others, record]
    atomic_write(out / INDEX_NAME, (json.dumps(index, indent=1) + "\n").encode())
    return record


__all__ = [
    "TEXT_EMBEDDINGS",
    "CaptionLatentDataset",
    "caption_latent_prompts",
    "precompute_caption_embeddings",
    "record_text_encoder",
]

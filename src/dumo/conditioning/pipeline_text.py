"""Prompts encoded by a diffusers pipeline's own text encoders, the way its pipeline encodes them.

The pipeline's ``encode_prompt`` is called as the pipeline calls it when sampling, so the
embeddings are those the transformer was trained on:

- ``SanaPipeline``: Gemma with the pipeline's complex human instruction (the default of its
  ``__call__``), the first token and the last ``max_length - 1`` kept, and the padding mask; the
  unconditional prompt is ``""`` without the instruction, as the pipeline encodes its negative prompt;
- ``StableDiffusion3Pipeline``: CLIP-L and CLIP-G (penultimate layers, concatenated and padded to
  T5's width) followed by T5's tokens, and the two pooled CLIP vectors; every token is attended to;
- ``FluxPipeline``: T5's tokens and CLIP-L's pooled vector; every token is attended to.

Only the text encoders and tokenizers are loaded (no transformer, no VAE), from ``.safetensors``
files of a local folder, and only when a prompt has to be encoded: the fingerprint (which keys
cached embeddings, see :mod:`dumo.data.text_cache`) is computed from the files.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from dumo.conditioning import TextCondition
from dumo.conditioning.text import TextEncoderError

#: the prompt that stands for the unconditional input (the pipeline's negative prompt ``""``): a NUL
#: byte, which no caption holds
NULL_PROMPT = "\0"
#: pipelines whose prompts dumo encodes
PIPELINES = ("SanaPipeline", "StableDiffusion3Pipeline", "FluxPipeline")
FINGERPRINT_VERSION = "1"
CHUNKS, CHUNK_BYTES = 16, 4096  # bytes of each weight file hashed into a fingerprint
VOLATILE_KEYS = ("_diffusers_version", "_name_or_path", "transformers_version")


def file_digest(file: Path, digest) -> None:
    """Add ``file`` to ``digest``: a JSON file without its version stamps, a safetensors file by its
    header (names, dtypes, shapes) and evenly spaced chunks of its data, anything else whole."""
    if file.suffix == ".json":
        try:
            record = json.loads(file.read_text())
        except ValueError:
            record = file.read_text()
        if isinstance(record, dict):
            record = {key: value for key, value in record.items() if key not in VOLATILE_KEYS}
        digest.update(json.dumps(record, sort_keys=True).encode())
        return
    size = file.stat().st_size
    digest.update(f"{size}\0".encode())
    with file.open("rb") as handle:
        if file.suffix != ".safetensors" or size < CHUNKS * CHUNK_BYTES * 4:
            digest.update(handle.read())
            return
        header_size = int.from_bytes(handle.read(8), "little")
        digest.update(handle.read(header_size))
        for k in range(CHUNKS):
            handle.seek(8 + header_size + (size - 8 - header_size - CHUNK_BYTES) * k // (CHUNKS - 1))
            digest.update(handle.read(CHUNK_BYTES))


def folder_fingerprint(folders: Sequence[Path], settings: dict | None = None) -> str:
    """SHA-256 of the files of ``folders`` (see :func:`file_digest`) and ``settings``: another weight,
    config or tokenizer gives another fingerprint; a moved or copied folder keeps its own."""
    digest = hashlib.sha256(f"dumo folder fingerprint {FINGERPRINT_VERSION}\0".encode())
    for folder in folders:
        for file in sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith(".")):
            digest.update(f"{folder.name}/{file.relative_to(folder).as_posix()}\0".encode())
            file_digest(file, digest)
    digest.update(json.dumps(settings or {}, sort_keys=True).encode())
    return digest.hexdigest()


def read_index(folder: Path) -> dict:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise TextEncoderError(f"{folder} has no model_index.json: not a diffusers pipeline folder")
    try:
        index = json.loads(index_file.read_text())
    except ValueError as error:
        raise TextEncoderError(f"{index_file} is not valid JSON ({error})") from None
    if not isinstance(index, dict):
        raise TextEncoderError(f"{index_file} does not hold a pipeline index")
    return index


class PipelineTextEncoder:
    """The text encoders of the diffusers pipeline in ``folder``, encoding prompts as it does.

    ``max_length`` is the pipeline's ``max_sequence_length`` (SANA 300, SD3 256, FLUX 512 by
    default); the embeddings hold ``max_length`` tokens (SD3: CLIP's 77 before them).
    """

    def __init__(self, folder: str | Path, max_length: int, dtype: torch.dtype = torch.float32):
        self.folder = Path(folder).expanduser().resolve()
        if not self.folder.is_dir():
            raise TextEncoderError(f"no diffusers pipeline folder at {self.folder}")
        index = read_index(self.folder)
        self.pipeline_class = str(index.get("_class_name", ""))
        if self.pipeline_class not in PIPELINES:
            raise TextEncoderError(
                f"{self.folder} holds a {self.pipeline_class or 'pipeline of no class'}; dumo encodes prompts of "
                f"{', '.join(PIPELINES)}"
            )
        self.parts = sorted(
            name for name, entry in index.items() if name.startswith(("text_encoder", "tokenizer")) and entry
        )
        for name in self.parts:
            if not (self.folder / name).is_dir():
                raise TextEncoderError(f"{self.folder} lacks the {name}/ folder that model_index.json names")
            if name.startswith("text_encoder") and not any((self.folder / name).glob("*.safetensors")):
                raise TextEncoderError(
                    f"{self.folder / name} has no .safetensors weights (dumo reads no pickled weights)"
                )
        if max_length < 1:
            raise TextEncoderError(f"the prompts' max_length must be >= 1; got {max_length}")
        self.sequence_length = max_length
        self.dtype = dtype
        self.device = torch.device("cpu")
        self._pipe = None
        self._max_length: int | None = None
        self._fingerprint = folder_fingerprint(
            [self.folder / name for name in self.parts],
            {"pipeline": self.pipeline_class, "max_length": max_length, "dtype": str(dtype)},
        )

    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def max_length(self) -> int:
        """Tokens of every embedding: SD3 puts CLIP's tokens before T5's."""
        if self._max_length is None:
            clip = self.pipeline().tokenizer_max_length if self.pipeline_class == "StableDiffusion3Pipeline" else 0
            self._max_length = clip + self.sequence_length
        return self._max_length

    def to(self, device: torch.device | str) -> PipelineTextEncoder:
        self.device = torch.device(device)
        if self._pipe is not None:
            self._pipe.to(self.device)
        return self

    def release(self) -> None:
        """Free the text encoders (the fingerprint stays; they load again if needed)."""
        self._pipe = None

    def pipeline(self):
        """The pipeline with its text encoders and tokenizers only, loaded on first use."""
        if self._pipe is None:
            try:
                import diffusers
            except ImportError:
                raise TextEncoderError('diffusers pipelines need diffusers: pip install "dumo[bridge]"') from None
            try:
                pipe = getattr(diffusers, self.pipeline_class).from_pretrained(
                    self.folder, transformer=None, vae=None, torch_dtype=self.dtype,
                    local_files_only=True, use_safetensors=True,
                )  # fmt: skip
            except (OSError, ValueError, TypeError) as error:
                line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise TextEncoderError(f"cannot load the text encoders of {self.folder}: {line}") from None
            pipe.set_progress_bar_config(disable=True)
            self._pipe = pipe.to(self.device)
        return self._pipe

    def encode(self, prompts: Sequence[str]) -> TextCondition:
        """(B, max_length, D) embeddings on the CPU in float32; :data:`NULL_PROMPT` is the unconditional input."""
        prompts = list(prompts)
        real = [p for p in prompts if p != NULL_PROMPT]
        encoded = self._encode(real, null=False) if real else None
        null = self._encode([""], null=True) if len(real) < len(prompts) else None
        rows, next_real = [], 0
        for prompt in prompts:
            if prompt == NULL_PROMPT:
                rows.append((null, 0))
            else:
                rows.append((encoded, next_real))
                next_real += 1
        pooled = None
        if rows[0][0].pooled is not None:
            pooled = torch.stack([source.pooled[row] for source, row in rows])
        return TextCondition(
            torch.stack([source.tokens[row] for source, row in rows]),
            torch.stack([source.mask[row] for source, row in rows]),
            pooled,
        )

    @torch.no_grad()
    def _encode(self, prompts: list[str], null: bool) -> TextCondition:
        pipe = self.pipeline()
        length = self.sequence_length
        pooled = None
        if self.pipeline_class == "SanaPipeline":
            instruction = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
            tokens, mask, null_tokens, null_mask = pipe.encode_prompt(
                [""] if null else prompts, do_classifier_free_guidance=null, negative_prompt="",
                max_sequence_length=length, complex_human_instruction=instruction, device=self.device,
            )  # fmt: skip
            if null:  # the negative prompt: "" without the instruction
                tokens, mask = null_tokens, null_mask
        elif self.pipeline_class == "StableDiffusion3Pipeline":
            tokens, _, pooled, _ = pipe.encode_prompt(
                [""] if null else prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
                max_sequence_length=length, device=self.device,
            )  # fmt: skip
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool)
        else:
            tokens, pooled, _ = pipe.encode_prompt(
                [""] if null else prompts, prompt_2=None, max_sequence_length=length, device=self.device
            )
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool)
        mask = mask.bool().cpu()
        tokens = tokens.float().cpu() * mask[..., None]
        return TextCondition(tokens, mask, None if pooled is None else pooled.float().cpu())


__all__ = ["NULL_PROMPT", "PIPELINES", "PipelineTextEncoder", "folder_fingerprint"]

"""Frozen pretrained text encoders from local ``transformers`` folders (see :mod:`dumo.conditioning.text`).

Supported: T5 / UMT5 encoders (the encoder alone is loaded, also from a whole encoder-decoder
checkpoint), CLIP text models (with or without projection, also from a whole CLIP folder), and
decoder-only language models that ``AutoModel`` loads (Gemma, Qwen, Llama...). Weights are read
from ``.safetensors`` files only, with ``local_files_only``: nothing is downloaded or executed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dumo.conditioning import TextCondition
from dumo.conditioning.text import TextEncoderError, masked_mean, note_truncated

# Files that define a transformers tokenizer: one of them must be present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "tokenizer.model",
)
DEFAULT_MAX_LENGTH = 256  # cap of the default length for models with long position tables
SAMPLED_VALUES = 1024  # values of each weight tensor hashed into the fingerprint
FINGERPRINT_VERSION = "1"


def _resolve_folders(path: Path, tokenizer_path: str | Path | None) -> tuple[Path, Path]:
    """The model folder and the tokenizer folder: ``path`` itself, or a diffusers pipeline's
    ``text_encoder/`` and ``tokenizer/`` when ``path`` is the pipeline's folder."""
    if not path.is_dir():
        raise TextEncoderError(f"text encoder folder not found: {path}")
    model_folder = path
    if not (path / "config.json").is_file():
        if (path / "text_encoder" / "config.json").is_file():
            model_folder = path / "text_encoder"
        else:
            raise TextEncoderError(f"no config.json in {path}: not a transformers model folder")
    if tokenizer_path is not None:
        tokenizer_folder = Path(tokenizer_path).expanduser()
    elif model_folder != path or not any((path / name).is_file() for name in TOKENIZER_FILES):
        tokenizer_folder = model_folder.parent / "tokenizer"  # a pipeline keeps it beside the encoder
    else:
        tokenizer_folder = path
    if not any((tokenizer_folder / name).is_file() for name in TOKENIZER_FILES):
        raise TextEncoderError(
            f"no tokenizer for the text encoder in {model_folder} (looked for tokenizer.json, "
            f"spiece.model, vocab.json... in {tokenizer_folder})"
        )
    if not any(model_folder.glob("*.safetensors")):
        raise TextEncoderError(f"no .safetensors weights in {model_folder} (dumo reads no pickled weights)")
    return model_folder, tokenizer_folder


def _model_class(config):
    """The transformers class that holds just the text encoder for ``config``."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES

    architectures = getattr(config, "architectures", None) or []
    if config.model_type in ("clip", "clip_text_model"):  # a whole CLIP folder or its text tower
        with_projection = "CLIPTextModelWithProjection" in architectures
        return transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    if config.model_type in MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES:  # T5 & co: the encoder alone
        return transformers.AutoModelForTextEncoding
    return transformers.AutoModel


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    chosen = getattr(torch, str(dtype), None)
    if not isinstance(chosen, torch.dtype) or not chosen.is_floating_point:
        raise TextEncoderError(f"unknown text encoder dtype {dtype!r} (float32, bfloat16 or float16)")
    return chosen


class PretrainedTextEncoder:
    """A frozen ``transformers`` text encoder loaded from a local folder.

    Tokens: the last hidden state (or ``hidden_states[layer]``), zero at padding. Pooled: CLIP's
    pooled output (its projection for ``CLIPTextModelWithProjection``), for every other model the
    mean of the real tokens. Encoder-decoder models (T5) run their encoder only; decoder-only
    language models (Gemma, Qwen...) see right-padded prompts, so their causal attention keeps
    padding away from the real tokens.
    """

    def __init__(self, model, tokenizer, max_length: int, layer: int | None, identity: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.layer = layer
        self._fingerprint = identity

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        max_length: int | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
        layer: int | None = None,
        tokenizer_path: str | Path | None = None,
    ) -> PretrainedTextEncoder:
        """Load from ``path`` (a model folder, or a diffusers pipeline holding ``text_encoder/`` and
        ``tokenizer/``); nothing is downloaded. ``max_length`` defaults to the model's position
        limit, at most 256 tokens; ``dtype`` to float32."""
        model_folder, tokenizer_folder = _resolve_folders(Path(path).expanduser().resolve(), tokenizer_path)
        torch_dtype = _dtype(dtype)
        try:
            import transformers
        except ImportError:
            raise TextEncoderError("pretrained text encoders need transformers: pip install transformers") from None
        try:
            config = transformers.AutoConfig.from_pretrained(str(model_folder), local_files_only=True)
            model, info = _model_class(config).from_pretrained(
                str(model_folder),
                local_files_only=True,
                use_safetensors=True,
                dtype=torch_dtype,
                output_loading_info=True,
            )
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise TextEncoderError(f"cannot load the text encoder in {model_folder}: {first_line}") from None
        if info["missing_keys"]:  # random weights where trained ones were expected: refuse
            missing = sorted(info["missing_keys"])
            raise TextEncoderError(
                f"{model_folder} lacks {len(missing)} weights of {type(model).__name__}: {missing[0]}"
            )
        if model.config.is_encoder_decoder and hasattr(model, "decoder"):  # a whole seq2seq model
            model = model.get_encoder()
        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:  # many decoder-only tokenizers have none; padding is masked anyway
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        if max_length is None:
            max_length = min(limit or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
        if max_length < 1 or (limit is not None and max_length > limit):
            raise TextEncoderError(f"text max_length {max_length} is outside 1..{limit or 'inf'} for {model_folder}")
        model = model.to(device).eval().requires_grad_(False)
        identity = _fingerprint(model, tokenizer, model_folder, tokenizer_folder, max_length, layer, torch_dtype)
        return cls(model, tokenizer, max_length, layer, identity)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        """Width of the token embeddings."""
        return int(self.model.config.get_text_config().hidden_size)

    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, prompts: Sequence[str]) -> TextCondition:
        """(B, max_length, D) embeddings in the model's dtype on its device, zero at padding."""
        prompts = list(prompts)
        lengths = [len(ids) for ids in self.tokenizer(prompts)["input_ids"]]
        note_truncated(self, sum(n > self.max_length for n in lengths), self.max_length)
        batch = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device).bool()
        # no_grad, not inference_mode: the embeddings feed a network that trains on them
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=self.layer is not None)
            hidden = out.last_hidden_state if self.layer is None else out.hidden_states[self.layer]
            tokens = hidden * mask.unsqueeze(-1).to(hidden.dtype)
            if getattr(out, "text_embeds", None) is not None:
                pooled = out.text_embeds
            elif self.model.config.model_type in ("clip", "clip_text_model"):
                pooled = out.pooler_output
            else:
                pooled = masked_mean(tokens, mask)
        return TextCondition(tokens, mask, pooled)


@dataclass(frozen=True)
class EncoderShape:
    """What the config of a frozen encoder says about it, without its weights."""

    class_name: str
    parameters: int
    text_dim: int
    pooled_dim: int


def describe_encoder(path: str | Path) -> EncoderShape:
    """The class, parameter count and widths of the encoder in ``path`` (a model folder or a diffusers
    pipeline folder), from its ``config.json`` alone: the model is built on the meta device, so no
    weight is read or allocated (for planning a run whose encoder is several GB)."""
    folder = Path(path).expanduser().resolve()
    if not (folder / "config.json").is_file() and (folder / "text_encoder" / "config.json").is_file():
        folder = folder / "text_encoder"
    if not (folder / "config.json").is_file():
        raise TextEncoderError(f"no text encoder config at {folder} (config.json of a transformers folder)")
    try:
        import transformers
    except ImportError:
        raise TextEncoderError("pretrained text encoders need transformers: pip install transformers") from None
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise TextEncoderError(f"cannot read the text encoder config in {folder}: {error}") from None
    cls = _model_class(config)
    build = cls.from_config if hasattr(cls, "from_config") else cls._from_config  # Auto* classes | model classes
    with torch.device("meta"):
        model = build(config)
    if model.config.is_encoder_decoder and hasattr(model, "get_encoder"):
        model = model.get_encoder()
    text_dim = int(model.config.get_text_config().hidden_size)
    projection = getattr(model.config, "projection_dim", None) if "WithProjection" in type(model).__name__ else None
    parameters = sum(p.numel() for p in model.parameters())
    return EncoderShape(type(model).__name__, parameters, text_dim, int(projection or text_dim))


def _fingerprint(
    model: nn.Module,
    tokenizer,
    model_folder: Path,
    tokenizer_folder: Path,
    max_length: int,
    layer: int | None,
    dtype: torch.dtype,
) -> str:
    """SHA-256 of what decides the embeddings: the model's config and class, a strided sample of every
    weight tensor (so fine-tuned weights in an unchanged folder layout differ), the tokenizer's
    pipeline, special tokens and class, the length, the layer and the dtype. Not the folder's
    location nor the transformers version that saved it: a moved, copied or re-saved encoder keeps
    its cache."""
    digest = hashlib.sha256()

    def add(label: str, value: str | bytes) -> None:
        data = value.encode() if isinstance(value, str) else value
        digest.update(f"{label}:{len(data)}\0".encode())
        digest.update(data)

    add("version", FINGERPRINT_VERSION)
    config = json.loads((model_folder / "config.json").read_text())
    for volatile in ("transformers_version", "_name_or_path"):
        config.pop(volatile, None)
    add("config", json.dumps(config, sort_keys=True))
    add("model class", type(model).__name__)
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // SAMPLED_VALUES)][:SAMPLED_VALUES].float().cpu()
        add(f"weight {name}", f"{tuple(tensor.shape)}|{tensor.dtype}")
        add(f"values {name}", sample.numpy().tobytes())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The pipeline in effect, not the files: re-saving a tokenizer rewrites its config files
        # (transformers 5 adds load options to them) without changing a single token id.
        add("tokenizer", backend.to_str())
        add("special tokens", json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str))
    else:
        for name in TOKENIZER_FILES:
            if (tokenizer_folder / name).is_file():
                add(f"tokenizer {name}", (tokenizer_folder / name).read_bytes())
    add("tokenizer class", type(tokenizer).__name__)
    add("settings", json.dumps({"max_length": max_length, "layer": layer, "dtype": str(dtype)}, sort_keys=True))
    return digest.hexdigest()


__all__ = ["EncoderShape", "PretrainedTextEncoder", "describe_encoder"]

"""What each ``model.name`` is: its family, size, patch, conditions and the config keys it reads.

The one place that knows model names: the rest of dumo asks :func:`model_entry` instead of comparing
``model.name`` to strings, so a new family is one more entry here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from dumo.errors import ConfigError
from dumo.models.dit import DIT_SIZES
from dumo.models.text_dit import TEXT_DIT_SIZES

Family = Literal["mlp", "unet", "dit", "text_dit", "diffusers"]
Condition = Literal["none", "class", "text"]

MLP_HIDDEN_DIM, MLP_DEPTH = 256, 4  # the mlp's width and depth when model.hidden_dim / depth are null
PATCHES = (1, 2, 4)
UNET_KEYS = ("channels", "channel_mult", "num_res_blocks", "attention_resolutions", "dropout")
# Keys that some network ignores; the others (name, time_embedding_scale, u_head_init, head_blocks) are always
# written, head_blocks because validation already refuses it outside DiT.
DIFFUSERS_KEYS = ("pretrained", "lora", "allow_coarse_targets")
OPTIONAL_KEYS = ("hidden_dim", "depth", "num_heads", "position_order", *UNET_KEYS, *DIFFUSERS_KEYS)
#: objective.epsilon of a diffusers model when its config leaves it unset: every family of
#: dumo.bridge.families measured 1e-4 (Family.fd_epsilon; tests check that they agree)
DIFFUSERS_FD_EPSILON = 1e-4
DIT_KEYS = ("hidden_dim", "depth", "num_heads", "position_order", "head_blocks")


@dataclass(frozen=True)
class ModelEntry:
    """One network name: what it is and which ``ModelConfig`` keys shape it."""

    name: str
    family: Family
    data: Literal["vectors", "images"]  # (D,) vectors or square (C, H, W) images
    hidden_dim: int | None  # width (None: the unet, whose widths come from channels x channel_mult)
    depth: int | None  # blocks
    num_heads: int | None  # attention heads (None: no attention blocks to count)
    patch: int | None  # patch size of a transformer (None: no patches)
    conditions: tuple[Condition, ...]  # what it can be conditioned on ("none": unconditional)
    head_blocks: bool  # whether model.head_blocks may give each head private blocks
    reads: tuple[str, ...]  # the ModelConfig keys it reads besides name and time_embedding_scale
    buildable: bool = True  # built by models.build_model

    @property
    def unused_keys(self) -> tuple[str, ...]:
        """Keys of ``ModelConfig`` that this network ignores (left out of a run's config.yaml)."""
        return tuple(key for key in OPTIONAL_KEYS if key not in self.reads)

    def with_overrides(
        self, hidden_dim: int | None = None, depth: int | None = None, num_heads: int | None = None
    ) -> ModelEntry:
        """This entry with the size a config sets (null keys, and keys it does not read, keep the entry's)."""
        changes = {
            key: value
            for key, value in (("hidden_dim", hidden_dim), ("depth", depth), ("num_heads", num_heads))
            if value is not None and key in self.reads
        }
        return dataclasses.replace(self, **changes)


def _entries() -> dict[str, ModelEntry]:
    entries = {
        "mlp": ModelEntry(
            "mlp",
            "mlp",
            "vectors",
            MLP_HIDDEN_DIM,
            MLP_DEPTH,
            None,
            None,
            ("none", "class"),
            False,
            ("hidden_dim", "depth"),
        ),
        "unet": ModelEntry("unet", "unet", "images", None, None, None, None, ("none", "class"), False, UNET_KEYS),
        # a diffusers pipeline's transformer (SANA, SD3, FLUX): its size is the pipeline's
        "diffusers": ModelEntry(
            "diffusers", "diffusers", "images", None, None, None, None, ("text",), False, DIFFUSERS_KEYS
        ),
    }
    # The transformer families: one entry per (size, patch).
    transformers = (
        ("DiT", "dit", DIT_SIZES, ("none", "class"), True, DIT_KEYS, True),
        ("TextDiT", "text_dit", TEXT_DIT_SIZES, ("none", "text"), False, ("hidden_dim", "depth", "num_heads"), True),
    )
    for prefix, family, sizes, conditions, head_blocks, reads, buildable in transformers:
        for size_name, size in sizes.items():
            for patch in PATCHES:
                name = f"{prefix}-{size_name}/{patch}"
                entries[name] = ModelEntry(
                    name,
                    family,
                    "images",
                    size.hidden_dim,
                    size.depth,
                    size.num_heads,
                    patch,
                    conditions,
                    head_blocks,
                    reads,
                    buildable=buildable,
                )
    return entries


MODEL_REGISTRY: dict[str, ModelEntry] = _entries()


def find_model(name: str) -> ModelEntry | None:
    """The registry entry of ``name``; None when no network has that name."""
    return MODEL_REGISTRY.get(name)


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; a one-line :class:`ConfigError` when no network has that name."""
    entry = MODEL_REGISTRY.get(name)
    if entry is None:
        raise ConfigError(f"model.name must be mlp, unet or a DiT name like DiT-B/2; got {name!r}")
    return entry


def describe(name: str) -> str:
    """One line on what the network ``name`` is, e.g. for ``dumo info``."""
    entry = model_entry(name)
    parts = [entry.family]
    if entry.hidden_dim is not None:
        parts.append(f"width {entry.hidden_dim}, depth {entry.depth}")
    if entry.num_heads is not None:
        parts.append(f"{entry.num_heads} heads")
    if entry.patch is not None:
        parts.append(f"patch {entry.patch}")
    conditions = " or ".join("unconditional" if c == "none" else f"{c} conditioned" for c in entry.conditions)
    return f"{name}: {', '.join(parts)}; {entry.data}; {conditions}"


__all__ = ["DIFFUSERS_FD_EPSILON", "MODEL_REGISTRY", "ModelEntry", "describe", "find_model", "model_entry"]

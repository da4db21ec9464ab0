"""What a sample is conditioned on, as data carries it and networks read it.

A condition is one of:

- ``None``: an unconditional model;
- a ``LongTensor`` of class labels, shape (B,); the null class (classifier-free guidance's
  unconditional input) is the index ``num_classes``, one row past the real classes, so that
  class-conditional checkpoints read as they always have;
- a :class:`TextCondition`: a prompt per row, as token ids of a trainable encoder or as the
  embeddings of a frozen one, with a padding mask, an optional pooled vector and a per-row
  ``null`` flag that stands for the empty prompt.

The functions here treat the three alike (move, slice, concatenate, count rows), so that data
loaders, objectives and samplers never branch on the kind of condition.

What a null condition is belongs to the network's :class:`Conditioner`, the submodule that turns
``cond`` into what the network reads (the class table, the prompt encoder) and that
:func:`find_conditioner` finds: classifier-free guidance and condition dropout ask it for the null
condition, so a new kind of condition is a new conditioner and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@dataclass(frozen=True)
class TextCondition:
    """Prompts as a network reads them, one row per sample.

    ``tokens``: (B, L) integer token ids (a trainable encoder runs inside the network) or
    (B, L, D) float embeddings (a frozen encoder ran once, ahead of training).
    ``mask``: (B, L) bool, True where a token is real (False: padding).
    ``pooled``: (B, D_pooled) float, the encoder's sentence vector, when it gives one.
    ``null``: (B,) bool, True for rows that stand for the empty prompt: the network replaces their
    tokens and pooled vector by its learned null embedding (classifier-free guidance, and the
    prompt dropout that trains it).
    """

    tokens: Tensor
    mask: Tensor
    pooled: Tensor | None = None
    null: Tensor | None = None

    def __post_init__(self) -> None:
        rows = self.tokens.shape[0]
        if self.tokens.dim() not in (2, 3):
            raise ValueError(f"text tokens must be (B, L) ids or (B, L, D) embeddings; got {tuple(self.tokens.shape)}")
        if tuple(self.mask.shape) != tuple(self.tokens.shape[:2]):
            raise ValueError(f"text mask {tuple(self.mask.shape)} does not match tokens {tuple(self.tokens.shape)}")
        if self.pooled is not None and self.pooled.shape[0] != rows:
            raise ValueError(f"pooled text vectors have {self.pooled.shape[0]} rows for {rows} prompts")
        if self.null is None:
            object.__setattr__(self, "null", torch.zeros(rows, dtype=torch.bool, device=self.tokens.device))
        elif tuple(self.null.shape) != (rows,):
            raise ValueError(f"null flags {tuple(self.null.shape)} do not match {rows} prompts")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TextCondition:
        def move(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor.to(device, non_blocking=non_blocking)

        return TextCondition(move(self.tokens), move(self.mask), move(self.pooled), move(self.null))

    def rows(self, index: Tensor | slice) -> TextCondition:
        """The rows ``index`` (a slice, a bool mask or integer indices)."""

        def pick(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor[index]

        return TextCondition(pick(self.tokens), pick(self.mask), pick(self.pooled), pick(self.null))

    def with_null(self, rows: Tensor | None = None) -> TextCondition:
        """The same prompts with ``rows`` (a (B,) bool mask; all rows when None) made null."""
        null = torch.ones_like(self.null) if rows is None else self.null | rows.to(self.null.device)
        return replace(self, null=null)


#: what data yields next to ``x`` and networks take as ``cond``
Condition = Tensor | TextCondition | None


def condition_rows(cond: Condition) -> int | None:
    """How many samples ``cond`` conditions (None for an unconditional model)."""
    return None if cond is None else len(cond)


def move_condition(cond: Condition, device: torch.device | str, non_blocking: bool = False) -> Condition:
    return None if cond is None else cond.to(device, non_blocking=non_blocking)


def map_condition(cond: Condition, function: Callable[[Tensor], Tensor]) -> Condition:
    """``cond`` with ``function`` applied to each of its tensors (to pin or move them)."""
    if cond is None:
        return None
    if isinstance(cond, TextCondition):
        parts = (cond.tokens, cond.mask, cond.pooled, cond.null)
        return TextCondition(*(None if part is None else function(part) for part in parts))
    return function(cond)


def index_condition(cond: Condition, index: Tensor | slice) -> Condition:
    """The rows ``index`` (a slice, integer indices or a (B,) bool mask) of ``cond``."""
    if cond is None:
        return None
    return cond.rows(index) if isinstance(cond, TextCondition) else cond[index]


def slice_condition(cond: Condition, start: int, stop: int) -> Condition:
    """Rows ``start:stop`` of ``cond`` (a shard of a global batch)."""
    if cond is None:
        return None
    return cond.rows(slice(start, stop)) if isinstance(cond, TextCondition) else cond[start:stop]


def cat_conditions(conds: Sequence[Condition]) -> Condition:
    """The conditions of several batches, one after the other (all of one kind)."""
    if not conds or all(cond is None for cond in conds):
        return None
    if any(cond is None for cond in conds):
        raise ValueError("cannot concatenate a conditional batch with an unconditional one")
    if all(isinstance(cond, Tensor) for cond in conds):
        return torch.cat(list(conds))
    if not all(isinstance(cond, TextCondition) for cond in conds):
        raise ValueError("cannot concatenate class labels with prompts")
    texts: list[TextCondition] = list(conds)  # type: ignore[arg-type]
    widths = {text.tokens.shape[1] for text in texts}
    if len(widths) > 1:  # pad to the longest prompt; padding is masked out
        longest = max(widths)
        texts = [pad_tokens(text, longest) for text in texts]
    pooled = [text.pooled for text in texts]
    if any(p is None for p in pooled) and not all(p is None for p in pooled):
        raise ValueError("cannot concatenate prompts with and without pooled vectors")
    return TextCondition(
        torch.cat([text.tokens for text in texts]),
        torch.cat([text.mask for text in texts]),
        None if pooled[0] is None else torch.cat(pooled),  # type: ignore[arg-type]
        torch.cat([text.null for text in texts]),  # type: ignore[misc]
    )


def pad_tokens(text: TextCondition, length: int) -> TextCondition:
    """``text`` padded with masked-out tokens (zeros) to ``length`` tokens."""
    extra = length - text.tokens.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad {text.tokens.shape[1]} tokens to {length}")
    if extra == 0:
        return text
    pad_shape = (len(text), extra, *text.tokens.shape[2:])
    tokens = torch.cat([text.tokens, text.tokens.new_zeros(pad_shape)], dim=1)
    mask = torch.cat([text.mask, text.mask.new_zeros((len(text), extra))], dim=1)
    return replace(text, tokens=tokens, mask=mask)


@runtime_checkable
class Conditioner(Protocol):
    """What a network's conditioner says about its conditions: their kind, and the null condition
    (classifier-free guidance's unconditional input, which condition dropout trains).

    ``condition_kind`` is a class attribute: ``"class"``, ``"text"``, or the name of a new kind.
    Objectives and samplers take the null condition from here and never build one themselves.
    """

    condition_kind: str

    def null_like(self, cond: Condition) -> Condition:
        """``cond`` with every row the null condition (None stays None)."""
        ...

    def drop(self, cond: Condition, rows: Tensor) -> Condition:
        """``cond`` with the rows where ``rows`` ((B,) bool) holds replaced by the null condition."""
        ...

    def is_null(self, cond: Tensor | TextCondition) -> Tensor:
        """(B,) bool: the rows of ``cond`` that are the null condition."""
        ...


class ClassLabels:
    """Class labels, (B,) integers; the null class is the index ``num_classes``, one row past the real
    classes, where class-conditional checkpoints keep it."""

    condition_kind = "class"
    num_classes: int

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    def null_like(self, cond: Condition) -> Condition:
        return None if cond is None else torch.full_like(cond, self.num_classes)

    def drop(self, cond: Condition, rows: Tensor) -> Condition:
        return None if cond is None else torch.where(rows, self.null_like(cond), cond)

    def is_null(self, cond: Tensor | TextCondition) -> Tensor:
        return cond == self.num_classes


class TextPrompts:
    """Prompts (:class:`TextCondition`): a null row is flagged in ``TextCondition.null``, and the
    network reads its learned null prompt there."""

    condition_kind = "text"

    def null_like(self, cond: Condition) -> Condition:
        return None if cond is None else cond.with_null()

    def drop(self, cond: Condition, rows: Tensor) -> Condition:
        return None if cond is None else cond.with_null(rows)

    def is_null(self, cond: Tensor | TextCondition) -> Tensor:
        return cond.null


def find_conditioner(model: object) -> Conditioner | None:
    """The conditioner inside ``model`` (a network or a wrapper of one: DDP, a sampling view), None
    for an unconditional network."""
    modules = getattr(model, "modules", None)
    if modules is None:
        return None
    for module in modules():
        # the class attribute first: a cheap test on each module of a large network
        if getattr(type(module), "condition_kind", None) is not None and isinstance(module, Conditioner):
            return module
    return None


__all__ = [
    "ClassLabels",
    "Condition",
    "Conditioner",
    "TextCondition",
    "TextPrompts",
    "cat_conditions",
    "condition_rows",
    "find_conditioner",
    "index_condition",
    "map_condition",
    "move_condition",
    "pad_tokens",
    "slice_condition",
]

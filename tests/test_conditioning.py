"""The condition types: class labels, prompts and None move, slice and concatenate alike."""

import pytest
import torch

from dumo.conditioning import TextCondition, cat_conditions, condition_rows, slice_condition


def text(rows: int, length: int, dim: int | None = 3, pooled: bool = True) -> TextCondition:
    shape = (rows, length) if dim is None else (rows, length, dim)
    tokens = torch.arange(rows * length * (dim or 1), dtype=torch.float32).reshape(shape)
    if dim is None:
        tokens = tokens.long()
    mask = torch.ones(rows, length, dtype=torch.bool)
    return TextCondition(tokens, mask, torch.randn(rows, 4) if pooled else None)


def test_rows_and_slices_of_every_kind():
    labels = torch.tensor([0, 1, 2, 3])
    assert condition_rows(None) is None
    assert condition_rows(labels) == 4
    assert condition_rows(text(4, 2)) == 4
    assert torch.equal(slice_condition(labels, 1, 3), labels[1:3])
    part = slice_condition(text(4, 2), 1, 3)
    assert len(part) == 2 and part.pooled.shape == (2, 4) and part.null.shape == (2,)
    assert slice_condition(None, 0, 2) is None


def test_concatenation_pads_the_shorter_prompts_with_masked_tokens():
    both = cat_conditions([text(2, 3), text(1, 5)])
    assert both.tokens.shape == (3, 5, 3)
    assert both.mask.sum(dim=1).tolist() == [3, 3, 5]
    assert torch.all(both.tokens[:2, 3:] == 0)
    ids = cat_conditions([text(1, 2, dim=None), text(2, 4, dim=None)])
    assert ids.tokens.dtype == torch.long and ids.tokens.shape == (3, 4)


def test_null_flags_mark_the_empty_prompt_row_by_row():
    prompts = text(3, 2)
    assert not prompts.null.any()
    some = prompts.with_null(torch.tensor([True, False, True]))
    assert some.null.tolist() == [True, False, True]
    assert prompts.with_null().null.all()
    joined = cat_conditions([some, prompts])
    assert joined.null.tolist() == [True, False, True, False, False, False]


def test_mixing_kinds_is_refused():
    with pytest.raises(ValueError, match="labels with prompts"):
        cat_conditions([torch.tensor([1]), text(1, 2)])
    with pytest.raises(ValueError, match="unconditional"):
        cat_conditions([None, torch.tensor([1])])
    with pytest.raises(ValueError, match="does not match"):
        TextCondition(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool))

"""The condition types: class labels, prompts and None move, slice and concatenate alike; a network's
conditioner says what its null condition is, and guidance and condition dropout take it from there."""

import pytest
import torch

from dumo.conditioning import (
    Conditioner,
    TextCondition,
    cat_conditions,
    condition_rows,
    find_conditioner,
    slice_condition,
)
from dumo.data.batch import Batch
from dumo.models import ModelConfig, build_model
from dumo.models.text_dit import build_text_dit
from dumo.objectives import (
    DuMoConfig,
    DuMoObjective,
    MeanFlowConfig,
    MeanFlowObjective,
    MultiHeadConfig,
    MultiHeadObjective,
    ShortcutConfig,
    ShortcutObjective,
    TimeConfig,
)
from dumo.samplers import GuidedModel


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


# -- the conditioner of a network: its kind and its null condition ---------------------------------

TEXT_DIM = 12


def tiny_text_dit(heads: tuple[str, ...] = ("v", "u"), time_inputs: int = 1) -> torch.nn.Module:
    """A two-block TextDiT on 2 x 8 x 8 images reading float prompt embeddings, its zero-initialised
    layers given weights so that the prompt reaches the output."""
    torch.manual_seed(0)
    model = build_text_dit("TextDiT-XS/2", 8, 2, TEXT_DIM, heads, time_inputs)
    model.backbone.blocks = model.backbone.blocks[:2]
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.abs().sum() == 0:
                parameter.normal_(0, 0.1)
    return model


def embedded_prompts(rows: int = 8, length: int = 5) -> TextCondition:
    mask = torch.arange(length)[None] < (torch.arange(rows) % length + 1)[:, None]
    return TextCondition(torch.randn(rows, length, TEXT_DIM), mask)


def test_the_class_conditioner_has_the_null_at_index_num_classes_and_drops_exactly_the_chosen_rows():
    model = build_model(ModelConfig(hidden_dim=16, depth=1), (2,), ("v", "u"), num_classes=5)
    conditioner = find_conditioner(model)
    assert conditioner is model.backbone.conditioning.label and isinstance(conditioner, Conditioner)
    assert model.condition_kind == "class" and conditioner.condition_kind == "class"
    labels = torch.tensor([0, 4, 2, 1, 3, 0])
    assert conditioner.null_like(labels).tolist() == [5] * 6
    rows = torch.tensor([False, True, False, False, True, True])
    dropped = conditioner.drop(labels, rows)
    assert dropped.tolist() == [0, 5, 2, 1, 5, 5]
    assert torch.equal(conditioner.is_null(dropped), rows)
    assert conditioner.null_like(None) is None and conditioner.drop(None, rows) is None
    # the null row of the table is what an unconditional call reads
    x, t = torch.randn(6, 2), torch.rand(6)
    assert torch.equal(model(x, t, cond=conditioner.null_like(labels)).v, model(x, t).v)


def test_an_unconditional_network_has_no_conditioner_and_guidance_is_refused():
    model = build_model(ModelConfig(hidden_dim=16, depth=1), (2,), ("v", "u"))
    assert find_conditioner(model) is None and model.condition_kind is None
    with pytest.raises(ValueError, match="guidance needs a conditional model"):
        GuidedModel(model, 2.0)


def test_the_text_conditioner_nulls_prompts_by_their_flags():
    model = tiny_text_dit()
    conditioner = find_conditioner(model)
    assert conditioner is model.backbone.text and model.condition_kind == "text"
    prompts = embedded_prompts(4)
    rows = torch.tensor([True, False, False, True])
    dropped = conditioner.drop(prompts, rows)
    assert torch.equal(dropped.null, rows) and torch.equal(dropped.tokens, prompts.tokens)
    assert torch.equal(conditioner.is_null(dropped), rows)
    assert conditioner.null_like(prompts).null.all()
    x, t = torch.randn(4, 2, 8, 8), torch.rand(4)
    torch.testing.assert_close(model(x, t, cond=conditioner.null_like(prompts)).v, model(x, t).v, rtol=0, atol=1e-6)


def test_guidance_on_a_text_model_is_uncond_plus_w_times_cond_minus_uncond():
    model, prompts = tiny_text_dit(), embedded_prompts(4)
    x, t, w = torch.randn(4, 2, 8, 8), torch.rand(4), 2.5
    with torch.no_grad():
        conditional, unconditional = model(x, t, cond=prompts), model(x, t, cond=prompts.with_null())
        guided = GuidedModel(model, w)(x, t, cond=prompts)
    for head in ("v", "u"):
        expected = getattr(unconditional, head) + w * (getattr(conditional, head) - getattr(unconditional, head))
        torch.testing.assert_close(getattr(guided, head), expected, rtol=0, atol=1e-5)
    assert (conditional.v - unconditional.v).abs().amax() > 1e-3  # the prompt matters, so the test can fail


def test_dumo_guidance_on_a_text_model_gets_its_unconditional_pass_from_null_prompts():
    model, prompts = tiny_text_dit(), embedded_prompts(8)
    x = torch.randn(8, 2, 8, 8)
    zeta, dropout = 0.5, 0.4
    objective = DuMoObjective(DuMoConfig(zeta=zeta, label_dropout=dropout, time=TimeConfig("uniform")))
    seen: list[TextCondition] = []
    spy = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["cond"]), with_kwargs=True)
    torch.manual_seed(3)
    out = objective(model, Batch(x, prompts))
    spy.remove()
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(
        torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
    )
    # the same draws by hand: noise, times, then the dropout coins
    torch.manual_seed(3)
    z, t = torch.randn_like(x), torch.rand(8)
    kept = torch.rand(8) >= dropout
    assert 0 < kept.sum() < 8  # some prompts dropped, some kept
    # the pass with gradients reads the prompts with the dropped rows null; the batched no-grad pass
    # (u at t +- e, then the unconditional v) ends with every row null
    assert torch.equal(seen[0].null, ~kept)
    target_passes = seen[1]
    assert len(target_passes) == 24 and torch.equal(target_passes.null, torch.cat([~kept, ~kept, torch.ones(8).bool()]))
    x_t = t[:, None, None, None] * z + (1 - t[:, None, None, None]) * x
    with torch.no_grad():
        v_cond = model(x_t, t, cond=prompts.with_null(~kept)).v
        v_uncond = model(x_t, t, cond=prompts.with_null()).v
    expected = (z - x) + zeta * kept.float()[:, None, None, None] * (v_cond - v_uncond)
    torch.testing.assert_close(out.targets["v"], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "objective",
    [
        MeanFlowObjective(MeanFlowConfig(zeta=0.5, label_dropout=0.0)),
        ShortcutObjective(ShortcutConfig(max_steps=4, bootstrap_fraction=0.5, bootstrap_cfg=1.5, label_dropout=0.0)),
        MultiHeadObjective(MultiHeadConfig(zeta=0.5, label_dropout=0.0)),
    ],
    ids=["meanflow", "shortcut", "multihead"],
)
def test_training_time_guidance_on_a_text_model_reads_null_prompts_in_its_unconditional_passes(objective):
    model = tiny_text_dit(objective.heads, objective.time_inputs)
    seen: list[TextCondition] = []
    spy = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["cond"]), with_kwargs=True)
    out = objective(model, Batch(torch.randn(8, 2, 8, 8), embedded_prompts(8)))
    spy.remove()
    out.loss.backward()
    assert torch.isfinite(out.loss)
    # no prompt is dropped (label_dropout 0), so every null row is a guidance pass's unconditional row
    assert any(not cond.null.any() for cond in seen)  # the pass with gradients
    assert any(cond.null.any() for cond in seen)
    for cond in seen:
        if cond.null.any():  # the unconditional rows follow the conditional ones, or are a call of their own
            count = int(cond.null.sum())
            assert cond.null[-count:].all()


def test_prompts_are_drawn_in_chunks_each_with_its_own_rows():
    """generate_many splits prompts across chunks as it splits class labels: changing the prompts of
    the second chunk changes its samples and leaves the first chunk's alone."""
    from dumo.config import SampleConfig
    from dumo.sampling import generate_many

    model, prompts = tiny_text_dit(), embedded_prompts(4)
    other = TextCondition(prompts.tokens.clone(), prompts.mask)
    other.tokens[2:] = torch.randn_like(other.tokens[2:])
    with torch.no_grad():
        first, second = (
            generate_many(model, "dumo", (4, 2, 8, 8), 1, SampleConfig(), labels=cond, batch_size=2)
            for cond in (prompts, other)
        )
    assert first.shape == (4, 2, 8, 8) and torch.isfinite(first).all()
    assert torch.equal(first[:2], second[:2])
    assert (first[2:] - second[2:]).abs().amax() > 1e-4

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dumo.conditioning import TextCondition, pad_tokens
from dumo.errors import ConfigError
from dumo.models import ModelConfig, build_model, count_parameters
from dumo.models.text_dit import TEXT_DIT_SIZES, build_text_dit, parse_text_dit_name

TEXT_DIM, VOCAB = 12, 40


class TinyEncoder(nn.Module):
    """A stand-in trainable text encoder: forward(ids, mask) -> (tokens, mask, pooled)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(VOCAB, TEXT_DIM)
        self.mix = nn.Linear(TEXT_DIM, TEXT_DIM)

    def forward(self, ids, mask):
        tokens = self.mix(self.table(ids))
        weights = mask[..., None].float()
        return tokens, mask, (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)


def randomise_zeros(module, std=0.1):
    """Give the zero-initialised layers (gates, cross-attention outputs, heads) weights."""
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.abs().sum() == 0:
                parameter.normal_(0, std)


def tiny(text_encoder=None, time_inputs=1, randomise=True, heads=("v", "u")):
    torch.manual_seed(0)
    model = build_text_dit("TextDiT-XS/2", 8, 2, TEXT_DIM, heads, time_inputs, text_encoder=text_encoder)
    model.backbone.blocks = model.backbone.blocks[:2]
    if randomise:
        randomise_zeros(model)
    return model


def prompts(rows=4, length=6, null=None, pooled=False):
    """Embedding prompts with 1..length real tokens (row 0 has one)."""
    lengths = torch.arange(rows) % length + 1
    mask = torch.arange(length)[None] < lengths[:, None]
    null = None if null is None else torch.tensor(null)
    return TextCondition(
        torch.randn(rows, length, TEXT_DIM), mask, torch.randn(rows, TEXT_DIM) if pooled else None, null
    )


def images(rows=4):
    return torch.randn(rows, 2, 8, 8), torch.rand(rows)


@pytest.mark.parametrize("kind", ["embeddings", "embeddings+pooled", "token ids"])
def test_both_kinds_of_prompt_give_images(kind):
    encoder = TinyEncoder() if kind == "token ids" else None
    model = tiny(encoder)
    if kind == "token ids":
        cond = TextCondition(torch.randint(0, VOCAB, (4, 6)), prompts().mask)
    else:
        cond = prompts(pooled=kind.endswith("pooled"))
    x, t = images()
    out = model(x, t, cond=cond)
    assert out.v.shape == out.u.shape == x.shape and out.v.dtype == torch.float32
    features, vector = model.backbone(x, t, cond=cond)
    assert features.shape == (4, 16, 96) and vector.shape == (4, 96)


def test_padding_is_ignored_but_real_tokens_are_not():
    model, x, t, cond = tiny(), *images(), prompts()
    reference = model(x, t, cond=cond).v
    noise = torch.randn_like(cond.tokens)
    padded = TextCondition(torch.where(cond.mask[..., None], cond.tokens, noise), cond.mask)
    torch.testing.assert_close(model(x, t, cond=padded).v, reference, rtol=0, atol=1e-6)
    nan_padded = TextCondition(torch.where(cond.mask[..., None], cond.tokens, float("nan")), cond.mask)
    assert torch.isfinite(model(x, t, cond=nan_padded).v).all()
    longer = pad_tokens(cond, cond.tokens.shape[1] + 5)  # five more padded positions per row
    torch.testing.assert_close(model(x, t, cond=longer).v, reference, rtol=0, atol=1e-6)
    changed = TextCondition(cond.tokens + noise * cond.mask[..., None], cond.mask)
    assert (model(x, t, cond=changed).v - reference).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # every row moves


def test_null_rows_ignore_their_prompt_and_match_an_unconditional_batch():
    model, x, t = tiny(), *images()
    first, second = prompts(null=[True, False, True, False], pooled=True), prompts(pooled=True)
    second = second.with_null(first.null)
    out_first, out_second = model(x, t, cond=first), model(x, t, cond=second)
    for head in ("v", "u"):
        a, b = out_first.outputs[head], out_second.outputs[head]
        torch.testing.assert_close(a[first.null], b[first.null], rtol=0, atol=1e-6)
        assert (a[~first.null] - b[~first.null]).abs().max() > 1e-3  # real prompts do matter
    unconditional = model(x, t).v  # cond=None: every row null
    all_null = model(x, t, cond=prompts(length=3, null=[True] * 4)).v  # another prompt length
    torch.testing.assert_close(out_first.v[first.null], unconditional[first.null], rtol=0, atol=1e-6)
    torch.testing.assert_close(all_null, unconditional, rtol=0, atol=1e-6)


def test_a_prompt_without_real_tokens_is_finite():
    model, x, t, cond = tiny(), *images(), prompts()
    empty = TextCondition(cond.tokens, torch.zeros_like(cond.mask))
    assert torch.isfinite(model(x, t, cond=empty).v).all()


def test_heads_are_zero_and_blocks_are_the_identity_at_init():
    model, x, t, cond = tiny(randomise=False), *images(), prompts()
    out = model(x, t, cond=cond)
    assert out.v.abs().max() == 0 and out.u.abs().max() == 0
    features, _ = model.backbone(x, t, cond=cond)
    model.backbone.blocks = model.backbone.blocks[:0]
    without_blocks, _ = model.backbone(x, t, cond=cond)
    torch.testing.assert_close(features, without_blocks, rtol=0, atol=0)


def test_rows_do_not_depend_on_each_other():
    model, x, t = tiny(), *images()
    cond = prompts(null=[False, True, False, False])
    batched = model(x, t, cond=cond).u
    for row in range(4):
        alone = model(x[row : row + 1], t[row : row + 1], cond=cond.rows(slice(row, row + 1))).u
        torch.testing.assert_close(alone[0], batched[row], rtol=1e-5, atol=1e-6)


def test_training_reaches_the_text_projection_and_the_null_embeddings():
    encoder = TinyEncoder()
    model = tiny(encoder, randomise=False)
    randomise_zeros(model.heads)  # the blocks keep their zero cross-attention outputs and gates
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, t = images()
    cond = TextCondition(torch.randint(0, VOCAB, (4, 6)), prompts().mask, null=torch.tensor([True, False] * 2))
    for _ in range(2):  # the first step opens the zero-initialised gates and cross-attention outputs
        optimizer.zero_grad()
        out = model(x, t, cond=cond)
        ((out.v - x) ** 2 + (out.u - x) ** 2).mean().backward()
        optimizer.step()
    text = model.backbone.text
    for name, parameter in [
        ("projection", text.projection[0].weight),
        ("pooled projection", text.pooled_projection[0].weight),
        ("null token", text.null_token),
        ("null pooled", text.null_pooled),
        ("encoder", encoder.table.weight),
        ("cross-attention", model.backbone.blocks[0].cross_attn.key_value.weight),
    ]:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_building_keeps_the_text_encoders_weights():
    encoder = TinyEncoder()
    before = {name: value.clone() for name, value in encoder.state_dict().items()}
    model = tiny(encoder, randomise=False)
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert model.backbone.text.encoder is encoder


@pytest.mark.parametrize("time_inputs", [1, 2])
def test_jvp_in_time_matches_a_central_difference(time_inputs):
    model, x, t, cond = tiny(time_inputs=time_inputs), *images(), prompts(null=[False, True, False, False])
    t = 0.3 + 0.4 * t
    r = 0.5 * t if time_inputs == 2 else None

    def u_of(network, time):
        return network(x.to(time.dtype), time, r=None if r is None else r.to(time.dtype), cond=cond).u

    with sdpa_kernel([SDPBackend.MATH]):  # forward-mode AD needs the math kernel, as the objectives use
        _, exact = torch.func.jvp(lambda time: u_of(model, time), (t,), (torch.ones_like(t),))
    # The reference is limited by the sinusoidal time features, computed in fp32 even in an fp64 model:
    # its error is ~2e-4 at this epsilon (truncation below it, fp32 rounding above).
    reference, epsilon = model.double(), 1e-4
    t64 = t.double()
    difference = (u_of(reference, t64 + epsilon) - u_of(reference, t64 - epsilon)) / (2 * epsilon)
    error = ((exact.double() - difference).norm() / difference.norm()).item()
    print(f"jvp vs central difference: {error:.2e}")
    assert exact.dtype == torch.float32 and difference.norm() > 0 and error < 1e-3, error


def test_bf16_autocast_keeps_fp32_heads_close_to_fp32():
    model, x, t, cond = tiny(), *images(), prompts(null=[False, True, False, False])
    reference = model(x, t, cond=cond).v
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, cond=cond)
    assert out.v.dtype == torch.float32 and torch.isfinite(out.v).all()
    assert ((out.v - reference).norm() / reference.norm()).item() < 5e-2


def test_bad_prompts_are_refused_in_one_line():
    model, x, t = tiny(), *images()
    ids = TextCondition(torch.randint(0, VOCAB, (4, 6)), prompts().mask)
    with pytest.raises(ConfigError, match="token ids but this TextDiT has no text encoder"):
        model(x, t, cond=ids)
    wide = TextCondition(torch.randn(4, 6, TEXT_DIM + 1), prompts().mask)
    with pytest.raises(ConfigError, match="13 wide but this TextDiT was built for text_dim=12"):
        model(x, t, cond=wide)
    with pytest.raises(ConfigError, match="class labels need a DiT model"):
        model(x, t, cond=torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="3 prompts for a batch of 4"):
        model(x, t, cond=prompts(rows=3))
    with pytest.raises(ConfigError, match="not a TextDiT name"):
        build_text_dit("DiT-XS/2", 8, 2, TEXT_DIM)


@pytest.mark.parametrize("text_dim", [4096, 2304])  # T5-XXL, Gemma-2-2B
@pytest.mark.parametrize("size", ["XS", "S", "B", "XL"])
def test_sizes_build_on_the_meta_device_as_dit_plus_the_text_parts(size, text_dim):
    name = f"TextDiT-{size}/2"
    assert parse_text_dit_name(name) == (TEXT_DIT_SIZES[size], 2)
    with torch.device("meta"):
        model = build_text_dit(name, 32, 4, text_dim)
        dit = build_model(ModelConfig(name=f"DiT-{size}/2"), (4, 32, 32), ("v", "u"))
    assert all(p.is_meta for p in model.parameters())
    # Everything outside the text conditioner and the cross-attention is DiT's, parameter for parameter.
    text_parts = count_parameters(model.backbone.text) + sum(
        count_parameters(block.cross_attn) for block in model.backbone.blocks
    )
    assert count_parameters(model) - text_parts == count_parameters(dit)

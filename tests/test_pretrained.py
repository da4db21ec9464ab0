"""Official DiT / SiT weights in dumo, checked against a reference forward written here from the
published formulas (patchify + MAE sin-cos table, sinusoidal time features of the raw time, label
table with a null row, adaLN-zero blocks, final layer, unpatchify). The state dicts are random
tensors with the official names and shapes, made by this file: nothing is downloaded."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dumo.config import config_from_dict
from dumo.errors import CheckpointError, ConfigError
from dumo.models import ModelConfig, build_model
from dumo.models.dit import sincos_position_embedding
from dumo.models.embeddings import TimestepEmbedding
from dumo.models.pretrained import convert_official, fold_time_reversal, read_official_checkpoint
from dumo.runs.checkpoints import load_weights
from dumo.runs.importing import import_official_weights

DIM, DEPTH, HEADS, PATCH, CHANNELS, GRID, CLASSES = 32, 2, 2, 2, 4, 4, 10


def mae_table(dim, grid):
    """The official 2-D sin-cos table, from its definition: for token (row i, column j), with
    omega_k = 10000^(-k / (dim / 4)), [sin(j omega), cos(j omega), sin(i omega), cos(i omega)]."""
    omega = 10000.0 ** (-np.arange(dim // 4) / (dim / 4))
    rows = []
    for i in range(grid):
        for j in range(grid):
            rows.append(np.concatenate([np.sin(j * omega), np.cos(j * omega), np.sin(i * omega), np.cos(i * omega)]))
    return torch.tensor(np.stack(rows), dtype=torch.float32)


def dumo_table(dim, grid):
    """dumo's own (rows_first) table, from its definition: the row's features before the column's."""
    omega = 10000.0 ** (-np.arange(dim // 4) / (dim / 4))
    rows = [
        np.concatenate([np.sin(i * omega), np.cos(i * omega), np.sin(j * omega), np.cos(j * omega)])
        for i in range(grid)
        for j in range(grid)
    ]
    return torch.tensor(np.stack(rows), dtype=torch.float32)


def official_state(
    dim=DIM, depth=DEPTH, channels=CHANNELS, patch=PATCH, grid=GRID, classes=CLASSES, learn_sigma=True, seed=0
):
    """Random weights under the official names and shapes (no zero layers, so every path matters)."""
    g = torch.Generator().manual_seed(seed)

    def linear(prefix, out_features, in_features, gain=1.0):
        return {
            f"{prefix}.weight": gain * torch.randn(out_features, in_features, generator=g) / math.sqrt(in_features),
            f"{prefix}.bias": 0.1 * torch.randn(out_features, generator=g),
        }

    out_channels = 2 * channels if learn_sigma else channels
    state = {
        "x_embedder.proj.weight": torch.randn(dim, channels, patch, patch, generator=g) / patch,
        "x_embedder.proj.bias": 0.1 * torch.randn(dim, generator=g),
        "pos_embed": mae_table(dim, grid)[None],
        "y_embedder.embedding_table.weight": torch.randn(classes + 1, dim, generator=g),
        **linear("t_embedder.mlp.0", dim, 256, gain=4.0),
        **linear("t_embedder.mlp.2", dim, dim),
        **linear("final_layer.adaLN_modulation.1", 2 * dim, dim, gain=0.3),
        **linear("final_layer.linear", patch * patch * out_channels, dim),
    }
    for i in range(depth):
        state.update(linear(f"blocks.{i}.attn.qkv", 3 * dim, dim))
        state.update(linear(f"blocks.{i}.attn.proj", dim, dim))
        state.update(linear(f"blocks.{i}.mlp.fc1", 4 * dim, dim))
        state.update(linear(f"blocks.{i}.mlp.fc2", dim, 4 * dim))
        state.update(linear(f"blocks.{i}.adaLN_modulation.1", 6 * dim, dim, gain=0.3))
    return state


def reference_forward(state, x, raw_time, labels, num_heads=HEADS):
    """The official network's output (first C channels) in fp64, given the raw time it was trained on.

    The time features are computed in fp32 as the official code does, then widened.
    """
    s = {k: v.double() for k, v in state.items()}

    def linear(h, name):
        return F.linear(h, s[f"{name}.weight"], s[f"{name}.bias"])

    def norm(h):
        return F.layer_norm(h, h.shape[-1:], eps=1e-6)

    patch = s["x_embedder.proj.weight"].shape[-1]
    tokens = F.conv2d(x, s["x_embedder.proj.weight"], s["x_embedder.proj.bias"], stride=patch)
    tokens = tokens.flatten(2).transpose(1, 2) + s["pos_embed"]
    n, count, dim = tokens.shape
    half = 128
    frequencies = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    angles = raw_time.float()[:, None] * frequencies[None]
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).double()
    cond = linear(F.silu(linear(features, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    cond = cond + s["y_embedder.embedding_table.weight"][labels]
    head_dim = dim // num_heads
    i = 0
    while f"blocks.{i}.attn.qkv.weight" in s:
        b = f"blocks.{i}"
        shift1, scale1, gate1, shift2, scale2, gate2 = linear(F.silu(cond), f"{b}.adaLN_modulation.1")[:, None].chunk(
            6, dim=-1
        )
        h = norm(tokens) * (1 + scale1) + shift1
        q, k, v = linear(h, f"{b}.attn.qkv").reshape(n, count, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(head_dim), dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(n, count, dim)
        tokens = tokens + gate1 * linear(attended, f"{b}.attn.proj")
        h = norm(tokens) * (1 + scale2) + shift2
        tokens = tokens + gate2 * linear(F.gelu(linear(h, f"{b}.mlp.fc1"), approximate="tanh"), f"{b}.mlp.fc2")
        i += 1
    shift, scale = linear(F.silu(cond), "final_layer.adaLN_modulation.1")[:, None].chunk(2, dim=-1)
    patches = linear(norm(tokens) * (1 + scale) + shift, "final_layer.linear")
    grid, channels = math.isqrt(count), x.shape[1]
    out_channels = patches.shape[-1] // (patch * patch)
    image = patches.reshape(n, grid, grid, patch, patch, out_channels).permute(0, 5, 1, 3, 2, 4)
    return image.reshape(n, out_channels, grid * patch, grid * patch)[:, :channels]


def reference_forward_fp32(state, x, raw_time, labels, num_heads=HEADS):
    """The official network's output (first C channels) in fp32, step by step as its models.py runs
    it: timm's PatchEmbed (conv, flatten, transpose) plus the table, TimestepEmbedder's fp32
    features of the raw time, t + y, blocks with timm's Attention (fused scaled_dot_product_attention)
    and Mlp (GELU tanh), adaLN chunks of dim 1 unsqueezed, the final layer and unpatchify's einsum."""
    s = {k: v.float() for k, v in state.items()}

    def linear(h, name):
        return F.linear(h, s[f"{name}.weight"], s[f"{name}.bias"])

    def norm(h):
        return F.layer_norm(h, h.shape[-1:], eps=1e-6)

    def modulate(h, shift, scale):
        return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    patch = s["x_embedder.proj.weight"].shape[-1]
    tokens = F.conv2d(x, s["x_embedder.proj.weight"], s["x_embedder.proj.bias"], stride=patch)
    tokens = tokens.flatten(2).transpose(1, 2) + s["pos_embed"]
    n, count, dim = tokens.shape
    half = 128
    frequencies = torch.exp(-math.log(10000) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    angles = raw_time[:, None].float() * frequencies[None]
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    cond = linear(F.silu(linear(features, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    cond = cond + s["y_embedder.embedding_table.weight"][labels]
    head_dim = dim // num_heads
    i = 0
    while f"blocks.{i}.attn.qkv.weight" in s:
        b = f"blocks.{i}"
        shift1, scale1, gate1, shift2, scale2, gate2 = linear(F.silu(cond), f"{b}.adaLN_modulation.1").chunk(6, dim=1)
        qkv = linear(modulate(norm(tokens), shift1, scale1), f"{b}.attn.qkv")
        q, k, v = qkv.reshape(n, count, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, count, dim)
        tokens = tokens + gate1.unsqueeze(1) * linear(attended, f"{b}.attn.proj")
        hidden = F.gelu(linear(modulate(norm(tokens), shift2, scale2), f"{b}.mlp.fc1"), approximate="tanh")
        tokens = tokens + gate2.unsqueeze(1) * linear(hidden, f"{b}.mlp.fc2")
        i += 1
    shift, scale = linear(F.silu(cond), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    patches = linear(modulate(norm(tokens), shift, scale), "final_layer.linear")
    grid, channels = math.isqrt(count), x.shape[1]
    out_channels = patches.shape[-1] // (patch * patch)
    image = torch.einsum("nhwpqc->nchpwq", patches.reshape(n, grid, grid, patch, patch, out_channels))
    return image.reshape(n, out_channels, grid * patch, grid * patch)[:, :channels]


def dumo_model(imported, dtype=torch.float64):
    model = build_model(imported.config, imported.data_shape, ("v",), imported.num_classes)
    load_weights(model, imported.state, "test")
    return model.to(dtype).eval()


def inputs(n=6, channels=CHANNELS, size=GRID * PATCH, classes=CLASSES):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, channels, size, size, generator=g, dtype=torch.float64)
    t = torch.cat([torch.tensor([0.0, 1.0]), torch.rand(n - 2, generator=g)]).double()
    labels = torch.randint(0, classes + 1, (n,), generator=g)  # the null class included
    return x, t, labels


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_dit_weights_give_the_official_output_at_step_index_1000_t(learn_sigma):
    state = official_state(learn_sigma=learn_sigma)
    imported = convert_official("dit", state, num_heads=HEADS)
    assert imported.learn_sigma is learn_sigma
    assert imported.data_shape == (CHANNELS, 8, 8) and imported.num_classes == CLASSES
    config = imported.config
    assert (config.name, config.hidden_dim, config.depth, config.num_heads) == ("DiT-S/2", DIM, DEPTH, HEADS)
    assert (config.time_embedding_scale, config.position_order) == (1000.0, "columns_first")
    x, t, labels = inputs()
    out = dumo_model(imported)(x, t, cond=labels).v
    # dumo time t is DDPM step index 1000 t (the index computed in fp32, as the features are)
    expected = reference_forward(state, x, 1000.0 * t.float(), labels)
    assert out.abs().mean() > 0.1
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_sit_weights_give_minus_the_official_velocity_at_one_minus_t(learn_sigma):
    state = official_state(learn_sigma=learn_sigma, seed=1)
    imported = convert_official("sit", state, num_heads=HEADS)
    assert imported.config.time_embedding_scale == 1.0
    x, t, labels = inputs()
    out = dumo_model(imported)(x, t, cond=labels).v
    expected = -reference_forward(state, x, (1 - t).float(), labels)
    assert out.abs().mean() > 0.1
    # the folded time layer reads fp32 features of t instead of 1 - t: agreement to fp32 rounding
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_fp32_agreement_with_the_official_networks_dit_exact_sit_within_5e_6(learn_sigma):
    """In fp32, as run: DiT computes the official output bit for bit; SiT, whose time reversal is
    folded into a layer, agrees to fp32 rounding (measured 1.4e-6 on outputs of size ~0.9)."""
    x, t, labels = inputs()
    x, t = x.float(), t.float()
    dit = official_state(learn_sigma=learn_sigma)
    out = dumo_model(convert_official("dit", dit, num_heads=HEADS), torch.float32)(x, t, cond=labels).v
    expected = reference_forward_fp32(dit, x, 1000.0 * t, labels)
    assert out.abs().mean() > 0.1 and torch.equal(out, expected)
    sit = official_state(learn_sigma=learn_sigma, seed=1)
    out = dumo_model(convert_official("sit", sit, num_heads=HEADS), torch.float32)(x, t, cond=labels).v
    expected = -reference_forward_fp32(sit, x, 1 - t, labels)
    assert out.abs().mean() > 0.1 and (out - expected).abs().max().item() <= 5e-6
    # the fp32 reference is the fp64 one up to rounding: both restate the same network
    torch.testing.assert_close(
        expected.double(), -reference_forward(sit, x.double(), (1 - t), labels), atol=1e-5, rtol=0
    )


def test_unconditional_import_is_the_null_class():
    state = official_state(seed=2)
    imported = convert_official("sit", state, num_heads=HEADS, conditional=False)
    assert imported.num_classes == 0 and "backbone.conditioning.label.table.weight" not in imported.state
    x, t, _ = inputs()
    out = dumo_model(imported)(x, t).v
    expected = -reference_forward(state, x, (1 - t).float(), torch.full((len(x),), CLASSES))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("scale", "tolerance"), [(1.0, 1e-6), (100.0, 1e-4)])
def test_folding_the_time_reversal_into_the_first_layer(scale, tolerance):
    torch.manual_seed(0)
    embedding = TimestepEmbedding(16, scale=scale).double()
    folded = TimestepEmbedding(16, scale=scale).double()
    folded.load_state_dict(embedding.state_dict())
    with torch.no_grad():
        folded.mlp[0].weight.copy_(fold_time_reversal(embedding.mlp[0].weight, embedding.frequencies(), scale))
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(folded(t), embedding(1 - t), rtol=0, atol=tolerance)
    assert not torch.allclose(embedding(t), embedding(1 - t), atol=1e-2)


def test_position_orders_match_their_definitions():
    for dim, grid in ((32, 4), (384, 16)):
        torch.testing.assert_close(sincos_position_embedding(dim, grid, "columns_first"), mae_table(dim, grid))
        torch.testing.assert_close(sincos_position_embedding(dim, grid), dumo_table(dim, grid))
    assert not torch.allclose(mae_table(32, 4), dumo_table(32, 4))


def test_defaults_keep_the_old_network():
    config = ModelConfig(name="DiT-S/2", hidden_dim=32, depth=1, num_heads=2)
    assert (config.time_embedding_scale, config.position_order) == (100.0, "rows_first")
    model = build_model(config, (4, 8, 8), ("v", "u"), 10)
    torch.testing.assert_close(model.backbone.position[0], dumo_table(32, 4))
    time = model.backbone.conditioning.time
    t = torch.rand(5)
    frequencies = 10000.0 ** (-torch.arange(128, dtype=torch.float64) / 128)
    angles = 100.0 * t.double()[:, None] * frequencies
    torch.testing.assert_close(
        time.sinusoidal(t).double(), torch.cat([angles.cos(), angles.sin()], 1), atol=2e-5, rtol=0
    )
    # the key means the same in every network, MeanFlow's interval embedding included
    small_unet = {"channels": 32, "channel_mult": (1,), "num_res_blocks": 1, "attention_resolutions": ()}
    for name, shape, size in (
        ("mlp", (2,), {"hidden_dim": 32, "depth": 1}),
        ("unet", (1, 8, 8), small_unet),
        ("DiT-S/2", (1, 8, 8), {"hidden_dim": 32, "depth": 1, "num_heads": 2}),
    ):
        network = build_model(ModelConfig(name=name, time_embedding_scale=7.0, **size), shape, ("u",), 0, 2)
        assert network.backbone.conditioning.time.scale == network.backbone.conditioning.interval.scale == 7.0


def test_the_new_model_keys_are_validated():
    with pytest.raises(ConfigError, match="time_embedding_scale must be > 0"):
        config_from_dict({"model": {"time_embedding_scale": 0}})
    with pytest.raises(ConfigError, match="position_order' must be one of rows_first, columns_first"):
        config_from_dict({"model": {"name": "DiT-S/2", "position_order": "diagonal"}})
    with pytest.raises(ConfigError, match="position_order applies to DiT models only"):
        config_from_dict({"model": {"name": "mlp", "position_order": "columns_first"}})


def test_standard_width_gives_the_standard_name_and_heads():
    imported = convert_official("dit", official_state(dim=1152, depth=1, grid=16, classes=1000))
    config = imported.config
    assert (config.name, config.hidden_dim, config.depth, config.num_heads) == ("DiT-XL/2", None, 1, None)
    assert config.dit_size().num_heads == 16
    assert imported.data_shape == (4, 32, 32) and imported.num_classes == 1000


def edited(change):
    state = official_state()
    change(state)
    return state


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("blocks.1.mlp.fc2.bias"), "tensor blocks.1.mlp.fc2.bias is missing"),
        (
            lambda s: s.update({"blocks.0.attn.proj.weight": torch.zeros(DIM, DIM - 1)}),
            r"tensor blocks.0.attn.proj.weight has shape \(32, 31\); expected \(32, 32\)",
        ),
        (
            lambda s: s.update({"blocks.0.attn.q_norm.weight": torch.zeros(16)}),
            "unexpected tensor blocks.0.attn.q_norm",
        ),
        (
            lambda s: s.update({"final_layer.linear.weight": torch.zeros(20, DIM)}),
            "final_layer.linear.weight has shape",
        ),
        (lambda s: s.update({"pos_embed": torch.zeros(1, 16, DIM)}), "pos_embed is not the fixed sin-cos table"),
        (lambda s: s.update({"x_embedder.proj.weight": torch.zeros(DIM, 4, 8, 8)}), "patch size 8"),
    ],
)
def test_mismatches_name_the_first_offending_tensor(change, message):
    with pytest.raises(CheckpointError, match=message) as error:
        convert_official("dit", edited(change), num_heads=HEADS, source="ckpt.pt")
    assert "\n" not in str(error.value) and str(error.value).startswith("ckpt.pt")


def test_the_heads_of_a_non_standard_width_must_be_given():
    with pytest.raises(CheckpointError, match="--num-heads"):
        convert_official("sit", official_state())


def test_reading_pt_safetensors_and_training_checkpoints(tmp_path):
    import argparse

    from safetensors.torch import save_file

    state = official_state()
    torch.save(state, tmp_path / "plain.pt")
    save_file(state, str(tmp_path / "plain.safetensors"))
    ema = {k: v + 1 for k, v in state.items()}
    training = {"model": state, "ema": ema, "opt": {"state": {}}, "args": argparse.Namespace(model="SiT-XL/2")}
    torch.save(training, tmp_path / "training.pth")
    for name in ("plain.pt", "plain.safetensors"):
        loaded = read_official_checkpoint(tmp_path / name)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    loaded = read_official_checkpoint(tmp_path / "training.pth")
    assert all(torch.equal(loaded[k], ema[k]) for k in state)  # the EMA weights, as the official sample.py
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"must be a .pt, .pth or .safetensors file"):
        read_official_checkpoint(tmp_path / "weights.bin")


class RunsACommand:
    """Unpickling this would call os.system: the kind of file weights_only must refuse."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


def test_a_crafted_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    state = official_state()
    state["x_embedder.proj.bias"] = RunsACommand(f"touch {marker}")
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=True refused it") as error:
        read_official_checkpoint(tmp_path / "evil.pt")
    assert "\n" not in str(error.value) and "system" in str(error.value)
    assert not marker.exists()


def dumo_cli(*args):
    return subprocess.run([sys.executable, "-m", "dumo", *map(str, args)], capture_output=True, text=True)


def test_import_weights_writes_an_export_that_samples(tmp_path):
    from dumo.runs.loading import load_run

    # a tiny SiT for scikit-learn's digits (1x8x8, 10 classes): the config's data decides the shape
    state = official_state(channels=1, classes=10, seed=4)
    torch.save(state, tmp_path / "sit.pt")
    config = tmp_path / "fm.yaml"
    config.write_text(
        "data: {name: digits, conditional: true, batch_size: 16}\n"
        "model: {name: DiT-XL/2}\n"
        "objective: {name: fm}\n"
        "train: {steps: 10, progress: false}\n"
    )
    out = tmp_path / "imported"
    result = dumo_cli("import-weights", "sit", tmp_path / "sit.pt", "--config", config, "--out", out, "--num-heads", 2)
    assert result.returncode == 0, result.stderr
    assert "wrote a Flow Matching model (DiT-S/2, width 32, depth 2, 1x8x8 data, 10 classes)" in result.stdout
    assert "maps exactly" in result.stdout

    run = load_run(out)
    assert run.config.model.time_embedding_scale == 1.0 and run.config.model.position_order == "columns_first"
    x, t, labels = inputs(channels=1)
    out_v = run.model.double()(x, t, cond=labels).v
    torch.testing.assert_close(out_v, -reference_forward(state, x, (1 - t).float(), labels), rtol=1e-5, atol=1e-5)

    samples = tmp_path / "s.npz"
    result = dumo_cli("sample", out, "--nfe", 2, "-n", 4, "--out", samples)
    assert result.returncode == 0, result.stderr
    assert np.load(samples)["images"].shape == (4, 1, 8, 8)

    # a checkpoint for another resolution (like a 512 one for 256 latents): one line, exit status 2
    torch.save(official_state(channels=1, grid=8), tmp_path / "big.pt")
    big = tmp_path / "big.pt"
    result = dumo_cli("import-weights", "dit", big, "--config", config, "--out", tmp_path / "x", "--num-heads", 2)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"dumo: error: {tmp_path / 'big.pt'} is a network for 1x16x16 data; the config's data has shape 1x8x8"
    ]
    assert not (tmp_path / "x").exists()


def test_import_needs_a_flow_matching_config_and_an_empty_folder(tmp_path):
    torch.save(official_state(channels=1), tmp_path / "sit.pt")
    base = {"data": {"name": "digits", "conditional": True}, "objective": {"name": "fm"}}
    with pytest.raises(ConfigError, match="needs objective.name fm, not dumo"):
        import_official_weights("sit", tmp_path / "sit.pt", config_from_dict({**base, "objective": {}}), tmp_path / "a")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").touch()
    with pytest.raises(Exception, match="exists and is not empty"):
        import_official_weights("sit", tmp_path / "sit.pt", config_from_dict(base), tmp_path / "full", num_heads=2)
    with pytest.raises(CheckpointError, match="for 10 classes; the config's data has 3"):
        other = config_from_dict(
            {**base, "data": {"name": "latents", "latent_shape": [1, 8, 8], "num_classes": 3, "conditional": True}}
        )
        import_official_weights("sit", tmp_path / "sit.pt", other, tmp_path / "b", num_heads=2, autoencoder="vae")
    # an unconditional config takes the null class's weights
    unconditional = config_from_dict({**base, "data": {"name": "digits", "conditional": False}})
    imported = import_official_weights("sit", tmp_path / "sit.pt", unconditional, tmp_path / "c", num_heads=2)
    assert imported.num_classes == 0 and (tmp_path / "c" / "model.safetensors").is_file()


def save_training_checkpoint(path, state, **args):
    """A checkpoint as the official train.py writes one: model, ema, opt and its argparse args."""
    import argparse

    torch.save({"model": state, "ema": state, "opt": {}, "args": argparse.Namespace(**args)}, path)


@pytest.mark.parametrize(
    ("kind", "args", "message"),
    [
        ("sit", {"model": "SiT-S/2", "path_type": "GVP", "prediction": "velocity"}, "trained with path_type GVP"),
        ("sit", {"model": "SiT-S/2", "path_type": "VP", "prediction": "velocity"}, "trained with path_type VP"),
        ("sit", {"model": "SiT-S/2", "path_type": "Linear", "prediction": "noise"}, "trained with prediction noise"),
        ("sit", {"model": "SiT-S/2", "path_type": "Linear", "prediction": "score"}, "trained with prediction score"),
        ("dit", {"model": "SiT-S/2", "path_type": "Linear", "prediction": "velocity"}, "import it as 'sit'"),
        ("sit", {"model": "DiT-S/2", "vae": "ema"}, "import it as 'dit'"),
    ],
)
def test_a_checkpoint_whose_args_say_otherwise_is_refused_by_name(tmp_path, kind, args, message):
    path = tmp_path / "checkpoint.pt"
    save_training_checkpoint(path, official_state(channels=1), **args)
    digits = config_from_dict({"data": {"name": "digits", "conditional": True}, "objective": {"name": "fm"}})
    with pytest.raises(CheckpointError, match=message) as error:
        import_official_weights(kind, path, digits, tmp_path / "out", num_heads=HEADS)
    assert "\n" not in str(error.value) and str(error.value).startswith(str(path))
    assert not (tmp_path / "out").exists()


def test_a_linear_velocity_sit_training_checkpoint_imports(tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = official_state(channels=1)
    save_training_checkpoint(path, state, model="SiT-S/2", path_type="Linear", prediction="velocity", loss_weight=None)
    digits = config_from_dict({"data": {"name": "digits", "conditional": True}, "objective": {"name": "fm"}})
    imported = import_official_weights("sit", path, digits, tmp_path / "out", num_heads=HEADS)
    assert imported.written == "a Flow Matching model" and (tmp_path / "out" / "model.safetensors").is_file()


def test_an_imported_dit_latent_model_samples_with_nothing_but_itself(tmp_path, capsys):
    """A tiny random DiT for 4x8x8 latents of 10 classes, imported with a (tiny, random) SD-VAE: the
    folder records shape, classes, the official latent scale and the autoencoder, so 'dumo sample'
    decodes images with no latent file anywhere."""
    pytest.importorskip("diffusers")
    from helpers.autoencoders import tiny_vae

    from dumo.cli import main
    from dumo.runs.loading import load_run

    vae = tmp_path / "sd-vae"
    tiny_vae().save_pretrained(str(vae))
    torch.save(official_state(channels=4, grid=4, classes=10, seed=5), tmp_path / "dit.pt")
    config = tmp_path / "fm.yaml"
    config.write_text(
        "data: {name: latents, path: no/such/latents, latent_shape: [4, 8, 8], num_classes: 10, conditional: true}\n"
        "model: {name: DiT-XL/2}\n"
        "objective: {name: fm}\n"
    )
    out = tmp_path / "imported"
    command = ["import-weights", "dit", str(tmp_path / "dit.pt"), "--config", str(config), "--num-heads", "2"]
    assert main([*command, "--out", str(out), "--autoencoder", str(vae)]) == 0
    printed = capsys.readouterr().out
    assert "wrote a dumo model whose v-head is DiT's noise (epsilon) predictor, not a velocity" in printed
    assert "Flow Matching model" not in printed
    assert f"samples decode with stabilityai/sd-vae-ft-ema from {vae} (latents / 0.18215)" in printed

    run = load_run(out)  # no data read: the weights record what sampling needs
    assert run.space.shape == (4, 8, 8) and run.num_classes == 10
    assert run.space.autoencoder["scaling_factor"] == 0.18215 and run.space.autoencoder["path"] == str(vae)
    samples = tmp_path / "s.npz"
    capsys.readouterr()
    assert main(["sample", str(out), "--nfe", "2", "-n", "3", "--out", str(samples)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "noise (epsilon) predictor in its v-head, not a velocity" in warnings[0], warnings
    images = np.load(samples)["images"]
    assert images.shape == (3, 3, 16, 16) and np.isfinite(images).all()

    # no autoencoder to record: one line, exit status 2, nothing written
    capsys.readouterr()
    assert main([*command, "--out", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "--autoencoder DIR" in error and not (tmp_path / "x").exists()

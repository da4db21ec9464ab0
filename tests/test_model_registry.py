"""The model registry: the one place that knows what each model.name is."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dumo.config import Config
from dumo.errors import ConfigError
from dumo.models import MODEL_NAMES, ModelConfig, describe, describe_model, model_entry
from dumo.models.dit import DIT_SIZES
from dumo.models.text_dit import TEXT_DIT_SIZES
from dumo.training.checks import check_batch_fits

SRC = Path(__file__).resolve().parents[1] / "src" / "dumo"
# Comparing model names, or naming a network, is the registry's business (dumo/models)
NAME_TESTS = re.compile(
    r"""model\.name\s*(==|!=|\bin\b|\.startswith|\.rsplit|\.split)|["'](mlp|unet)["']|["'](Text)?DiT-"""
)


def test_no_module_outside_models_compares_model_names():
    offenders = [
        f"{path.relative_to(SRC)}:{number}: {line.strip()}"
        for path in sorted(SRC.rglob("*.py"))
        if "models" not in path.relative_to(SRC).parts
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if NAME_TESTS.search(line)
    ]
    assert offenders == []


@pytest.mark.parametrize(
    ("name", "family", "width", "depth", "heads", "patch"),
    [
        ("DiT-XL/2", "dit", 1152, 28, 16, 2),
        ("DiT-S/4", "dit", 384, 12, 6, 4),
        ("DiT-XS/1", "dit", 96, 4, 4, 1),
        ("TextDiT-B/2", "text_dit", 768, 12, 12, 2),
        ("mlp", "mlp", 256, 4, None, None),
        ("unet", "unet", None, None, None, None),
    ],
)
def test_registry_entries_give_family_size_and_patch(name, family, width, depth, heads, patch):
    entry = model_entry(name)
    assert (entry.family, entry.hidden_dim, entry.depth, entry.num_heads, entry.patch) == (
        family,
        width,
        depth,
        heads,
        patch,
    )


def test_registry_matches_the_size_tables_and_conditions():
    for size_name, size in DIT_SIZES.items():
        entry = model_entry(f"DiT-{size_name}/2")
        assert (entry.hidden_dim, entry.depth, entry.num_heads) == (size.hidden_dim, size.depth, size.num_heads)
        assert entry.head_blocks and "class" in entry.conditions
    for size_name, size in TEXT_DIT_SIZES.items():
        entry = model_entry(f"TextDiT-{size_name}/4")
        assert (entry.hidden_dim, entry.depth, entry.num_heads, entry.patch) == (
            size.hidden_dim,
            size.depth,
            size.num_heads,
            4,
        )
        assert "text" in entry.conditions and "class" not in entry.conditions
        assert entry.buildable and entry.name in MODEL_NAMES  # build_model builds it, given a text encoder
    assert not model_entry("mlp").head_blocks and model_entry("mlp").data == "vectors"
    assert model_entry("unet").data == "images"


def test_unknown_name_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="model.name must be"):
        model_entry("DiT-XXL/2")


def test_unused_keys_follow_what_each_network_reads():
    assert "channels" in model_entry("DiT-B/2").unused_keys and "num_heads" not in model_entry("DiT-B/2").unused_keys
    assert {"hidden_dim", "depth", "num_heads"} <= set(model_entry("unet").unused_keys)
    assert "channels" not in model_entry("unet").unused_keys
    assert {"channels", "num_heads", "position_order"} <= set(model_entry("mlp").unused_keys)
    assert "hidden_dim" not in model_entry("mlp").unused_keys
    written = Config(model=ModelConfig(name="unet")).to_dict()["model"]
    assert "channels" in written and "hidden_dim" not in written


def test_config_overrides_give_the_actual_size():
    config = ModelConfig(name="DiT-S/2", hidden_dim=96, depth=4)
    network = config.network()
    assert (network.hidden_dim, network.depth, network.num_heads, network.patch) == (96, 4, 6, 2)
    assert "custom size (width 96, depth 4" in describe_model(config)
    assert describe_model(ModelConfig(name="DiT-S/2")) == "DiT-S/2"
    assert ModelConfig(name="unet", hidden_dim=None).network() == model_entry("unet")
    assert "patch 2" in describe("DiT-S/2") and "width 384" in describe("DiT-S/2")


def test_batch_check_counts_dit_activations_from_the_registry(monkeypatch):
    monkeypatch.setattr("dumo.training.checks.physical_memory", lambda: 10**8)
    config = Config(model=ModelConfig(name="DiT-XS/2"))
    config.data.batch_size = 8
    check_batch_fits(config, (4, 8, 8))
    # the data's tensors take 33 MB; the activations of 16 tokens x 96 wide x 4 blocks add 196 MB
    config.data.batch_size = 2000
    with pytest.raises(ConfigError, match="data.batch_size"):
        check_batch_fits(config, (4, 8, 8))

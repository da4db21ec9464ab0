"""The head, sampler and guidance a caller asks for are chosen and checked in one place
(dumo.sampling), for the command line and the Python API alike."""

from pathlib import Path

import pytest
import torch
from conftest import TINY_MOONS, small_model

from dumo.cli import main
from dumo.config import SampleConfig, load_config
from dumo.errors import SamplingError
from dumo.network import build_network
from dumo.runs.loading import load
from dumo.sampling import choose_sampling, head_draws
from dumo.training import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def network(objective: str):
    config = load_config(CONFIGS / "toy" / f"moons-{objective}.yaml", list(TINY_MOONS))
    return build_network(config, (2,))


def test_choose_sampling_sets_the_head_and_guidance_and_refuses_what_the_model_lacks():
    model = small_model(num_classes=3)
    chosen = choose_sampling(SampleConfig(), model, conditional=True, head="v", guidance=2.0)
    assert (chosen.head, chosen.guidance_scale) == ("v", 2.0)
    with pytest.raises(SamplingError, match=r"^--head w: this model has no such head \(its heads: v, u\)$"):
        choose_sampling(SampleConfig(), model, True, head="w", head_option="--head")
    with pytest.raises(SamplingError, match=r"^guidance needs a conditional model \(class labels or prompts\)$"):
        choose_sampling(SampleConfig(), model, conditional=False, guidance=2.0)
    assert choose_sampling(SampleConfig(), model, conditional=False, guidance=1.0).guidance_scale == 1.0


def test_head_draws_show_every_head_with_its_own_sampler():
    dumo = network("dumo")
    assert [(d.head, d.method, d.label) for d in head_draws(dumo, "dumo")] == [
        ("u", "flow_map", "u-head"),
        ("v", "euler", "v-head Euler"),
    ]
    assert [(d.head, d.label) for d in head_draws(dumo, "dumo", method="heun")] == [("v", "v-head heun")]
    assert [(d.head, d.method) for d in head_draws(dumo, "dumo", head="v")] == [("v", "euler")]
    with pytest.raises(SamplingError, match="does not fit"):
        head_draws(network("fm"), "fm", method="flow_map")


def test_the_python_api_and_the_cli_refuse_guidance_alike(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(load_config(CONFIGS / "toy" / "moons-dumo.yaml", [*TINY_MOONS, "train.steps=1"]), run).run()
    with pytest.raises(SamplingError, match=r"^guidance needs a conditional model \(class labels or prompts\)$"):
        load(run).generate(4, guidance=2.0)
    assert main(["sample", str(run), "-n", "4", "--nfe", "1", "--guidance", "2", "--out", str(tmp_path / "x.npy")]) == 2
    expected = "dumo: error: --guidance needs a conditional model (class labels or prompts)"
    assert capsys.readouterr().err.strip() == expected
    assert torch.isfinite(load(run).generate(4, guidance=1.0)).all()

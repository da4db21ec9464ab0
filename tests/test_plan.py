"""dumo plan: FLOPs, throughput, memory, days and GPU-hours of a configured run, on the CPU in seconds."""

import time
from pathlib import Path

import pytest

from dumo import plan as plan_module
from dumo.cli import main
from dumo.config import config_from_dict
from dumo.errors import ConfigError
from dumo.plan import IMAGENET_TRAIN, make_plan
from dumo.training import throughput
from dumo.training.throughput import count_step_cost


def small_config(**train):
    return config_from_dict(
        {
            "data": {"name": "digits", "conditional": True, "batch_size": 64},
            "model": {"name": "DiT-S/2", "hidden_dim": 32, "depth": 2, "num_heads": 2},
            "objective": {"name": "dumo", "zeta": 0.5},
            "train": {"steps": 5000, "precision": "bf16", **train},
        }
    )


def test_plan_numbers_are_consistent():
    config = small_config()
    plan = make_plan(config, gpus=4, gpu="h100")
    peak = 989.4e12
    cost = count_step_cost(config, (1, 8, 8), 10)  # the training log's counter
    assert plan.cost.flops_per_image == cost.flops_per_image
    assumed = throughput.throughput_table()["assumed_mfu"]
    assert plan.images_per_sec == pytest.approx(4 * peak * assumed / cost.flops_per_image)  # the assumed MFU
    assert plan.mfu == pytest.approx(assumed)
    assert plan.step_seconds == pytest.approx(64 / plan.images_per_sec)
    assert plan.gpu_hours == pytest.approx(5000 * plan.step_seconds * 4 / 3600)
    assert plan.dataset_size == 1797 and plan.epochs == pytest.approx(5000 * 64 / 1797)
    assert plan.epochs_per_day == pytest.approx(plan.images_per_sec * 86400 / 1797)
    params = plan.cost.parameters
    ddp, fsdp = plan.memory["ddp"].parts, plan.memory["fsdp"].parts
    assert ddp["weights (fp32)"] == 4 * params and fsdp["weights (fp32)"] == params  # sharded over 4
    assert ddp["Adam moments (2 x fp32)"] == 8 * params
    # autocast casts the weights of the matrix products (not embeddings, norms or biases of other layers)
    assert 0.8 * 2 * params < ddp["bf16 weight copies (autocast)"] <= 2 * params
    assert plan.micro_batch == 16 and ddp["activations (16 images, rough)"] > 0
    assert plan.memory["fsdp"].total < plan.memory["ddp"].total

    fp32 = make_plan(small_config(precision="fp32"), gpus=4, gpu="h100", mfu=0.5)
    assert fp32.precision == "fp32" and fp32.mfu == pytest.approx(0.5)
    assert "bf16 weight copies (autocast)" not in fp32.memory["ddp"].parts  # fp32 saves the weights themselves


def test_measured_throughput_is_preferred(monkeypatch):
    table = dict(throughput.throughput_table())
    entry = {"gpu": "a100", "model": "DiT-XL/2", "objective": "dumo", "derivative": "finite_difference"}
    entry |= {"guided": True, "precision": "bf16", "compile": False, "batch": 64, "images_per_sec": 100.0}
    monkeypatch.setattr(plan_module, "throughput_table", lambda: {**table, "measured": [entry]})
    config = small_config()
    config.model.name, config.model.hidden_dim, config.model.depth, config.model.num_heads = (
        "DiT-XL/2",
        None,
        None,
        None,
    )
    plan = make_plan(config, gpus=8, gpu="a100")
    assert plan.images_per_sec == 800.0 and "measured 100 images/s" in plan.throughput_source
    assert make_plan(config, gpus=8, gpu="h100").images_per_sec != 800.0  # another GPU kind: not that entry


def test_plan_of_the_imagenet_config_on_the_cpu(capsys):
    started = time.perf_counter()
    assert main(["plan", "configs/imagenet256/dumo-xl2.yaml", "--gpus", "8", "--gpu", "h100"]) == 0
    elapsed = time.perf_counter() - started
    out = capsys.readouterr().out
    assert "DiT-XL/2, 677,491,232 parameters" in out and f"{IMAGENET_TRAIN:,} images" in out
    assert "TFLOP per image per training step" in out and "GPU-hours" in out and "432.0 epochs in all" in out
    assert elapsed < 60  # seconds on an idle CPU; generous for a shared test machine


def test_plan_errors_are_one_line(capsys):
    assert main(["plan", "configs/toy/moons-dumo.yaml", "--gpu", "tpu"]) == 2
    assert "unknown GPU kind 'tpu'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--mfu"):
        make_plan(small_config(), 1, "h100", mfu=2.0)


def test_generated_data_has_no_epochs(capsys):
    assert main(["plan", "configs/toy/moons-dumo.yaml"]) == 0
    out = capsys.readouterr().out
    assert "generated data: no epochs" in out and "GPU-hours" in out


def test_the_epoch_size_comes_from_the_config_not_its_file_name(tmp_path, capsys):
    import yaml

    raw = yaml.safe_load(Path("configs/imagenet256/dumo-xl2.yaml").read_text())
    assert raw["data"]["train_images"] == IMAGENET_TRAIN
    renamed = tmp_path / "latents-run.yaml"  # no "imagenet" in its path: the data key says it
    renamed.write_text(yaml.safe_dump(raw))
    assert main(["plan", str(renamed), "--gpus", "8"]) == 0
    assert f"{IMAGENET_TRAIN:,} images" in capsys.readouterr().out
    del raw["data"]["train_images"]
    unknown = tmp_path / "imagenet-without-size.yaml"  # the name alone no longer counts
    unknown.write_text(yaml.safe_dump(raw))
    assert main(["plan", str(unknown), "--gpus", "8"]) == 0
    assert "unknown: give --dataset-size or data.train_images" in capsys.readouterr().out

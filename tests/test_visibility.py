"""Watching a long run: throughput columns (images/s, step time, memory, MFU), counted FLOPs, sample
pictures of latent runs, EMA snapshots that outlive checkpoint rotation, and their scores."""

import csv
import sys

import pytest
import torch
from conftest import MOONS_CONFIG, TINY_MOONS
from helpers.autoencoders import tiny_vae

from dumo.cli import main
from dumo.config import config_from_dict, load_config
from dumo.files import MODEL_FORMAT, load_checkpoint
from dumo.objectives import objective_class
from dumo.runs.layout import list_checkpoints, list_snapshots
from dumo.training import Trainer
from dumo.training import throughput as throughput_module
from dumo.training.throughput import ThroughputMeter, count_step_cost, flop_counter, gpu_kind

TINY = [*TINY_MOONS, "train.steps=4", "train.checkpoint_every=0", "train.log_every=2", "train.device=cpu"]


def read_rows(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_log_has_throughput_columns_read_only_at_log_steps(tmp_path, monkeypatch):
    calls = []
    original = throughput_module.peak_rss_bytes
    monkeypatch.setattr(throughput_module, "peak_rss_bytes", lambda: calls.append(1) or original())
    Trainer(load_config(MOONS_CONFIG, TINY), tmp_path / "run").run()
    rows = read_rows(tmp_path / "run" / "train_log.csv")
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert len(calls) == 2  # memory is read once per logged row, not once per step
    for row in rows:
        rate = float(row["steps_per_sec"])
        assert float(row["images_per_sec"]) == pytest.approx(32 * rate, rel=1e-9)  # data.batch_size 32
        assert float(row["step_seconds"]) == pytest.approx(1 / rate, rel=1e-9)
        assert 0.01 < float(row["peak_rss_gib"]) < 1000
        assert float(row["tflops_per_gpu"]) > 0
        assert row["mfu"] == ""  # a CPU has no peak figure: left empty, not invented


def test_meter_arithmetic_and_device_table():
    meter = ThroughputMeter(1e12, batch_size=512, world_size=8, device=torch.device("cpu"), peak=1e15)
    row = meter.measure(steps=10, seconds=5.0)
    assert row["step_seconds"] == 0.5 and row["images_per_sec"] == 1024
    assert row["tflops_per_gpu"] == pytest.approx(128) and row["mfu"] == pytest.approx(0.128)
    assert ThroughputMeter(1e12, 512, 8, torch.device("cpu"), None).measure(10, 5.0)["mfu"] is None
    assert gpu_kind("NVIDIA H100 80GB HBM3") == "h100" and gpu_kind("NVIDIA H100 PCIe") == "h100-pcie"
    assert gpu_kind("NVIDIA H200") == "h200" and gpu_kind("NVIDIA A100-SXM4-80GB") == "a100"
    assert gpu_kind("NVIDIA H200 NVL") is None and gpu_kind("Tesla T4") is None


def small_dit(objective: dict, precision: str = "fp32"):
    return config_from_dict(
        {
            "data": {"name": "random_latents", "latent_shape": [4, 8, 8], "num_classes": 10, "conditional": True},
            "model": {"name": "DiT-S/2", "hidden_dim": 32, "depth": 2, "num_heads": 2},
            "objective": objective,
            "train": {"precision": precision},
        }
    )


def forward_flops(config) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dumo.models import build_model

    objective = objective_class(config.objective.name)
    with FakeTensorMode():
        model = build_model(config.model, (4, 8, 8), objective.heads, 10, objective.time_inputs)
        counter = flop_counter()
        with counter, torch.no_grad():
            model(torch.zeros(1, 4, 8, 8), torch.full((1,), 0.5), cond=torch.zeros(1, dtype=torch.long))
    return counter.get_total_flops()


def test_step_flops_count_every_pass_of_the_objective():
    state = torch.get_rng_state()
    guided = count_step_cost(small_dit({"name": "dumo", "zeta": 0.5}), (4, 8, 8), 10).flops_per_image
    plain = count_step_cost(small_dit({"name": "dumo", "zeta": 0.0}), (4, 8, 8), 10).flops_per_image
    fm_config = small_dit({"name": "fm"})
    fm = count_step_cost(fm_config, (4, 8, 8), 10).flops_per_image
    assert torch.equal(state, torch.get_rng_state())  # counting draws nothing from the run's stream
    one_pass = forward_flops(small_dit({"name": "dumo"}))
    assert guided - plain == pytest.approx(one_pass, rel=1e-9)  # guidance adds one no-grad forward pass
    # DuMo without guidance: forward + backward (about 3 passes) + the two finite-difference passes
    assert plain == pytest.approx(3 * one_pass + 2 * one_pass, rel=0.05)
    assert fm == pytest.approx(3 * forward_flops(fm_config), rel=0.05)  # forward + backward only
    bf16 = count_step_cost(small_dit({"name": "dumo", "zeta": 0.5}, "bf16"), (4, 8, 8), 10).flops_per_image
    assert bf16 == guided


def test_snapshots_survive_rotation_are_fp16_and_load(tmp_path):
    import dumo

    run = tmp_path / "run"
    overrides = [*TINY, "train.checkpoint_every=1", "train.keep_checkpoints=1", "train.snapshot_steps=[2,4]"]
    Trainer(load_config(MOONS_CONFIG, [*overrides, "train.snapshot_every=3"]), run).run()
    assert [step for step, _ in list_snapshots(run)] == [2, 3, 4]
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004.safetensors"]
    tensors, metadata = load_checkpoint(list_snapshots(run)[-1][1], kind=MODEL_FORMAT)
    assert metadata["step"] == "4" and all(v.dtype == torch.float16 for v in tensors.values() if v.is_floating_point())
    ema = {k[4:]: v for k, v in load_checkpoint(list_checkpoints(run)[-1])[0].items() if k.startswith("ema.")}
    loaded = dumo.load(run, checkpoint=list_snapshots(run)[-1][1])
    assert loaded.run.step == 4
    for name, value in loaded.run.model.state_dict().items():
        assert value.dtype == torch.float32 and torch.allclose(value, ema[name], rtol=1e-3, atol=1e-4), name
    assert loaded.generate(8, nfe=1).shape == (8, 2)

    assert main(["eval-snapshots", str(run), "-n", "64", "--nfe", "1", "2"]) == 0
    rows = read_rows(run / "snapshots" / "scores.csv")
    assert [(r["step"], r["nfe"]) for r in rows] == [(s, n) for s in ("2", "3", "4") for n in ("1", "2")]
    assert all(float(r["mmd"]) >= 0 and float(r["sw"]) > 0 for r in rows)

    Trainer(load_config(MOONS_CONFIG, TINY), run).run(overwrite=True)  # another run in the folder
    assert list_snapshots(run) == []


def test_eval_snapshots_without_snapshots_is_one_line(tmp_path, capsys):
    Trainer(load_config(MOONS_CONFIG, TINY), tmp_path / "run").run()
    assert main(["eval-snapshots", str(tmp_path / "run")]) == 2
    assert "train.snapshot_steps" in capsys.readouterr().err


def test_snapshot_keys_are_validated():
    with pytest.raises(Exception, match="snapshot_steps"):
        load_config(MOONS_CONFIG, ["train.snapshot_steps=[0]"])
    with pytest.raises(Exception, match="snapshot_every"):
        load_config(MOONS_CONFIG, ["train.snapshot_every=-1"])


def latent_run_config(tmp_path, autoencoder_path=None):
    """A latent file of random codes for a tiny random SD-VAE saved in tmp_path (nothing downloaded)."""
    from dumo.files import save_checkpoint

    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    metadata = {
        "autoencoder_kind": "sd-vae",
        "autoencoder_path": str(tmp_path / "vae"),
        "scaling_factor": repr(vae.config.scaling_factor),
        "shift_factor": "0.0",
        "num_classes": "3",
    }
    tensors = {"latents": torch.randn(64, 4, 4, 4), "labels": torch.arange(64) % 3}
    save_checkpoint(tmp_path / "latents.safetensors", tensors, metadata, kind="dumo-latents")
    data = {"name": "latents", "path": str(tmp_path / "latents.safetensors"), "conditional": True, "batch_size": 8}
    if autoencoder_path is not None:
        data["autoencoder_path"] = autoencoder_path
    return config_from_dict(
        {
            "data": data,
            "model": {"name": "DiT-S/2", "hidden_dim": 32, "depth": 1, "num_heads": 2},
            "train": {"steps": 2, "eval_every": 2, "progress": False, "checkpoint_every": 0, "log_every": 1},
        }
    )


def test_latent_runs_get_decoded_sample_pictures(tmp_path, monkeypatch):
    import dumo.plotting

    shapes = []
    original = dumo.plotting.image_grid
    monkeypatch.setattr(
        dumo.plotting, "image_grid", lambda images, *a, **k: shapes.append(images.shape) or original(images, *a, **k)
    )
    Trainer(latent_run_config(tmp_path), tmp_path / "run").run()
    assert (tmp_path / "run" / "samples" / "step_00000002.png").stat().st_size > 0
    assert shapes == [(40, 3, 8, 8)]  # 4x4x4 latents decoded to 3x8x8 pixels in [0, 1]


def test_missing_decoder_warns_once_and_training_goes_on(tmp_path, capsys):
    config = latent_run_config(tmp_path, autoencoder_path=str(tmp_path / "moved"))
    config.train.steps, config.train.eval_every = 4, 1
    result = Trainer(config, tmp_path / "run").run()
    assert result.step == 4 and not (tmp_path / "run" / "samples").exists()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "no sample pictures" in line]
    assert len(warnings) == 1 and "moved" in warnings[0]


def test_tensorboard_gets_throughput_and_pictures(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(load_config(MOONS_CONFIG, [*TINY, "train.tensorboard=true", "train.eval_every=2"]), tmp_path / "run").run()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("train/images_per_sec", "train/step_seconds", "train/peak_rss_gib", "train/tflops_per_gpu"):
        assert [event.step for event in events.Scalars(tag)] == [2, 4], tag
    assert "train/mfu" not in scalars  # unknown on a CPU: not written as a number
    assert [event.step for event in events.Images("samples")] == [2, 4]


def test_snapshots_and_throughput_under_fsdp_on_two_ranks(tmp_path):
    """Every rank gathers the sharded EMA for a snapshot; rank 0 writes it and the global images/s."""
    import subprocess

    run = tmp_path / "run"
    overrides = [*TINY, "train.parallel=fsdp", "train.snapshot_steps=[2,4]"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "dumo", "train", str(MOONS_CONFIG), "--out", str(run), "--set", *overrides]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [step for step, _ in list_snapshots(run)] == [2, 4]
    snapshot = load_checkpoint(list_snapshots(run)[-1][1], kind=MODEL_FORMAT)[0]
    ema = {k[4:]: v for k, v in load_checkpoint(list_checkpoints(run)[-1])[0].items() if k.startswith("ema.")}
    assert snapshot.keys() == ema.keys()
    assert all(torch.allclose(snapshot[k].float(), ema[k], rtol=1e-3, atol=1e-4) for k in ema)
    rows = read_rows(run / "train_log.csv")
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert all(float(r["images_per_sec"]) == pytest.approx(32 * float(r["steps_per_sec"])) for r in rows)


def test_shortcut_step_flops_count_its_self_consistency_rows_as_a_share_of_the_batch():
    costs = {}
    for fraction in (0.125, 0.25):
        config = small_dit({"name": "shortcut", "bootstrap_fraction": fraction})
        costs[fraction] = count_step_cost(config, (4, 8, 8), 10).flops_per_image
    one_pass = forward_flops(config)
    # each self-consistency row adds two no-grad passes (the two half steps): 1/8 more rows, 1/4 pass more
    assert costs[0.25] - costs[0.125] == pytest.approx(2 * 0.125 * one_pass, rel=1e-6)
    assert costs[0.125] == pytest.approx(3 * one_pass + 2 * 0.125 * one_pass, rel=0.05)

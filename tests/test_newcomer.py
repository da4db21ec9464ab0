"""What a new user with their own images trips over: exports, the Python API, sample outputs,
one-line errors about the network and the folder, watching a run, the run's own record."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dumo
from dumo.cli import main
from dumo.config import load_config
from dumo.errors import ConfigError, RunDirError
from dumo.runs.layout import CONFIG_FILE, EVAL_LOG, HISTORY_FILE, TRAIN_LOG
from dumo.training import Trainer

ROOT = Path(__file__).resolve().parents[1]
MOONS = ROOT / "configs" / "toy" / "moons-dumo.yaml"
FOLDER = ROOT / "configs" / "image_folder" / "dumo.yaml"
TINY = ["model.hidden_dim=16", "model.depth=1", "data.batch_size=32", "train.eval_samples=50", "train.progress=false"]
TINY_DIT = ["model.hidden_dim=16", "model.depth=1", "model.num_heads=2", "data.batch_size=8", "train.eval_samples=12"]
TINY_DIT += ["train.progress=false", "train.eval_every=0", "data.resolution=8"]


def make_folder(root: Path, count: int = 12, size: tuple[int, int] = (8, 8)) -> Path:
    generator = np.random.default_rng(0)
    for i in range(count):
        folder = root / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = generator.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    images = make_folder(root / "images")
    run = root / "run"
    Trainer(load_config(FOLDER, [*TINY_DIT, f"data.path={images}", "train.steps=2"]), run).run()
    return root, images, run


def test_an_export_samples_with_nothing_but_itself(folder_run, tmp_path, capsys):
    root, images, run = folder_run
    assert main(["export", str(run), str(tmp_path / "export")]) == 0
    moved = root / "moved-away"
    shutil.move(images, moved)  # the training data is gone
    try:
        grid = tmp_path / "new" / "folder" / "cats.png"  # missing folders are created
        assert main(["sample", str(tmp_path / "export"), "--nfe", "1", "--class", "cat", "--out", str(grid)]) == 0
        assert "wrote 64 samples" in capsys.readouterr().out  # a picture's default is a grid, not 2000 tiles
        assert grid.read_bytes()[:4] == b"\x89PNG"
        pngs = tmp_path / "pngs"
        assert main(["sample", str(tmp_path / "export"), "--nfe", "1", "-n", "5", "--out", str(pngs)]) == 0
        assert sorted(p.name for p in pngs.iterdir())[:2] == ["000000.png", "000001.png"]
        rows = list(csv.DictReader((pngs / "labels.csv").open()))
        assert [r["class"] for r in rows] == ["cat", "dog", "cat", "dog", "cat"]
        npz = tmp_path / "s.npz"
        assert (
            main(["sample", str(tmp_path / "export"), "--nfe", "1", "-n", "4", "--class", "dog", "--out", str(npz)])
            == 0
        )
        with np.load(npz) as data:
            assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (4, 8, 8, 3)  # NHWC for FID scripts
            assert np.array_equal(data["arr_0"], np.round(data["images"] * 255).astype(np.uint8).transpose(0, 2, 3, 1))
            from_cli = data["images"]
        # the Python API: two lines, the same samples as the command line
        model = dumo.load(tmp_path / "export")
        assert model.class_names == ["cat", "dog"]
        images_api = model.generate(4, nfe=1, classes="dog")
        assert images_api.shape == (4, 3, 8, 8) and np.array_equal(images_api.numpy(), from_cli)
    finally:
        shutil.move(moved, images)


def test_configs_ship_inside_the_package_and_are_found_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/toy/moons-dumo.yaml").data.name == "moons"
    assert load_config("image_folder/dumo.yaml").data.name == "image_folder"


def test_sampling_a_checkpoint_file_points_to_the_way(folder_run, capsys):
    _, _, run = folder_run
    checkpoint = sorted((run / "checkpoints").iterdir())[-1]
    assert main(["sample", str(checkpoint), "--nfe", "1", "--out", "x.png"]) == 2
    assert f"give the run folder and the file: '{run} --checkpoint {checkpoint}'" in capsys.readouterr().err


def test_image_sizes_the_network_cannot_take_name_the_key_to_set(tmp_path, monkeypatch):
    images = make_folder(tmp_path / "wide", 4, size=(24, 20))
    base = [*TINY_DIT[:-1], f"data.path={images}", "train.steps=1"]
    with pytest.raises(ConfigError, match=r"needs square images; the data is 3x20x24 .*set data.resolution"):
        Trainer(load_config(FOLDER, [*base, "data.resolution=null"]), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"patch size 2, which does not divide the image size 15.*data.resolution"):
        Trainer(load_config(FOLDER, [*base, "data.resolution=15"]), tmp_path / "b")
    monkeypatch.setenv("HOME", str(tmp_path))
    trainer = Trainer(load_config(FOLDER, [*base, "data.path=~/wide", "data.resolution=8"]), tmp_path / "c")
    assert trainer.dataset.shape == (3, 8, 8) and trainer.dataset.class_names == ["cat", "dog"]


def test_info_counts_an_image_folders_classes(tmp_path, capsys):
    images = make_folder(tmp_path / "images", 4)
    assert main(["info", str(FOLDER), "--set", f"data.path={images}", "data.resolution=16"]) == 0
    assert "image_folder (3, 16, 16) (2 classes)" in capsys.readouterr().out
    assert main(["info", str(FOLDER), "--set", "data.resolution=16"]) == 2
    assert "set data.path (an existing folder)" in capsys.readouterr().err
    assert main(["info", "configs/digits/dumo.yaml"]) == 0  # the small preset has its own name, not a 33M one
    shown = capsys.readouterr().out
    assert "model DiT-XS/2" in shown and "DiT-S/2" not in shown
    overridden = ["info", "configs/digits/dumo.yaml", "--set", "model.name=DiT-S/2", "model.hidden_dim=96"]
    assert main(overridden) == 0  # an override says so rather than borrow the preset's name
    assert "DiT-S/2 with a custom size (width 96, depth 12, 6 heads" in capsys.readouterr().out


def test_a_run_prints_plain_lines_with_the_loss_parts_and_logs_lr_and_time(tmp_path, capsys):
    cfg = load_config(MOONS, [*TINY, "train.steps=4", "train.log_every=2", "train.progress=true"])
    Trainer(cfg, tmp_path / "run").run()
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if line.startswith("step ")]
    assert (
        len(lines) == 2 and lines[0].startswith("step 2/4  loss ") and "loss_v " in lines[0] and "loss_u " in lines[0]
    )
    assert "\r" not in out.out + out.err  # no progress bar when nobody watches a terminal
    header = (tmp_path / "run" / TRAIN_LOG).read_text().splitlines()[0].split(",")
    assert header[-2:] == ["lr", "wall_seconds"]


def test_a_run_keeps_pictures_and_its_own_record(tmp_path):
    run = tmp_path / "run"
    result = Trainer(load_config(MOONS, [*TINY, "train.steps=4", "train.eval_every=2"]), run).run()
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_00000002.png", "step_00000004.png"]
    assert result.note is None  # 2-D data: no classifier
    assert f"dumo {dumo.__version__}" in (run / HISTORY_FILE).read_text()
    config_before, evals_before = (run / CONFIG_FILE).read_text(), (run / EVAL_LOG).read_text()
    again = Trainer(load_config(MOONS, [*TINY, "train.steps=3", "train.eval_every=2"]), run).run()
    assert again.already_done and again.step == 4
    assert (run / CONFIG_FILE).read_text() == config_before  # steps: 4 stays
    assert (run / EVAL_LOG).read_text() == evals_before  # no second row for step 4


def test_small_image_sets_say_what_their_scores_mean(folder_run):
    from dumo.training.logs import small_data_note

    _, _, run = folder_run
    assert "fit on these same 12 training images" in small_data_note(dumo.runs.loading.load_run(run).dataset)


def test_config_yaml_lists_only_the_keys_the_network_reads(folder_run, tmp_path):
    import yaml

    _, _, run = folder_run
    dit = yaml.safe_load((run / CONFIG_FILE).read_text())["model"]
    assert "channel_mult" not in dit and "dropout" not in dit and dit["num_heads"] == 2
    Trainer(load_config(MOONS, [*TINY, "train.steps=1"]), tmp_path / "mlp").run()
    mlp = yaml.safe_load((tmp_path / "mlp" / CONFIG_FILE).read_text())["model"]
    assert "channel_mult" not in mlp and "num_heads" not in mlp and mlp["hidden_dim"] == 16


def test_trajectories_honour_method_and_label_their_columns(folder_run, tmp_path, capsys):
    _, _, run = folder_run
    out = tmp_path / "t.png"
    assert main(["trajectories", str(run), "--out", str(out), "--nfe", "1", "2", "--method", "euler", "-n", "2"]) == 0
    assert "(v-head euler; NFE 1, 2)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["trajectories", "--help"])
    shown = capsys.readouterr().out
    assert "default 8" in shown and "the NFE of each column" in shown


def test_errors_name_what_the_user_set(folder_run, tmp_path, capsys):
    _, images, run = folder_run
    if not torch.cuda.is_available():
        assert main(["sample", str(run), "--nfe", "1", "--device", "cuda", "--out", str(tmp_path / "x.png")]) == 2
        assert "--device is 'cuda' but CUDA is not available" in capsys.readouterr().err
    with pytest.raises(RunDirError, match="replace it with --overwrite"):
        Trainer(load_config(FOLDER, [*TINY_DIT, f"data.path={images}", "objective.beta=0.1"]), run).run()

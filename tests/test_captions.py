"""Captioned images: image + .txt folders and JSONL manifests, and their one-line errors."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from dumo.data.captions import load_caption_folder, load_caption_manifest  # noqa: E402
from dumo.data.images import DataError  # noqa: E402


def write_png(path, size=(8, 8), value=None, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = (
        np.full((size[1], size[0], 3), value, np.uint8) if value is not None else rng.integers(0, 256, (*size[::-1], 3))
    )
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def captioned(folder, name, caption, **kwargs):
    image = write_png(folder / f"{name}.png", **kwargs)
    (folder / f"{name}.txt").write_text(caption, encoding="utf-8")
    return image


def test_folder_pairs_images_with_captions_in_sorted_order_subfolders_included(tmp_path):
    captioned(tmp_path, "b", "a  blue\nbird\n", value=10)
    captioned(tmp_path, "a", "a red cat", value=200)
    captioned(tmp_path / "more", "c", "a dog", value=90)
    captioned(tmp_path / ".hidden", "d", "skipped")
    (tmp_path / "notes.txt").write_text("a caption without an image is ignored")
    data = load_caption_folder(tmp_path)
    assert data.captions == ["a red cat", "a blue bird", "a dog"]
    assert [f.relative_to(tmp_path).as_posix() for f in data.files] == ["a.png", "b.png", "more/c.png"]
    assert data.images.shape == (3, 3, 8, 8) and data.images.dtype == torch.float32 and len(data) == 3
    torch.testing.assert_close(data.images[:, 0, 0, 0], torch.tensor([200, 10, 90]) / 255.0)


def test_mixed_sizes_need_a_resolution(tmp_path):
    captioned(tmp_path, "small", "small", size=(8, 8))
    captioned(tmp_path, "wide", "wide", size=(16, 12))
    with pytest.raises(DataError, match="images of mixed sizes: .*wide.png is 16x12"):
        load_caption_folder(tmp_path)
    assert load_caption_folder(tmp_path, resolution=4).images.shape == (2, 3, 4, 4)


@pytest.mark.parametrize(
    ("arrange", "message"),
    [
        (lambda root: write_png(root / "lonely.png"), r"image .*lonely.png has no caption: expected lonely.txt"),
        (lambda root: captioned(root, "blank", " \n\t"), r"caption file .*blank.txt is empty"),
        (lambda root: (root / "cat.txt").write_text("a cat"), r"no images .* found in"),
        (lambda root: _broken_image(root), r"cannot read image .*broken.png"),
        (lambda root: _latin1_caption(root), r"caption file .*latin.txt is not UTF-8"),
    ],
)
def test_folder_errors_name_the_file(tmp_path, arrange, message):
    arrange(tmp_path)
    with pytest.raises(DataError, match=message) as caught:
        load_caption_folder(tmp_path)
    assert "\n" not in str(caught.value)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="caption folder not found"):
        load_caption_folder(tmp_path / "absent")


def _broken_image(root):
    captioned(root, "fine", "fine")
    (root / "broken.png").write_bytes(b"not a png")
    (root / "broken.txt").write_text("broken")


def _latin1_caption(root):
    write_png(root / "latin.png")
    (root / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))


def write_manifest(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_manifest_relative_and_absolute_paths_and_repeats(tmp_path):
    write_png(tmp_path / "data" / "images" / "a.png", value=50)
    absolute = write_png(tmp_path / "elsewhere" / "b.png", value=150)
    manifest = write_manifest(
        tmp_path / "data" / "train.jsonl",
        [
            {"image": "images/a.png", "text": "a grey square"},
            "",
            {"file_name": str(absolute), "text": "a lighter\nsquare"},
            {"image": "images/a.png", "text": "the same image, said otherwise"},
        ],
    )
    data = load_caption_manifest(manifest)
    assert data.captions == ["a grey square", "a lighter square", "the same image, said otherwise"]
    assert data.files == [tmp_path / "data" / "images" / "a.png", absolute, tmp_path / "data" / "images" / "a.png"]
    torch.testing.assert_close(data.images[:, 1, 3, 3], torch.tensor([50, 150, 50]) / 255.0)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([{"image": "a.png", "text": "ok"}, '{"image": "a.png", "text": '], r"train.jsonl line 2 is not valid JSON"),
        (
            [{"image": "a.png", "text": "ok"}, "", {"image": "gone.png", "text": "x"}],
            r"line 3: image .*gone.png not found",
        ),
        ([{"image": "a.png", "text": "  "}], r"line 1: the caption of a.png is empty"),
        ([{"image": "a.png"}], r'line 1: expected \{"image": "path", "text": "caption"\}'),
        ([["a.png", "text"]], r"line 1: expected"),
        ([{"image": "a.png", "text": 3}], r"line 1: expected"),
        (["", "  "], r"lists no images"),
    ],
)
def test_manifest_errors_name_the_line(tmp_path, lines, message):
    write_png(tmp_path / "a.png")
    with pytest.raises(DataError, match=message) as caught:
        load_caption_manifest(write_manifest(tmp_path / "train.jsonl", lines))
    assert "\n" not in str(caught.value)


def test_manifest_unreadable_image_and_missing_manifest(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG truncated")
    manifest = write_manifest(tmp_path / "m.jsonl", [{"image": "bad.png", "text": "x"}])
    with pytest.raises(DataError, match=r"cannot read image .*bad.png"):
        load_caption_manifest(manifest)
    with pytest.raises(DataError, match="caption manifest not found"):
        load_caption_manifest(tmp_path / "absent.jsonl")


def test_manifest_resolution_crops_mixed_sizes(tmp_path):
    write_png(tmp_path / "a.png", size=(8, 8))
    write_png(tmp_path / "b.png", size=(12, 20))
    manifest = write_manifest(tmp_path / "m.jsonl", [{"image": "a.png", "text": "a"}, {"image": "b.png", "text": "b"}])
    with pytest.raises(DataError, match="mixed sizes"):
        load_caption_manifest(manifest)
    assert load_caption_manifest(manifest, resolution=8).images.shape == (2, 3, 8, 8)

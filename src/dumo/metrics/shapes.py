"""The judge of the shapes world (:mod:`dumo.data.shapes`): does an image show what its prompt says?

GenEval's checks with pixel rules instead of a detector, tolerant of what a generator draws
(noise, soft edges, colours a little off):

1. Colour: each pixel takes the nearest of black and the six palette colours (RGB distance);
   black ones are background (a pixel within 100 of black always is: green, the darkest colour,
   is 200 from it). A coloured pixel farther than :data:`COLOUR_TOLERANCE` (80) from its palette
   colour is off-palette: 80 is under half the distance of the closest two colours (blue and
   purple, 187), 8 std of a noise of 10/255 per channel, and leaves orange (92 from yellow) out.
2. Objects: the 8-connected components of each palette colour. Components under :data:`MIN_AREA`
   (10) px are noise and ignored (the smallest object of the world, a 7x7 triangle, has 29 px).
   Off-palette pixels touching a component are its soft edge (a blurred border) and join it; holes
   are filled. An off-palette component of MIN_AREA px or more that touches no object is an
   object of no palette colour.
3. Shape, from the object's bounding box (w x h, filled fraction ``fill``) and its row widths
   (``taper``: mean width of the bottom third of the rows minus that of the top third, over w):
   triangle if taper >= 0.3 and fill <= 0.75 (renders: taper 0.6 to 0.86, fill 0.50 to 0.58);
   otherwise, if |taper| < 0.3 and the box is nearly square (long side <= 1.3 short side),
   square if fill >= 0.9 (renders: 1.0) and circle if 0.65 <= fill < 0.9 (renders: 0.76 to 0.85);
   anything else (an upside-down triangle, a diamond, a bar) is an object of no known shape.
   Each threshold sits about halfway between the values of the renders and those of the shapes
   it must tell them from, so clean renders pass exactly and a blurred border does not flip them.
4. The image passes if its objects are exactly those the prompt names (colours, shapes, counts;
   an extra, missing or unrecognised object fails it) and, for a position prompt, object 1's
   centroid is on the named side of object 2's by at least 2 px on that axis.
   A failing image is counted under the first of these rules it breaks (:data:`FAILURES`), so a
   report says what a model gets wrong: colours, shapes, counts or positions.

Accuracy is the fraction of images that pass, per category; "overall" is the mean of the
categories' accuracies (GenEval's score), reported apart for prompts that name a held-out pair.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from dumo.data.shapes import (
    CATEGORIES,
    COLOURS,
    DEFAULT_HELD_OUT,
    PromptSpec,
    ShapesError,
    format_prompt,
    names_held_out,
    parse_prompt,
    relation_holds,
)

COLOUR_TOLERANCE = 80.0  # RGB distance; the closest palette colours (blue, purple) are 187 apart
MIN_AREA = 10  # px; components below are noise
TAPER_TRIANGLE = 0.3
MAX_TRIANGLE_FILL = 0.75
MAX_ASPECT = 1.3  # circles and squares: long side over short side of the bounding box
MIN_SQUARE_FILL = 0.9
MIN_CIRCLE_FILL = 0.65

REFERENCE_NAMES = ("black", *COLOURS)
REFERENCE_RGB = np.array([(0, 0, 0), *COLOURS.values()], dtype=np.float32)
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Detected:
    """An object found in an image: palette colour, shape (None: none known), size and centroid."""

    colour: str
    shape: str | None
    area: int
    centre: tuple[float, float]  # (row, column)

    def describe(self) -> str:
        shape = self.shape or "object of no known shape"
        return f"a {self.colour} {shape} at ({self.centre[0]:.1f}, {self.centre[1]:.1f})"


#: why an image fails, in the order the judge checks: the first rule an image breaks names its failure
FAILURES = {
    "off_palette": "an object of no palette colour",
    "unknown_shape": "an object of no known shape",
    "no_objects": "no objects",
    "wrong_objects": "objects missing or extra (colour, shape or count)",
    "position": "objects right, position wrong",
}


@dataclass(frozen=True)
class Verdict:
    """Whether an image passes, and why not (``failure``: a key of FAILURES, and the detail); true
    exactly when it passes."""

    passed: bool
    reason: str = ""
    failure: str = ""

    def __bool__(self) -> bool:
        return self.passed


def as_uint8(image: np.ndarray) -> np.ndarray:
    """An (H, W, 3) image as uint8: uint8 kept, floats read as [0, 1]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ShapesError(f"the judge reads (H, W, 3) RGB images; got shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    if image.dtype.kind != "f":
        raise ShapesError(f"the judge reads uint8 images or floats in [0, 1]; got {image.dtype}")
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def label_pixels(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: the index into REFERENCE_NAMES of its nearest colour (0: black), and whether a
    coloured pixel is off-palette (farther than COLOUR_TOLERANCE from that colour)."""
    pixels = image.astype(np.float32)[:, :, None, :]
    distances = np.linalg.norm(pixels - REFERENCE_RGB, axis=-1)
    nearest = distances.argmin(axis=-1)
    off_palette = (nearest > 0) & (distances.min(axis=-1) > COLOUR_TOLERANCE)
    return nearest, off_palette


def classify_shape(mask: np.ndarray) -> str | None:
    """circle, square, triangle or None, from a component's bounding box and row widths."""
    rows, cols = np.nonzero(mask)
    box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = box.shape
    fill = box.mean()
    third = max(1, height // 3)
    widths = box.sum(axis=1) / width
    taper = widths[height - third :].mean() - widths[:third].mean()
    if taper >= TAPER_TRIANGLE:
        return "triangle" if fill <= MAX_TRIANGLE_FILL else None
    if taper <= -TAPER_TRIANGLE or max(height, width) > MAX_ASPECT * min(height, width):
        return None
    if fill >= MIN_SQUARE_FILL:
        return "square"
    return "circle" if fill >= MIN_CIRCLE_FILL else None


def find_objects(image: np.ndarray) -> tuple[list[Detected], list[tuple[float, float]]]:
    """The palette-coloured objects of an image, and the centroids of off-palette objects."""
    nearest, off_palette = label_pixels(as_uint8(image))
    objects: list[Detected] = []
    covered = np.zeros(nearest.shape, dtype=bool)
    for index in range(1, len(REFERENCE_NAMES)):
        components, count = ndimage.label((nearest == index) & ~off_palette, EIGHT_CONNECTED)
        for label in range(1, count + 1):
            core = components == label
            if core.sum() < MIN_AREA:
                continue
            # off-palette pixels along the edge are the object's soft edge: they belong to it
            edge = off_palette & ndimage.binary_dilation(core, EIGHT_CONNECTED)
            mask = ndimage.binary_fill_holes(core | edge)
            covered |= mask
            rows, cols = np.nonzero(mask)
            centre = (float(rows.mean()), float(cols.mean()))
            objects.append(Detected(REFERENCE_NAMES[index], classify_shape(mask), int(mask.sum()), centre))
    near_objects = ndimage.binary_dilation(covered, EIGHT_CONNECTED)
    components, count = ndimage.label(off_palette & ~covered, EIGHT_CONNECTED)
    strays = []
    for label in range(1, count + 1):
        mask = components == label
        if mask.sum() >= MIN_AREA and not (mask & near_objects).any():
            rows, cols = np.nonzero(mask)
            strays.append((float(rows.mean()), float(cols.mean())))
    return objects, strays


def judge_image(image: np.ndarray, prompt: str | PromptSpec) -> Verdict:
    """Whether ``image`` ((H, W, 3) uint8, or floats in [0, 1]) shows exactly what ``prompt`` says."""
    spec = prompt if isinstance(prompt, PromptSpec) else parse_prompt(prompt)
    objects, strays = find_objects(image)
    if strays:
        row, col = strays[0]
        return Verdict(False, f"an object of no palette colour at ({row:.1f}, {col:.1f})", "off_palette")
    unknown = [o for o in objects if o.shape is None]
    if unknown:
        return Verdict(False, unknown[0].describe(), "unknown_shape")
    if not objects:
        return Verdict(False, "no objects found", "no_objects")
    found = Counter((o.colour, o.shape) for o in objects)
    expected = Counter(spec.counts())
    if found != expected:
        missing, extra = expected - found, found - expected
        parts = [f"missing {n} {c} {s}" for (c, s), n in sorted(missing.items())]
        parts += [f"{n} extra {c} {s}" for (c, s), n in sorted(extra.items())]
        return Verdict(False, "; ".join(parts), "wrong_objects")
    if spec.relation is not None:
        first, second = (next(o for o in objects if (o.colour, o.shape) == (p.colour, p.shape)) for p in spec.objects)
        if not relation_holds(spec.relation, first.centre, second.centre):
            return Verdict(False, f"{first.describe()} is not {spec.relation} {second.describe()}", "position")
    return Verdict(True)


def in_split(held_out: bool, split: str) -> bool:
    """Whether an image (its prompt naming a held-out pair or not) belongs to split "seen", "held_out" or "all"."""
    return split in ("all", "held_out" if held_out else "seen")


@dataclass(frozen=True)
class ShapesReport:
    """Per-image results of :func:`judge` and the accuracies they make."""

    prompts: list[str]
    categories: list[str]
    held_out: list[bool]  # whether the image's prompt names a held-out pair
    passed: list[bool]
    reasons: list[str]  # "" where the image passed
    failures: list[str]  # a key of FAILURES, "" where the image passed
    held_out_pairs: frozenset[tuple[str, str]]

    def accuracy(self, split: str = "all", category: str = "overall") -> float | None:
        """Fraction passed among split "seen", "held_out" or "all", in one category or "overall"
        (the mean of the categories' accuracies); None where the split has no such image."""
        if category == "overall":
            values = [a for a in (self.accuracy(split, c) for c in CATEGORIES) if a is not None]
            return float(np.mean(values)) if values else None
        chosen = [
            passed
            for passed, kind, held in zip(self.passed, self.categories, self.held_out, strict=True)
            if kind == category and in_split(held, split)
        ]
        return float(np.mean(chosen)) if chosen else None

    def count(self, split: str = "all") -> int:
        return sum(in_split(held, split) for held in self.held_out)

    def scores(self) -> dict[str, dict[str, float | None]]:
        """{split: {category or "overall": accuracy}} for the splits seen, held_out and all."""
        columns = (*CATEGORIES, "overall")
        return {split: {c: self.accuracy(split, c) for c in columns} for split in ("seen", "held_out", "all")}

    def failure_counts(self, split: str = "all") -> dict[str, int]:
        """How many images of split "seen", "held_out" or "all" fail for each reason (FAILURES' order)."""
        chosen = [f for f, held in zip(self.failures, self.held_out, strict=True) if in_split(held, split)]
        found = Counter(chosen)
        return {kind: found[kind] for kind in FAILURES}

    def format(self) -> str:
        """A table: a row per split (with its number of images), a column per category and overall."""
        pairs = ", ".join(f"{c} {s}" for c, s in sorted(self.held_out_pairs)) or "none"
        lines = [f"shapes judge: {len(self.passed)} images; held-out pairs: {pairs}"]
        lines.append(f"{'':10}{'images':>8}" + "".join(f"{c:>13}" for c in (*CATEGORIES, "overall")))
        for split, title in (("seen", "seen"), ("held_out", "held-out"), ("all", "all")):
            cells = ["-" if a is None else f"{a:.3f}" for a in self.scores()[split].values()]
            lines.append(f"{title:10}{self.count(split):>8}" + "".join(f"{cell:>13}" for cell in cells))
        failed = {kind: n for kind, n in self.failure_counts().items() if n}
        if failed:
            listed = "; ".join(f"{FAILURES[kind]} {n}" for kind, n in failed.items())
            lines.append(f"failed, by the first rule broken: {listed}")
        return "\n".join(lines)


def judge(
    images: np.ndarray | Sequence[np.ndarray],
    prompts: Sequence[str | PromptSpec],
    held_out: Iterable[tuple[str, str]] = DEFAULT_HELD_OUT,
) -> ShapesReport:
    """Judge image i against prompt i: (N, H, W, 3) uint8 (or floats in [0, 1]) and N prompts."""
    if len(images) != len(prompts):
        raise ShapesError(f"{len(images)} images for {len(prompts)} prompts; the judge needs one image per prompt")
    held = frozenset(held_out)
    specs = [p if isinstance(p, PromptSpec) else parse_prompt(p) for p in prompts]
    verdicts = [judge_image(image, spec) for image, spec in zip(images, specs, strict=True)]
    return ShapesReport(
        prompts=[format_prompt(s) for s in specs],
        categories=[s.category for s in specs],
        held_out=[names_held_out(s, held) for s in specs],
        passed=[v.passed for v in verdicts],
        reasons=[v.reason for v in verdicts],
        failures=[v.failure for v in verdicts],
        held_out_pairs=held,
    )

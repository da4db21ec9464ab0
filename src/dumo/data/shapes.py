"""The shapes world: captioned 32x32 images of coloured shapes, rendered on the fly from a seed.

A small compositional text-to-image benchmark that runs on a CPU (the judge is
:mod:`dumo.metrics.shapes`). Every image is exactly what its prompt says:

- 32x32 RGB uint8 on a black background (0, 0, 0); filled shapes in flat colours, no anti-aliasing;
- shapes: circle, square, triangle (upright isosceles: apex at the top, base at the bottom), each
  with a bounding box 7 to 12 px wide and high (circles and squares as wide as high), fully inside
  the image; the bounding boxes of two objects have at least 1 px of black between them;
- colours (exact RGB): see :data:`COLOURS`;
- four kinds of prompt (lower case)::

      single        a {colour} {shape}
      two_objects   a {colour1} {shape1} and a {colour2} {shape2}
      counting      {two|three|four} {colour} {shape}s
      position      a {colour1} {shape1} {left of|right of|above|below} a {colour2} {shape2}

  The two objects of a two-object or position prompt differ in colour or shape. For a position
  prompt, object 1's centre (the centroid of its pixels) lies on that side of object 2's by at
  least 2 px on that axis (image rows grow downwards: "above" means a smaller row).

Held-out colour-shape pairs (:data:`DEFAULT_HELD_OUT`) never appear in the training stream, so a
model can be tested on combinations it never saw.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from dumo.errors import DumoError

IMAGE_SIZE = 32
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 200, 0),
    "blue": (0, 80, 255),
    "yellow": (255, 220, 0),
    "purple": (160, 0, 200),
    "white": (255, 255, 255),
}
SHAPES = ("circle", "square", "triangle")
NUMBERS = {"two": 2, "three": 3, "four": 4}
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("single", "two_objects", "counting", "position")
MIN_SIZE, MAX_SIZE = 7, 12  # bounding box side, px
MIN_GAP = 1  # black px between the bounding boxes of two objects
MIN_OFFSET = 2.0  # px between the centres of a position prompt's objects, on the relation's axis
DEFAULT_HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("yellow", "triangle"), ("purple", "circle"), ("green", "square")}
)
GRAMMAR = (
    "'a COLOUR SHAPE', 'a COLOUR SHAPE and a COLOUR SHAPE', '{two|three|four} COLOUR SHAPEs' or "
    "'a COLOUR SHAPE {left of|right of|above|below} a COLOUR SHAPE'"
)


class ShapesError(DumoError):
    """A prompt outside the shapes world's grammar, or a bad held-out list."""


# -- prompts --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeObject:
    """``count`` objects of one colour and shape."""

    colour: str
    shape: str
    count: int = 1


@dataclass(frozen=True)
class PromptSpec:
    """A parsed prompt: its category, the objects it names (in prompt order) and the relation of a
    position prompt (object 1 {relation} object 2)."""

    category: str
    objects: tuple[ShapeObject, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        problem = spec_problem(self)
        if problem:
            raise ShapesError(problem)

    def counts(self) -> dict[tuple[str, str], int]:
        """How many objects of each (colour, shape) the image holds."""
        return {(o.colour, o.shape): o.count for o in self.objects}


def spec_problem(spec: PromptSpec) -> str | None:
    """Why ``spec`` is not a prompt of the world (None if it is one)."""
    expected = {"single": (1, 1), "two_objects": (2, 1), "counting": (1, None), "position": (2, 1)}
    if spec.category not in expected:
        return f"unknown prompt category {spec.category!r} (categories: {', '.join(CATEGORIES)})"
    size, count = expected[spec.category]
    if len(spec.objects) != size:
        return f"a {spec.category} prompt names {size} object kind(s), not {len(spec.objects)}"
    for obj in spec.objects:
        if obj.colour not in COLOURS:
            return f"unknown colour {obj.colour!r} (colours: {', '.join(COLOURS)})"
        if obj.shape not in SHAPES:
            return f"unknown shape {obj.shape!r} (shapes: {', '.join(SHAPES)})"
        if count is not None and obj.count != count:
            return f"a {spec.category} prompt counts {count} per object, not {obj.count}"
        if count is None and obj.count not in NUMBERS.values():
            return f"counting prompts count 2, 3 or 4 objects, not {obj.count}"
    if size == 2 and spec.objects[0] == spec.objects[1]:
        return "the two objects must differ in colour or shape"
    if (spec.category == "position") != (spec.relation is not None):
        return "a relation belongs to position prompts only, and each of them has one"
    if spec.relation is not None and spec.relation not in RELATIONS:
        return f"unknown relation {spec.relation!r} (relations: {', '.join(RELATIONS)})"
    return None


def parse_prompt(text: str) -> PromptSpec:
    """The structure of a prompt; a :class:`ShapesError` says what is wrong with an ungrammatical one."""
    words = text.split()
    if not words:
        raise ShapesError("empty prompt")
    if text != text.lower():
        raise ShapesError("prompts are lower case")
    if words[0] in NUMBERS:
        if len(words) != 3:
            raise ShapesError(f"expected '{words[0]} COLOUR SHAPEs'")
        colour, plural = words[1], words[2]
        shape = plural[:-1] if plural.endswith("s") else ""
        check_word(colour, COLOURS, "colour")
        if shape not in SHAPES:
            raise ShapesError(f"expected a plural shape ({', '.join(s + 's' for s in SHAPES)}), not {plural!r}")
        return PromptSpec("counting", (ShapeObject(colour, shape, NUMBERS[words[0]]),))
    first = parse_object(words[:3])
    rest = words[3:]
    if not rest:
        return PromptSpec("single", (first,))
    if rest[0] == "and":
        return PromptSpec("two_objects", (first, parse_object(rest[1:])))
    for relation in RELATIONS:
        length = len(relation.split())
        if rest[:length] == relation.split():
            return PromptSpec("position", (first, parse_object(rest[length:])), relation)
    raise ShapesError(f"expected 'and' or a relation ({', '.join(RELATIONS)}) after {' '.join(words[:3])!r}")


def parse_object(words: Sequence[str]) -> ShapeObject:
    if len(words) != 3 or words[0] != "a":
        raise ShapesError(f"expected 'a COLOUR SHAPE', not {' '.join(words)!r}; prompts read {GRAMMAR}")
    check_word(words[1], COLOURS, "colour")
    check_word(words[2], SHAPES, "shape")
    return ShapeObject(words[1], words[2])


def check_word(word: str, known: Iterable[str], kind: str) -> None:
    if word not in known:
        raise ShapesError(f"unknown {kind} {word!r} ({kind}s: {', '.join(known)})")


def format_prompt(spec: PromptSpec) -> str:
    """The prompt of ``spec`` (``parse_prompt`` inverts it)."""
    if spec.category == "counting":
        obj = spec.objects[0]
        number = next(word for word, value in NUMBERS.items() if value == obj.count)
        return f"{number} {obj.colour} {obj.shape}s"
    first, *others = (f"a {o.colour} {o.shape}" for o in spec.objects)
    if spec.category == "single":
        return first
    joint = "and" if spec.category == "two_objects" else spec.relation
    return f"{first} {joint} {others[0]}"


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a text file, one a line (blank lines at the end are ignored), each checked
    against the grammar; a bad line gives an error naming its number and text."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ShapesError(f"cannot read the prompts file {path}: {error}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ShapesError(f"the prompts file {path} holds no prompts")
    for number, line in enumerate(lines, start=1):
        try:
            parse_prompt(line)
        except ShapesError as error:
            raise ShapesError(f"{path} line {number}: {line.strip()!r}: {error}") from None
    return [line.strip() for line in lines]


# -- held-out pairs -------------------------------------------------------------------------------

HeldOut = frozenset[tuple[str, str]]


def parse_held_out(pairs: str | Iterable[str | tuple[str, str]]) -> HeldOut:
    """Colour-shape pairs from "yellow triangle,purple circle", or from a list of such strings or of
    (colour, shape) tuples, each checked; "" is none."""
    items = pairs.split(",") if isinstance(pairs, str) else [i if isinstance(i, str) else " ".join(i) for i in pairs]
    held_out = set()
    for item in (i.strip() for i in items):
        if not item:
            continue
        words = item.split()
        if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES:
            raise ShapesError(f"held-out pair {item!r} is not 'COLOUR SHAPE' (e.g. 'yellow triangle')")
        held_out.add((words[0], words[1]))
    return frozenset(held_out)


def names_held_out(spec: PromptSpec, held_out: Iterable[tuple[str, str]]) -> bool:
    """Whether the prompt names any held-out colour-shape pair."""
    held = set(held_out)
    return any((o.colour, o.shape) in held for o in spec.objects)


# -- drawing prompts ------------------------------------------------------------------------------


def sample_prompt(
    rng: np.random.Generator,
    held_out: Iterable[tuple[str, str]] = DEFAULT_HELD_OUT,
    mix: Sequence[float] | None = None,
) -> PromptSpec:
    """A random prompt naming no held-out pair. The mix: the four categories equally often (or in
    the proportions ``mix``, one weight per category in :data:`CATEGORIES` order); colours, shapes,
    counts (2, 3, 4) and relations uniform; pairs of objects are redrawn until they differ and
    neither is held out (which keeps every allowed prompt of a category equally likely)."""
    held = frozenset(held_out)
    allowed = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held]
    if len(allowed) < 2:
        raise ShapesError("fewer than two colour-shape pairs are not held out: too few to train on")
    if mix is None:
        category = CATEGORIES[rng.integers(len(CATEGORIES))]
    else:
        category = CATEGORIES[rng.choice(len(CATEGORIES), p=check_mix(mix))]

    def pick() -> ShapeObject:
        return ShapeObject(*allowed[rng.integers(len(allowed))])

    if category == "single":
        return PromptSpec(category, (pick(),))
    if category == "counting":
        obj = pick()
        return PromptSpec(category, (ShapeObject(obj.colour, obj.shape, int(rng.integers(2, 5))),))
    first, second = pick(), pick()
    while second == first:
        second = pick()
    relation = RELATIONS[rng.integers(len(RELATIONS))] if category == "position" else None
    return PromptSpec(category, (first, second), relation)


def check_mix(mix: Sequence[float]) -> np.ndarray:
    """Category weights (one per category, >= 0, not all 0) as probabilities."""
    weights = np.asarray(mix, dtype=np.float64)
    if weights.shape != (len(CATEGORIES),) or not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ShapesError(f"a prompt mix is {len(CATEGORIES)} weights >= 0 ({', '.join(CATEGORIES)}); got {list(mix)}")
    if weights.sum() == 0:
        raise ShapesError("a prompt mix needs at least one category with a weight above 0")
    return weights / weights.sum()


def vocabulary() -> list[str]:
    """Every word a prompt of the world may use, in a fixed order."""
    words = ["a", "and", *COLOURS, *SHAPES, *(f"{s}s" for s in SHAPES), *NUMBERS]
    return words + [word for relation in RELATIONS for word in relation.split() if word not in words]


def all_prompts(category: str) -> list[PromptSpec]:
    """Every prompt of a category, in a fixed order."""
    pairs = [ShapeObject(c, s) for c in COLOURS for s in SHAPES]
    if category == "single":
        return [PromptSpec(category, (o,)) for o in pairs]
    if category == "counting":
        return [PromptSpec(category, (ShapeObject(o.colour, o.shape, n),)) for n in NUMBERS.values() for o in pairs]
    twos = [(a, b) for a, b in itertools.product(pairs, pairs) if a != b]
    if category == "two_objects":
        return [PromptSpec(category, two) for two in twos]
    return [PromptSpec(category, two, relation) for relation in RELATIONS for two in twos]


class EvaluationPrompts(NamedTuple):
    seen: list[str]
    held_out: list[str]


def evaluation_prompts(
    held_out: Iterable[tuple[str, str]] = DEFAULT_HELD_OUT, per_category: int = 32, seed: int = 0
) -> EvaluationPrompts:
    """A fixed evaluation set: per category, ``per_category`` distinct prompts that name no held-out
    pair (seen) and as many that name at least one (held-out), fewer where the category has fewer
    (single: 18 prompts in all), drawn without replacement; category by category, in
    :data:`CATEGORIES` order."""
    rng = np.random.default_rng(check_seed(seed))
    held = frozenset(held_out)
    seen: list[str] = []
    unseen: list[str] = []
    for category in CATEGORIES:
        specs = all_prompts(category)
        for target, keep in ((seen, False), (unseen, True)):
            pool = [s for s in specs if names_held_out(s, held) == keep]
            chosen = rng.permutation(len(pool))[:per_category]
            target.extend(format_prompt(pool[i]) for i in sorted(chosen))
    return EvaluationPrompts(seen, unseen)


# -- rendering ------------------------------------------------------------------------------------


@cache
def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """The filled pixels of a shape, as a (height, width) bool array whose every row and column is used."""
    rows, cols = np.mgrid[0:height, 0:width]
    if shape == "square":
        mask = np.ones((height, width), dtype=bool)
    elif shape == "circle":  # pixel centres inside the inscribed circle
        radius = width / 2
        mask = (rows + 0.5 - radius) ** 2 + (cols + 0.5 - radius) ** 2 <= radius**2
    elif shape == "triangle":  # row r spans about width * (r + 1) / height px, centred (same parity as width)
        spans = [width - 2 * int(np.floor((width - width * (r + 1) / height) / 2 + 0.5)) for r in range(height)]
        spans = [max(s, 2 - width % 2) for s in spans]
        mask = np.abs(cols + 0.5 - width / 2) <= np.array(spans)[:, None] / 2
    else:
        raise ShapesError(f"unknown shape {shape!r}")
    mask.setflags(write=False)
    return mask


@cache
def mask_centroid(shape: str, width: int, height: int) -> tuple[float, float]:
    """(row, column) centroid of :func:`shape_mask`'s pixels, relative to its top-left corner."""
    rows, cols = np.nonzero(shape_mask(shape, width, height))
    return float(rows.mean()), float(cols.mean())


def draw_size(shape: str, rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) of a new object: circles and squares are as wide as high; triangles need not be."""
    width = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
    height = int(rng.integers(MIN_SIZE, MAX_SIZE + 1)) if shape == "triangle" else width
    return width, height


def separated(box: tuple[int, int, int, int], others: Sequence[tuple[int, int, int, int]]) -> bool:
    """Whether ``box`` (top, left, height, width) has at least MIN_GAP px between it and every other box."""
    top, left, height, width = box
    for o_top, o_left, o_height, o_width in others:
        apart_x = left + width + MIN_GAP <= o_left or o_left + o_width + MIN_GAP <= left
        apart_y = top + height + MIN_GAP <= o_top or o_top + o_height + MIN_GAP <= top
        if not (apart_x or apart_y):
            return False
    return True


def relation_holds(relation: str, first: tuple[float, float], second: tuple[float, float]) -> bool:
    """Whether centre ``first`` (row, column) is ``relation`` centre ``second`` by MIN_OFFSET px."""
    (row1, col1), (row2, col2) = first, second
    offsets = {"left of": col2 - col1, "right of": col1 - col2, "above": row2 - row1, "below": row1 - row2}
    return offsets[relation] >= MIN_OFFSET


PLACEMENT_TRIES = 100  # positions tried per object before the whole layout is drawn again
LAYOUT_TRIES = 1000  # layouts (sizes and positions) before giving up; never reached in practice


def render(spec: PromptSpec, rng: np.random.Generator) -> np.ndarray:
    """The (32, 32, 3) uint8 image of ``spec``: its objects with random sizes and positions, drawn
    by rejection sampling (deterministic given ``rng``'s state)."""
    shapes = [(o.colour, o.shape) for o in spec.objects for _ in range(o.count)]
    for _ in range(LAYOUT_TRIES):
        boxes: list[tuple[int, int, int, int]] = []
        for _colour, shape in shapes:
            width, height = draw_size(shape, rng)
            for _ in range(PLACEMENT_TRIES):
                top = int(rng.integers(0, IMAGE_SIZE - height + 1))
                left = int(rng.integers(0, IMAGE_SIZE - width + 1))
                if separated((top, left, height, width), boxes):
                    boxes.append((top, left, height, width))
                    break
            else:
                break
        if len(boxes) < len(shapes):
            continue
        centres = [
            (top + mask_centroid(shape, w, h)[0], left + mask_centroid(shape, w, h)[1])
            for (_, shape), (top, left, h, w) in zip(shapes, boxes, strict=True)
        ]
        if spec.relation is not None and not relation_holds(spec.relation, centres[0], centres[1]):
            continue
        image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        for (colour, shape), (top, left, height, width) in zip(shapes, boxes, strict=True):
            region = image[top : top + height, left : left + width]
            region[shape_mask(shape, width, height)] = COLOURS[colour]
        return image
    raise ShapesError(f"could not lay out {format_prompt(spec)!r} in {LAYOUT_TRIES} tries")


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ShapesError(f"a shapes seed is an integer >= 0; got {seed!r}")
    return int(seed)


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of sample ``index`` under ``seed``: independent of every other sample."""
    return np.random.default_rng([check_seed(seed), index])


def render_prompts(prompts: Sequence[str | PromptSpec], seed: int) -> np.ndarray:
    """(N, 32, 32, 3) uint8: prompt i rendered from a generator seeded by (seed, i), so an image does
    not depend on the other prompts of the list."""
    specs = [p if isinstance(p, PromptSpec) else parse_prompt(p) for p in prompts]
    images = np.zeros((len(specs), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for index, spec in enumerate(specs):
        images[index] = render(spec, sample_rng(seed, index))
    return images


# -- the data source ------------------------------------------------------------------------------


class ShapesWorld:
    """Random prompts (none naming a held-out pair) with their images, as training data.

    Sample ``k`` of seed ``s`` is drawn from its own generator (:func:`sample_rng`), so a stream's
    position is all it needs to resume, and ``batch(n, s)`` is the first ``n`` samples of
    ``stream(.., s)``. Models see images in [-1, 1], (N, 3, 32, 32).
    """

    name = "shapes"
    shape = (3, IMAGE_SIZE, IMAGE_SIZE)
    num_classes = 0

    def __init__(
        self, held_out: Iterable[tuple[str, str]] | str = DEFAULT_HELD_OUT, mix: Sequence[float] | None = None
    ):
        self.held_out = parse_held_out(held_out)
        self.mix = None if mix is None else tuple(float(w) for w in mix)
        sample_prompt(np.random.default_rng(0), self.held_out, self.mix)  # refuses a world with too few pairs left

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        spec = sample_prompt(rng, self.held_out, self.mix)
        return render(spec, rng), format_prompt(spec)

    def draw(self, rngs: Iterable[np.random.Generator]) -> tuple[np.ndarray, list[str]]:
        """A sample from each generator: (N, 32, 32, 3) uint8 images and their prompts."""
        images = np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        pairs = [self.sample(rng) for rng in rngs]
        return np.stack([p[0] for p in pairs]) if pairs else images, [p[1] for p in pairs]

    def samples(self, seed: int, start: int, count: int) -> tuple[np.ndarray, list[str]]:
        """Samples ``start`` to ``start + count - 1`` of ``seed``."""
        return self.draw(sample_rng(seed, start + i) for i in range(count))

    def batch(
        self, n: int, seed_or_generator: int | np.random.Generator, tensor: bool = False
    ) -> tuple[np.ndarray | Tensor, list[str]]:
        """``n`` samples and their prompts: uint8 (n, 32, 32, 3), or with ``tensor`` the model's
        float (n, 3, 32, 32) in [-1, 1]. A seed gives the first ``n`` samples of its stream; a
        generator is drawn from in turn."""
        if isinstance(seed_or_generator, np.random.Generator):
            images, prompts = self.draw(itertools.repeat(seed_or_generator, n))
        else:
            images, prompts = self.samples(seed_or_generator, 0, n)
        return (self.standardise(images) if tensor else images), prompts

    def stream(self, batch_size: int, seed: int) -> ShapesStream:
        return ShapesStream(self, batch_size, seed)

    def standardise(self, images: np.ndarray) -> Tensor:
        """uint8 (N, H, W, 3) to the model's float (N, 3, H, W) in [-1, 1]."""
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1

    def unstandardise(self, x: Tensor) -> Tensor:
        """Model space back to images in [0, 1]."""
        return ((x + 1) / 2).clamp(0, 1)


class ShapesStream:
    """An endless stream of training batches; its state (seed, samples drawn) resumes it exactly."""

    def __init__(self, world: ShapesWorld, batch_size: int, seed: int):
        self.world = world
        self.batch_size = batch_size
        self.seed = check_seed(seed)
        self.position = 0

    def next_batch(self, device: torch.device | str = "cpu") -> tuple[Tensor, list[str]]:
        """Images (batch_size, 3, 32, 32) in [-1, 1] on ``device`` and their prompts."""
        images, prompts = self.world.samples(self.seed, self.position, self.batch_size)
        self.position += self.batch_size
        return self.world.standardise(images).to(device), prompts

    def state(self) -> Tensor:
        return torch.tensor([self.seed, self.position], dtype=torch.int64)

    def load_state(self, state: Tensor) -> None:
        self.seed, self.position = (int(v) for v in state.tolist())

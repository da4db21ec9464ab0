"""The shapes world: the renderer against its specification, the prompt grammar, the training
stream, the judge (1.0 on renders, 0 on images that break a rule) and the two commands."""

import numpy as np
import pytest
from scipy import ndimage

from dumo.cli import main
from dumo.data.shapes import (
    CATEGORIES,
    COLOURS,
    DEFAULT_HELD_OUT,
    PromptSpec,
    ShapeObject,
    ShapesError,
    ShapesWorld,
    all_prompts,
    evaluation_prompts,
    format_prompt,
    names_held_out,
    parse_held_out,
    parse_prompt,
    render,
    render_prompts,
    sample_prompt,
    shape_mask,
)
from dumo.metrics.shapes import FAILURES, find_objects, judge, judge_image

EIGHT = np.ones((3, 3), dtype=bool)


@pytest.fixture(scope="module")
def prompts():
    seen, held_out = evaluation_prompts(per_category=16, seed=1)
    return seen + held_out


@pytest.fixture(scope="module")
def renders(prompts):
    return render_prompts(prompts, seed=7)


def objects_of(image):
    """(colour, bool mask) of each 8-connected object of an image, found by exact colour."""
    found = []
    for name, rgb in COLOURS.items():
        components, count = ndimage.label((image == rgb).all(axis=-1), EIGHT)
        found += [(name, components == label) for label in range(1, count + 1)]
    return found


# -- renderer -----------------------------------------------------------------------------------


def test_renders_use_only_black_and_the_exact_palette(renders):
    allowed = np.array([(0, 0, 0), *COLOURS.values()])
    pixels = renders.reshape(-1, 3)
    assert renders.dtype == np.uint8 and renders.shape[1:] == (32, 32, 3)
    assert (pixels[:, None, :] == allowed[None]).all(axis=-1).any(axis=1).all()


def test_objects_sizes_counts_and_black_gaps(prompts, renders):
    for prompt, image in zip(prompts, renders, strict=True):
        spec = parse_prompt(prompt)
        objects = objects_of(image)
        assert len(objects) == sum(o.count for o in spec.objects), prompt  # merged objects would count fewer
        for colour, mask in objects:
            rows, cols = np.nonzero(mask)
            height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
            assert 7 <= height <= 12 and 7 <= width <= 12, (prompt, colour, height, width)
        for i, (_, mask) in enumerate(objects):  # every other object is 2 px away or more: 1 px of black
            others = [m for j, (_, m) in enumerate(objects) if j != i]
            assert not any((ndimage.binary_dilation(mask, EIGHT) & m).any() for m in others), prompt
        assert sorted(c for c, _ in objects) == sorted(o.colour for o in spec.objects for _ in range(o.count))


def test_shape_masks_fill_their_box_and_triangles_point_up():
    for width in range(7, 13):
        for height in range(7, 13):
            triangle = shape_mask("triangle", width, height)
            widths = triangle.sum(axis=1)
            assert triangle.any(axis=0).all() and widths[-1] == width and widths[0] <= 2
            assert (np.diff(widths) >= 0).all() and (triangle == triangle[:, ::-1]).all()
        circle = shape_mask("circle", width, width)
        assert circle.any(axis=0).all() and circle.any(axis=1).all() and (circle == circle.T).all()
        assert not circle[0, 0] and circle.mean() < 0.9 and shape_mask("square", width, width).all()


def test_rendered_triangle_apex_is_at_the_top():
    for seed in range(10):
        image = render(parse_prompt("a white triangle"), np.random.default_rng(seed))
        (_, mask), *_ = objects_of(image)
        rows, cols = np.nonzero(mask)
        box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box[0].sum() <= 2 and box[-1].all()


def test_position_prompts_put_centres_two_pixels_apart():
    axis_sign = {"left of": (1, -1), "right of": (1, 1), "above": (0, -1), "below": (0, 1)}
    for relation, (axis, sign) in axis_sign.items():
        prompt = f"a red circle {relation} a blue triangle"
        for image in render_prompts([prompt] * 10, seed=3):
            masks = dict(objects_of(image))
            offset = np.nonzero(masks["red"])[axis].mean() - np.nonzero(masks["blue"])[axis].mean()
            assert sign * offset >= 2, (prompt, offset)


def test_render_is_deterministic_per_seed_and_line():
    lines = ["a red circle", "three blue squares", "a green triangle above a white circle"]
    first = render_prompts(lines, seed=11)
    assert (render_prompts(lines, seed=11) == first).all()
    assert (render_prompts(lines, seed=12) != first).any()
    changed = render_prompts(["two purple circles", *lines[1:]], seed=11)  # line 0 changed: lines 1, 2 are not
    assert (changed[1:] == first[1:]).all() and (changed[0] != first[0]).any()


# -- prompts ------------------------------------------------------------------------------------


def test_every_prompt_round_trips_through_the_grammar():
    sizes = {"single": 18, "two_objects": 18 * 17, "counting": 3 * 18, "position": 4 * 18 * 17}
    for category in CATEGORIES:
        specs = all_prompts(category)
        assert len(specs) == sizes[category] and len(set(specs)) == len(specs)
        for spec in specs:
            assert spec.category == category
            assert parse_prompt(format_prompt(spec)) == spec
    assert format_prompt(parse_prompt("four yellow squares")) == "four yellow squares"
    spec = parse_prompt("a red circle right of a blue square")
    assert spec.relation == "right of" and spec.objects == (ShapeObject("red", "circle"), ShapeObject("blue", "square"))


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a red",
        "an orange circle",
        "a red hexagon",
        "A red circle",
        "five red circles",
        "two red circle",
        "a red circle and a red circle",
        "a red circle near a blue square",
        "a red circle left a blue square",
        "a red circle and a blue square and a white circle",
        "three red circles and a blue square",
    ],
)
def test_ungrammatical_prompts_are_refused(bad):
    with pytest.raises(ShapesError):
        parse_prompt(bad)


def test_specs_outside_the_world_are_refused():
    with pytest.raises(ShapesError):
        PromptSpec("counting", (ShapeObject("red", "circle", 5),))
    with pytest.raises(ShapesError):
        PromptSpec("single", (ShapeObject("red", "circle"),), "above")


def test_held_out_pairs_parse_and_bad_ones_are_refused():
    assert parse_held_out("yellow triangle, purple circle,green square") == DEFAULT_HELD_OUT
    assert parse_held_out("") == frozenset()
    for bad in ("orange circle", "yellow", "yellow triangles"):
        with pytest.raises(ShapesError):
            parse_held_out(bad)
    with pytest.raises(ShapesError):  # nothing left to draw two objects from
        ShapesWorld([(c, s) for c in COLOURS for s in ("circle", "square", "triangle")][1:])


# -- the training stream -------------------------------------------------------------------------


@pytest.mark.parametrize("held_out", [DEFAULT_HELD_OUT, frozenset({("red", "circle")})])
def test_training_stream_never_shows_a_held_out_pair(held_out):
    stream = ShapesWorld(held_out).stream(batch_size=200, seed=4)
    x, prompts = stream.next_batch()
    specs = [parse_prompt(p) for p in prompts]
    assert not any(names_held_out(s, held_out) for s in specs)
    assert {s.category for s in specs} == set(CATEGORIES)
    images = ((x.permute(0, 2, 3, 1) + 1) * 127.5).round().numpy().astype(np.uint8)
    assert judge(images, prompts, held_out).accuracy("all") == 1.0  # each image shows its prompt
    for image in images:  # and no image holds a held-out object
        found = {(o.colour, o.shape) for o in find_objects(image)[0]}
        assert not found & held_out


def test_prompt_mix_is_uniform_over_categories():
    rng = np.random.default_rng(0)
    categories = [sample_prompt(rng).category for _ in range(4000)]
    for category in CATEGORIES:
        assert 0.22 < categories.count(category) / 4000 < 0.28


def test_stream_resumes_exactly_and_batch_is_its_start():
    world = ShapesWorld()
    whole = world.stream(8, seed=5)
    batches = [whole.next_batch() for _ in range(3)]
    first = world.stream(8, seed=5)
    first.next_batch()
    resumed = world.stream(8, seed=0)
    resumed.load_state(first.state().clone())
    for x, prompts in batches[1:]:
        again, again_prompts = resumed.next_batch()
        assert (again == x).all() and again_prompts == prompts
    images, prompts = world.batch(8, 5)
    assert images.dtype == np.uint8 and prompts == batches[0][1]
    assert (world.standardise(images) == batches[0][0]).all()


def test_batch_from_a_generator_and_as_model_tensors():
    world = ShapesWorld()
    x, prompts = world.batch(6, np.random.default_rng(2), tensor=True)
    assert tuple(x.shape) == (6, 3, 32, 32) and len(prompts) == 6
    assert x.min() >= -1 and x.max() <= 1 and set(x.unique().tolist()) >= {-1.0, 1.0}
    again, _ = world.batch(6, np.random.default_rng(2), tensor=True)
    assert (again == x).all() and world.unstandardise(x).min() >= 0


def test_evaluation_prompts_are_fixed_distinct_and_split_by_held_out_pairs():
    seen, held_out = evaluation_prompts(per_category=20, seed=3)
    assert (seen, held_out) == evaluation_prompts(per_category=20, seed=3)
    assert len(set(seen)) == len(seen) and len(set(held_out)) == len(held_out)
    assert not any(names_held_out(parse_prompt(p), DEFAULT_HELD_OUT) for p in seen)
    assert all(names_held_out(parse_prompt(p), DEFAULT_HELD_OUT) for p in held_out)
    per_category = {c: [parse_prompt(p).category for p in seen].count(c) for c in CATEGORIES}
    assert per_category == {"single": 15, "two_objects": 20, "counting": 20, "position": 20}
    assert [parse_prompt(p).category for p in held_out].count("single") == 3


# -- the judge ----------------------------------------------------------------------------------


def test_judge_passes_every_clean_render(prompts, renders):
    report = judge(renders, prompts)
    assert all(report.passed), [r for r in report.reasons if r][:3]
    for split in ("seen", "held_out"):
        assert report.scores()[split] == dict.fromkeys((*CATEGORIES, "overall"), 1.0)


def test_judge_is_robust_to_noise_and_soft_edges(prompts, renders):
    noise = np.random.default_rng(0).normal(0, 10, renders.shape)
    noisy = np.clip(renders + noise, 0, 255).round().astype(np.uint8)
    assert judge(noisy, prompts).accuracy("all") >= 0.95
    blurred = ndimage.gaussian_filter(renders.astype(float), (0, 0.5, 0.5, 0)).round().astype(np.uint8)
    assert judge(blurred, prompts).accuracy("all") >= 0.95
    assert judge(noisy.astype(np.float32) / 255, prompts).accuracy("all") >= 0.95  # floats in [0, 1]


def paint_orange_square(image):
    """The image with a 6x6 orange square in a corner far from every object (or None)."""
    for top, left in ((0, 0), (0, 26), (26, 0), (26, 26)):
        if not image[max(0, top - 2) : top + 8, max(0, left - 2) : left + 8].any():
            out = image.copy()
            out[top : top + 6, left : left + 6] = (255, 128, 0)
            return out
    return None


BROKEN = {  # rule: (prompt rendered, a change to the image, prompt judged)
    "wrong colour": ("a red circle", None, "a blue circle"),
    "wrong shape": ("a red circle", None, "a red square"),
    "fewer than rendered": ("three red circles", None, "two red circles"),
    "more than rendered": ("three red circles", None, "four red circles"),
    "wrong relation": ("a red circle left of a blue square", None, "a red circle right of a blue square"),
    "swapped relation": ("a green square above a white triangle", None, "a white triangle above a green square"),
    "extra object": ("a red circle and a blue square", None, "a red circle"),
    "missing object": ("a red circle", None, "a red circle and a blue square"),
    "empty image": ("a red circle", np.zeros_like, "a red circle"),
    "off-palette object": ("a red circle", paint_orange_square, "a red circle"),
    "upside-down triangle": ("a red triangle", np.flipud, "a red triangle"),
    "squashed square": ("a red square", lambda im: np.concatenate([im[::2], np.zeros_like(im[16:])]), "a red square"),
}


@pytest.mark.parametrize("rule", list(BROKEN))
def test_judge_fails_images_that_break_a_rule(rule):
    rendered, change, judged = BROKEN[rule]
    images = render_prompts([rendered] * 12, seed=9)
    if change is not None:
        images = np.stack([c for c in (change(image) for image in images) if c is not None])
        assert len(images) >= 6
    report = judge(images, [judged] * len(images))
    assert report.accuracy("all") == 0.0 and all(report.reasons)
    assert report.failures == [FAILURE_OF_RULE[rule]] * len(images)
    assert report.failure_counts()[FAILURE_OF_RULE[rule]] == len(images)
    assert f"failed, by the first rule broken: {FAILURES[FAILURE_OF_RULE[rule]]} {len(images)}" in report.format()


FAILURE_OF_RULE = {  # the failure each broken rule is counted under
    **dict.fromkeys(
        ("wrong colour", "wrong shape", "fewer than rendered", "more than rendered", "extra object", "missing object"),
        "wrong_objects",
    ),
    "wrong relation": "position",
    "swapped relation": "position",
    "empty image": "no_objects",
    "off-palette object": "off_palette",
    "upside-down triangle": "unknown_shape",
    "squashed square": "unknown_shape",
}


def test_failures_are_counted_per_split_and_clean_renders_have_none(prompts, renders):
    report = judge(renders, prompts)
    assert set(report.failures) == {""} and "failed" not in report.format()
    images = render_prompts(["a red circle", "a yellow triangle", "a red circle"], seed=0)
    images[1] = np.flipud(images[1])
    images[2] = 0
    report = judge(images, ["a red circle", "a yellow triangle", "a red circle"])
    assert report.failure_counts("seen") == {**dict.fromkeys(FAILURES, 0), "no_objects": 1}
    assert report.failure_counts("held_out") == {**dict.fromkeys(FAILURES, 0), "unknown_shape": 1}


def test_empty_images_fail_every_category():
    prompts = ["a red circle", "a red circle and a blue square", "two red circles", "a red circle above a blue square"]
    report = judge(np.zeros((4, 32, 32, 3), np.uint8), prompts)
    assert report.passed == [False] * 4 and report.reasons[0] == "no objects found"


def test_verdict_is_false_when_it_fails_and_says_why():
    image = render_prompts(["a red circle"], seed=0)[0]
    assert judge_image(image, "a red circle") and judge_image(image, "a red circle").reason == ""
    verdict = judge_image(image, "a blue circle")
    assert not verdict and "missing 1 blue circle" in verdict.reason and "extra red circle" in verdict.reason


def test_report_splits_seen_and_held_out():
    prompts = ["a red circle", "a yellow triangle", "two red squares", "a purple circle and a red square"]
    images = render_prompts(prompts, seed=0)
    images[2] = 0  # the counting image fails
    report = judge(images, prompts)
    assert report.held_out == [False, True, False, True]
    assert report.accuracy("seen", "single") == 1.0 and report.accuracy("seen", "counting") == 0.0
    assert report.accuracy("seen") == 0.5 and report.accuracy("held_out") == 1.0
    assert report.accuracy("seen", "position") is None and report.count("held_out") == 2
    table = report.format()
    assert "held-out" in table and "overall" in table and " - " in table
    assert judge(images, prompts, held_out=()).accuracy("held_out") is None
    with pytest.raises(ShapesError):
        judge(images[:3], prompts)


# -- commands ------------------------------------------------------------------------------------


def test_commands_write_prompts_render_them_and_judge_them(tmp_path, capsys):
    prompts_file, samples = tmp_path / "prompts.txt", tmp_path / "samples.npz"
    assert main(["shapes", "prompts", "--out", str(prompts_file), "--per-category", "3"]) == 0
    lines = prompts_file.read_text().splitlines()
    assert lines == [*evaluation_prompts(per_category=3).seen, *evaluation_prompts(per_category=3).held_out]
    assert main(["shapes", "render", "--prompts", str(prompts_file), "--seed", "2", "--out", str(samples)]) == 0
    with np.load(samples) as data:
        assert (data["arr_0"] == render_prompts(lines, 2)).all()
    capsys.readouterr()
    assert main(["eval-shapes", str(samples), str(prompts_file)]) == 0
    table = capsys.readouterr().out
    assert [line.split()[-1] for line in table.splitlines()[2:]] == ["1.000"] * 3
    assert main(["shapes", "render", "--prompts", str(prompts_file), "--out", str(samples)]) == 2  # no --force
    assert "pass --force" in capsys.readouterr().err


def test_commands_name_the_bad_line_and_refuse_mismatched_files(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("a red circle\na red circle beside a blue square\n")
    assert main(["shapes", "render", "--prompts", str(bad), "--out", str(tmp_path / "s.npz")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "line 2" in error and "a red circle beside a blue square" in error
    assert not (tmp_path / "s.npz").exists()
    good = tmp_path / "good.txt"
    good.write_text("a red circle\n")
    np.savez(tmp_path / "two.npz", arr_0=render_prompts(["a red circle"] * 2, 0))
    assert main(["eval-shapes", str(tmp_path / "two.npz"), str(good)]) == 2
    assert "one RGB image per line" in capsys.readouterr().err
    assert main(["eval-shapes", str(tmp_path / "two.npz"), str(good), "--held-out", "red hexagon"]) == 2

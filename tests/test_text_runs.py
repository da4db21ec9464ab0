"""Text-to-image runs end to end: configs with prompts, training (resumed exactly), the judge in the
training evaluation, sampling from prompts on the command line and in Python."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")

from dumo.conditioning import TextCondition  # noqa: E402
from dumo.config import config_from_dict, load_config  # noqa: E402
from dumo.data import build_dataset, build_stream, dataset_prompts  # noqa: E402
from dumo.data.shapes import CATEGORIES, names_held_out, parse_prompt  # noqa: E402
from dumo.errors import ConfigError, DumoError  # noqa: E402
from dumo.files import load_checkpoint  # noqa: E402
from dumo.network import build_network  # noqa: E402
from dumo.runs.layout import list_checkpoints  # noqa: E402
from dumo.training import Trainer  # noqa: E402

TINY = {
    "data": {"name": "shapes", "batch_size": 8},
    "model": {"name": "TextDiT-XS/4", "hidden_dim": 32, "depth": 1, "num_heads": 2},
    "text": {"width": 16, "depth": 1, "heads": 2, "max_tokens": 10},
    "objective": {"name": "dumo"},
    "train": {"steps": 2, "log_every": 1, "checkpoint_every": 2, "progress": False, "ema_decay": 0.9},
}


def tiny(**sections):
    raw = json.loads(json.dumps(TINY))
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)


def run_main(capsys, *args):
    from dumo.cli import main

    status = main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("text") / "run"
    Trainer(tiny(), run).run()
    return run


@pytest.fixture(scope="module")
def class_run(tmp_path_factory, request):
    run = tmp_path_factory.mktemp("class") / "run"
    config = load_config(
        request.config.rootpath / "configs/toy/moons-dumo.yaml",
        ["data.conditional=true", "train.steps=1", "train.progress=false", "model.hidden_dim=16", "model.depth=1"],
    )
    Trainer(config, run).run()
    return run


# -- configs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": {"name": "DiT-XS/4"}}, "conditions on prompts: set model.name to a TextDiT"),
        ({"data": {"held_out": ["yellow hexagon"]}}, "held-out pair 'yellow hexagon'"),
        ({"data": {"prompt_mix": {"sizes": 1}}}, "prompt_mix: unknown category"),
        ({"data": {"prompt_mix": {"single": 0}}}, "at least one category"),
        ({"data": {"conditional": True}}, "conditions on its prompts: remove it"),
        ({"text": {"encoder": "pretrained"}}, "needs text.path"),
        ({"text": {"width": 10, "heads": 4}}, "must be divisible by heads"),
        ({"model": {"head_blocks": 1}}, "head_blocks applies to DiT models only"),
    ],
)
def test_configs_that_cannot_work_fail_in_one_line(change, message):
    with pytest.raises(ConfigError, match=message) as caught:
        tiny(**change)
    assert "\n" not in str(caught.value)


def test_text_section_is_refused_for_data_without_prompts_and_left_out_of_their_configs():
    with pytest.raises(ConfigError, match="text section applies to data with prompts"):
        config_from_dict({"data": {"name": "digits"}, "text": {"width": 32}})
    with pytest.raises(ConfigError, match="is conditioned on prompts; data.name=digits has none"):
        config_from_dict({"data": {"name": "digits"}, "model": {"name": "TextDiT-XS/2"}})
    assert "text" not in config_from_dict({"data": {"name": "digits"}}).to_dict()
    assert tiny().to_dict()["text"]["width"] == 16


def test_shapes_batches_carry_token_ids_and_resume_exactly():
    config = tiny(data={"held_out": ["red circle"], "prompt_mix": {"single": 1, "counting": 1}})
    dataset = build_dataset(config.data)
    prompts = dataset_prompts(dataset, config.text)
    stream = build_stream(dataset, config.data, seed=3, prompts=prompts)
    first = stream.next_batch()
    assert first.x.shape == (8, 3, 32, 32) and isinstance(first.cond, TextCondition)
    assert first.cond.tokens.dtype == torch.long and first.cond.tokens.shape == (8, 10)
    assert first.cond.mask[:, 0].all() and not first.cond.mask.all()  # padded after each prompt
    state = stream.state()
    second = stream.next_batch()
    again = build_stream(dataset, config.data, seed=3, prompts=prompts)
    again.load_state(state)
    third = again.next_batch()
    assert torch.equal(second.x, third.x) and torch.equal(second.cond.tokens, third.cond.tokens)
    texts = [dataset.samples(3, 0, 64)[1]][0]
    specs = [parse_prompt(text) for text in texts]
    assert {spec.category for spec in specs} == {"single", "counting"}  # the mix leaves the others out
    assert not any(names_held_out(spec, [("red", "circle")]) for spec in specs)


def test_caption_folders_and_manifests_train_with_their_own_vocabulary(tmp_path):
    from PIL import Image

    folder = tmp_path / "captions"
    folder.mkdir()
    lines = []
    for i, caption in enumerate(["a red cat", "a blue dog on a mat", "the red dog"]):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
        lines.append(json.dumps({"image": f"captions/{i}.png", "text": caption.upper()}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    for path in (folder, tmp_path / "m.jsonl"):
        config = tiny(data={"name": "captions", "path": str(path), "batch_size": 4}, model={"name": "TextDiT-XS/2"})
        dataset = build_dataset(config.data)
        prompts = dataset_prompts(dataset, config.text)
        assert prompts.tokenizer.vocab_size == 2 + 8  # [PAD], [UNK] and the captions' words, lower-cased
        batch = build_stream(dataset, config.data, 0, prompts).next_batch()
        assert batch.x.shape == (4, 3, 8, 8) and batch.cond.tokens.shape == (4, 10)
        Trainer(config, tmp_path / f"run-{path.stem}").run()  # trains, and the captions are not scored
        assert not (tmp_path / f"run-{path.stem}" / "eval_log.csv").exists()


def test_a_frozen_pretrained_encoder_feeds_cached_embeddings(tmp_path):
    pytest.importorskip("transformers")
    from helpers.text_encoders import WIDTH, save_t5

    folder = save_t5(tmp_path / "t5")
    config = tiny(text={"encoder": "pretrained", "path": str(folder), "cache": str(tmp_path / "cache")})
    dataset = build_dataset(config.data)
    prompts = dataset_prompts(dataset, config.text)
    assert prompts.spec.text_dim == WIDTH and prompts.spec.fingerprint
    batch = build_stream(dataset, config.data, 0, prompts).next_batch()
    assert batch.cond.tokens.shape == (8, 10, WIDTH) and batch.cond.tokens.dtype == torch.float32
    assert any((tmp_path / "cache").rglob("shard-*.safetensors"))  # computed once, kept on disk
    network = build_network(config, dataset.shape, 0, prompts.spec)
    assert network.backbone.text.encoder is None  # nothing of the frozen encoder is trained
    Trainer(config, tmp_path / "run").run()


# -- the network, checkpoints, the training evaluation ----------------------------------------------


def test_the_network_needs_the_text_encoder_and_keeps_both_dumo_heads():
    config = tiny()
    dataset = build_dataset(config.data)
    spec = dataset_prompts(dataset, config.text).spec
    with pytest.raises(ConfigError, match="reads prompts"):
        build_network(config, dataset.shape)
    network = build_network(config, dataset.shape, 0, spec)
    assert tuple(network.heads) == ("v", "u") and network.backbone.text.encoder is not None
    assert network.backbone.text.text_dim == 16  # the small encoder's width


def test_text_runs_resume_exactly_and_record_the_tokenizer(tmp_path):
    Trainer(tiny(train={"steps": 4}), tmp_path / "straight").run()
    Trainer(tiny(train={"steps": 2}), tmp_path / "split").run()
    Trainer(tiny(train={"steps": 4}), tmp_path / "split").run()
    a, meta = load_checkpoint(list_checkpoints(tmp_path / "straight")[-1])
    b, _ = load_checkpoint(list_checkpoints(tmp_path / "split")[-1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".text.encoder." in key for key in a)  # the small encoder trains with the model
    record = json.loads(meta["data"])["text"]
    assert record["encoder"] == "small" and '"circle"' in record["tokenizer"]


def test_training_evaluation_logs_the_judges_accuracy_per_nfe(text_run):
    header, row = (text_run / "eval_log.csv").read_text().splitlines()[:2]
    assert header == "step,seen_1nfe,held_out_1nfe,seen_2nfe,held_out_2nfe"
    assert all(0 <= float(value) <= 1 for value in row.split(",")[1:])
    assert any((text_run / "samples").glob("step_*.png"))


# -- sampling --------------------------------------------------------------------------------------


def test_python_api_draws_prompts_as_the_command_line_does(text_run, tmp_path, capsys):
    import dumo

    model = dumo.load(text_run)
    prompts = ["a red circle", "two blue squares", "a green circle left of a white square"]
    images = model.generate(prompts=prompts, nfe=2, guidance=2.0, seed=5)
    assert images.shape == (3, 3, 32, 32)
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "s.npz"
    status, _, err = run_main(
        capsys, "sample", text_run, "--nfe", 2, "--prompts", tmp_path / "p.txt", "--guidance", 2, "--seed", 5,
        "--out", out,
    )  # fmt: skip
    assert status == 0, err
    with np.load(out) as data:
        assert list(data["prompts"]) == prompts and data["arr_0"].dtype == np.uint8
        expected = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert np.array_equal(data["arr_0"], expected)
    unguided = model.generate(prompts=prompts, nfe=2, seed=5)
    assert not torch.equal(images, unguided)  # the guidance scale reached the sampler
    one = model.generate(3, prompts="a red circle", nfe=1)
    assert one.shape == (3, 3, 32, 32)


def test_per_prompt_keeps_prompt_order_in_png_folders_and_grids(text_run, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red circle\nthree white squares\n")
    folder = tmp_path / "pngs"
    status, out, err = run_main(
        capsys, "sample", text_run, "--nfe", 1, "--prompts", tmp_path / "p.txt", "--per-prompt", 2, "--out", folder
    )
    assert status == 0, err
    assert sorted(p.name for p in folder.iterdir()) == [
        "000000.png",
        "000001.png",
        "000002.png",
        "000003.png",
        "prompts.txt",
    ]
    assert (folder / "prompts.txt").read_text().splitlines() == ["a red circle"] * 2 + ["three white squares"] * 2
    grid = tmp_path / "g.png"
    status, _, err = run_main(
        capsys, "sample", text_run, "--nfe", 2, "--prompt", "a red circle", "-n", 3, "--out", grid
    )
    assert status == 0 and grid.read_bytes()[:4] == b"\x89PNG", err


@pytest.mark.parametrize("head", ["u", "v"])
def test_the_one_and_two_step_and_velocity_samplers_take_prompts(text_run, tmp_path, capsys, head):
    out = tmp_path / "s.npz"
    status, stdout, err = run_main(
        capsys, "sample", text_run, "--nfe", 2, "--head", head, "--prompt", "a blue square", "-n", 2, "--out", out
    )
    assert status == 0, err
    assert np.load(out)["arr_0"].shape == (2, 32, 32, 3)


def test_prompts_and_classes_are_refused_where_they_do_not_belong(text_run, class_run, tmp_path, capsys):
    out = tmp_path / "x.npz"
    cases = [
        ((text_run, "--out", out), "give --prompt TEXT or --prompts FILE"),
        ((text_run, "--class", "1", "--out", out), "this run is conditioned on prompts"),
        ((text_run, "--prompt", "a red circle", "--per-prompt", 2, "--out", out), "--per-prompt goes with --prompts"),
        ((class_run, "--prompt", "a red circle", "--out", tmp_path / "x.npy"), "class-conditional (use --class)"),
    ]
    for args, message in cases:
        status, _, err = run_main(capsys, "sample", args[0], "--nfe", 1, *args[1:])
        assert status == 2 and message in err and err.count("\n") == 1, err
    import dumo

    with pytest.raises(DumoError, match="class-conditional"):
        dumo.load(class_run).generate(2, prompts=["a red circle"])
    with pytest.raises(DumoError, match="conditioned on prompts"):
        dumo.load(text_run).generate(2, classes=[1])


def test_eval_judges_seen_and_held_out_prompts(text_run, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red circle\na yellow triangle\n")
    report = tmp_path / "scores.json"
    status, out, err = run_main(
        capsys, "eval", text_run, "--nfe", 1, "--prompts", tmp_path / "p.txt", "--per-prompt", 2, "--json", report
    )
    assert status == 0, err
    assert "4 images" in out and "held-out" in out and "overall" in out
    scores = json.loads(report.read_text())["nfe"]["1"]
    assert set(scores) == {"seen", "held_out", "all"} and set(scores["seen"]) == {*CATEGORIES, "overall"}
    failed = json.loads(report.read_text())["failures"]["1"]
    passed = round(scores["all"]["single"] * 4)  # both prompts are single objects
    assert set(failed) == {"seen", "held_out", "all"} and sum(failed["all"].values()) == 4 - passed
    assert sum(failed["seen"].values()) + sum(failed["held_out"].values()) == sum(failed["all"].values())
    status, out, err = run_main(capsys, "eval", text_run, "--nfe", 2)  # the world's evaluation prompts
    assert status == 0 and "seen           111" in out, err


def test_an_export_samples_prompts_with_nothing_but_itself(text_run, tmp_path):
    import dumo
    from dumo.runs.loading import export_run

    export_run(text_run, tmp_path / "export")
    prompts = ["a purple circle", "four red triangles"]
    exported = dumo.load(tmp_path / "export").generate(prompts=prompts, nfe=1)
    assert torch.equal(exported, dumo.load(text_run).generate(prompts=prompts, nfe=1))

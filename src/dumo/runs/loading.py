"""Reading a finished (or running) run directory back: config, EMA weights, data."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from dumo.config import Config, config_differences, config_from_dict, load_config, save_config
from dumo.data import Dataset, Prompts, SampleSpace, build_dataset
from dumo.errors import ConfigError, RunDirError, SamplingError
from dumo.files import MODEL_FORMAT, load_checkpoint, save_checkpoint
from dumo.network import build_network
from dumo.runs.checkpoints import load_weights, saved_state, unprefixed
from dumo.runs.folder import RESUMABLE_KEYS
from dumo.runs.layout import CHECKPOINT_DIR, CONFIG_FILE, EXPORTED_WEIGHTS, list_checkpoints

#: data.* keys that say where files are: config.yaml's values win where it sets them (the data or the
#: decoder may have moved since training)
LOCATION_KEYS = ("path", "autoencoder_path")
#: keys in which a run's config.yaml may lawfully differ from an older checkpoint of the same run
#: (changed on resume: train.steps and the like; the per-rank batch on another number of ranks)
RESUMED_KEYS = tuple(key for key in RESUMABLE_KEYS if key != "data.path") + ("data.batch_size",)
SHOWN_KEYS = 12  # differing keys named in the warning


@dataclass
class LoadedRun:
    config: Config
    model: nn.Module
    space: SampleSpace  # shape, classes and the way back to data, from the weights' own record
    num_classes: int  # classes the model is conditioned on (0: unconditional)
    step: int
    checkpoint: Path
    _dataset: Dataset | None = field(default=None, repr=False)
    _prompts: Prompts | None = field(default=None, repr=False)

    @property
    def objective_name(self) -> str:
        return self.config.objective.name

    @property
    def is_text(self) -> bool:
        """Whether the model is conditioned on prompts."""
        return self.space.text is not None

    @property
    def conditional(self) -> bool:
        """Whether the model is conditioned (on class labels or prompts): what guidance needs."""
        return self.num_classes > 0 or self.is_text

    def prompt_condition(self, prompts: Sequence[str]):
        """``prompts`` as this run's network reads them (a TextCondition on the run's device), encoded
        with the tokenizer recorded in the weights or the frozen encoder the run was trained with."""
        if not self.is_text:
            kind = "class-conditional (give classes)" if self.num_classes else "unconditional"
            raise SamplingError(f"prompts given but this model is {kind}, not conditioned on text")
        if not prompts:
            raise SamplingError("no prompts given")
        if self._prompts is None:
            self._prompts = Prompts(self.space.text_spec, self.config.text)
        return self._prompts.condition(list(prompts)).to(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def choose_sampling(
        self,
        head: str | None = None,
        guidance: float | None = None,
        head_option: str = "head",
        guidance_option: str = "guidance",
    ) -> None:
        """Sample with ``head`` and the guidance scale ``guidance`` from now on (None: the config's own),
        as :func:`dumo.sampling.choose_sampling` checks them."""
        from dumo.sampling import choose_sampling

        self.config.sample = choose_sampling(
            self.config.sample, self.model, self.conditional, head, guidance, head_option, guidance_option
        )

    @property
    def dataset(self) -> Dataset:
        """The training data itself (read on first use: scoring needs it, sampling does not)."""
        if self._dataset is None:
            self._dataset = build_dataset(self.config.data)
        return self._dataset


def recorded_config(metadata: dict[str, str]) -> Config | None:
    """The config recorded in a checkpoint's or export's metadata; None when there is none (weights
    of an older dumo, imported weights) or it no longer reads."""
    try:
        return config_from_dict(json.loads(metadata["config"]))
    except (KeyError, ValueError, ConfigError):
        return None


def run_config(config_file: Path, metadata: dict[str, str], weights: Path) -> Config:
    """The config to sample and score the weights with: the one recorded in them (what they were
    trained with), taking only the data's locations from ``config_file``.

    A truncated or hand-edited config.yaml would otherwise fill defaults unnoticed (another
    guidance scale, sampler times, even another dataset's coordinates); where it disagrees with the
    record, or cannot be read, one warning line names the keys. Weights that record no config use
    ``config_file`` as it is.
    """
    stored = recorded_config(metadata)
    if stored is None:
        return load_config(config_file)
    try:
        on_disk = load_config(config_file)
    except ConfigError as error:
        warn(f"{config_file} is unreadable ({error}); using the config recorded in {weights}")
        return stored
    locations = {key: getattr(on_disk.data, key) for key in LOCATION_KEYS if getattr(on_disk.data, key) is not None}
    config = dataclasses.replace(stored, data=dataclasses.replace(stored.data, **locations))
    differences = config_differences(config, on_disk, ignore=RESUMED_KEYS)
    if differences:
        shown = ", ".join(differences[:SHOWN_KEYS])
        more = f" and {len(differences) - SHOWN_KEYS} more" if len(differences) > SHOWN_KEYS else ""
        warn(f"{config_file} differs from the config recorded in {weights} in {shown}{more}; using the recorded one")
    return config


def warn(message: str) -> None:
    """One warning line on stderr, from the first process only (under torchrun every rank loads the run)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"dumo: warning: {message}", file=sys.stderr, flush=True)


def is_model_file(path: Path) -> bool:
    """Whether ``path`` is a weights-only dumo file (an export or an EMA snapshot), by its format tag;
    anything unreadable is left to :func:`load_checkpoint` to report."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("format") == MODEL_FORMAT
    except Exception:  # not a file, or not safetensors: load_checkpoint names the problem
        return False


def load_run(
    run_dir: str | Path, checkpoint: str | Path | None = None, weights: str = "ema", device: str = "cpu"
) -> LoadedRun:
    """The model of a run directory (EMA or raw weights of its latest checkpoint) or of an
    exported model directory (its EMA weights). Needs no training data when the weights record
    their data (every checkpoint and export written by this version does)."""
    run_dir = Path(run_dir).expanduser()
    if run_dir.is_file() and run_dir.suffix == ".safetensors":
        folder = run_dir.parent.parent if run_dir.parent.name == CHECKPOINT_DIR else run_dir.parent
        raise RunDirError(
            f"{run_dir} is a weights file; give the run folder and the file: '{folder} --checkpoint {run_dir}'"
        )
    if not run_dir.is_dir():
        raise RunDirError(f"run directory not found: {run_dir}")
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunDirError(f"{run_dir} is not a dumo run directory (no {CONFIG_FILE})")
    if checkpoint is None and (run_dir / EXPORTED_WEIGHTS).is_file():
        checkpoint = run_dir / EXPORTED_WEIGHTS
        tensors, metadata = load_checkpoint(checkpoint, kind=MODEL_FORMAT)
        weights = ""
    else:
        if checkpoint is None:
            found = list_checkpoints(run_dir)
            if not found:
                raise RunDirError(f"{run_dir} has no checkpoints yet; train it first")
            checkpoint = found[-1]
        checkpoint = Path(checkpoint).expanduser()
        if is_model_file(checkpoint):  # an EMA snapshot (RUN/snapshots, fp16) or an export's weights
            if weights != "ema":
                raise RunDirError(f"{checkpoint} holds only EMA weights; leave out --weights {weights}")
            tensors, metadata = load_checkpoint(checkpoint, kind=MODEL_FORMAT)
            weights = ""
        else:
            tensors, metadata = load_checkpoint(checkpoint)
            weights = f"{weights}."
    config = run_config(run_dir / CONFIG_FILE, metadata, Path(checkpoint))
    if metadata.get("prediction") == "epsilon":  # an imported DiT ('dumo import-weights dit')
        warn(
            f"{checkpoint} holds DiT's noise (epsilon) predictor in its v-head, not a velocity: its samples are "
            "noise-like; it is a starting point for fine-tuning (train.init_from)"
        )
    dataset = None
    if "data" in metadata:
        space = SampleSpace.from_json(metadata["data"])
    else:  # older weights: the data itself tells
        dataset = build_dataset(config.data)
        space = SampleSpace.of(dataset)
    if space.autoencoder is not None and config.data.autoencoder_path:
        space.autoencoder["path"] = config.data.autoencoder_path  # the decoder moved
    classes = space.num_classes if config.data.conditional else 0
    model = build_network(config, space.shape, classes, space.text_spec)
    if "pretrained" in metadata:  # a diffusers model: its frozen weights come from that pipeline folder
        from dumo.bridge.build import check_pretrained

        check_pretrained(model, json.loads(metadata["pretrained"]), str(checkpoint))
    load_weights(model, unprefixed(tensors, weights), str(checkpoint))
    model.to(torch.device(device)).eval().requires_grad_(False)
    return LoadedRun(config, model, space, classes, int(metadata["step"]), Path(checkpoint), dataset)


def export_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the EMA weights of a run's latest checkpoint and its config to ``out_dir``.

    The result is all ``dumo sample`` needs: the weights record the data's shape, classes (and
    their names), standardisation and autoencoder; no optimiser state, no RNG state, no data.
    """
    run = load_run(run_dir)
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise RunDirError(f"{out_dir} exists and is not empty; choose another output directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(run.config, out_dir / CONFIG_FILE)
    path = out_dir / EXPORTED_WEIGHTS
    metadata = {"step": str(run.step), "config": json.dumps(run.config.to_dict()), "data": run.space.to_json()}
    pretrained = getattr(run.model, "pretrained_record", None)
    if pretrained is not None:
        metadata["pretrained"] = json.dumps(pretrained)
    save_checkpoint(path, saved_state(run.model), metadata, kind=MODEL_FORMAT)
    return path


class Model:
    """A trained model ready to sample: ``dumo.load("runs/x").generate(16, nfe=1)``."""

    def __init__(self, run: LoadedRun):
        self.run = run

    @property
    def config(self) -> Config:
        return self.run.config

    @property
    def class_names(self) -> list[str] | None:
        return self.run.space.class_names

    @property
    def num_classes(self) -> int:
        return self.run.num_classes

    def generate(
        self,
        num: int | None = None,
        nfe: int = 1,
        classes: Sequence[int | str] | int | str | None = None,
        seed: int = 0,
        method: str = "auto",
        guidance: float | None = None,
        batch_size: int = 256,
        prompts: Sequence[str] | str | None = None,
    ) -> Tensor:
        """``num`` samples in the data's own space: images (N, C, H, W) in [0, 1] (decoded for latent
        models) or 2-D points in the dataset's coordinates.

        ``classes``: one class or one per sample (indices or names); default balanced over classes.
        ``prompts`` (a text-conditioned model): one prompt for all ``num`` samples, or one per sample
        (``num`` defaults to their number). The samples are those ``dumo sample`` writes with the same
        seed and batch size.
        """
        from dumo.sampling import balanced_labels, choose_sampling, generate_many

        if prompts is not None:
            if classes is not None:
                raise ConfigError("give classes or prompts, not both")
            texts = [prompts] if isinstance(prompts, str) else list(prompts)
            num = len(texts) if num is None else num
            if len(texts) not in (1, num):
                raise SamplingError(f"give one prompt or one per sample ({num}); got {len(texts)}")
        elif self.run.is_text:
            if classes is not None:
                raise ConfigError("classes given but the model is conditioned on prompts (give prompts)")
            raise SamplingError("this model draws from prompts: give prompts=[...]")
        if num is None:
            raise SamplingError("give the number of samples (num)")
        if num < 1:
            raise SamplingError(f"num must be >= 1; got {num}")
        sample_config = choose_sampling(self.run.config.sample, self.run.model, self.run.conditional, guidance=guidance)
        labels = balanced_labels(num, self.num_classes)
        if prompts is not None:
            labels = self.run.prompt_condition(texts * num if len(texts) == 1 else texts)
        elif classes is not None:
            if self.num_classes == 0:
                raise ConfigError("classes given but the model is unconditional")
            chosen = [classes] if isinstance(classes, (int, str)) else list(classes)
            index = [self.run.space.class_label(str(c)) for c in chosen]
            if any(not 0 <= i < self.num_classes for i in index):
                raise ConfigError(f"classes must lie in [0, {self.num_classes - 1}]; got {index}")
            if len(index) not in (1, num):
                raise ConfigError(f"give one class or one per sample ({num}); got {len(index)}")
            labels = torch.tensor(index * num if len(index) == 1 else index, dtype=torch.long)
        points = generate_many(
            self.run.model,
            self.run.objective_name,
            (num, *self.run.space.shape),
            nfe,
            sample_config,
            seed,
            None if labels is None else labels.to(self.run.device),  # class labels or prompts
            method,
            device=self.run.device,
            batch_size=batch_size,
        )
        return self.run.space.unstandardise(points).cpu()


def load(path: str | Path, device: str = "cpu", weights: str = "ema", checkpoint: str | Path | None = None) -> Model:
    """A run folder or an export, ready to ``generate``; see :class:`Model`."""
    return Model(load_run(path, checkpoint, weights, device))

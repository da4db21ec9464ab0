"""The training loop: AdamW, EMA, periodic evaluation, CSV logs, atomic checkpoints, exact resume."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from dumo.config import Config, config_differences, config_from_dict, save_config
from dumo.data import LatentDataset, SampleSpace, build_dataset, build_stream, conditioning_classes
from dumo.distributed import from_environment, resolve_device, shard_randomness, shard_seed
from dumo.errors import CheckpointError, ConfigError, DiskFullError, DumoError, MetricsError, RunDirError, TrainingError
from dumo.evaluation import evaluate
from dumo.files import (
    MODEL_FORMAT,
    CorruptCheckpointError,
    atomic_output,
    atomic_write,
    load_checkpoint,
    save_checkpoint,
)
from dumo.network import build_network
from dumo.objectives import build_objective
from dumo.runs.checkpoints import (
    agreed_checkpoint,
    load_weights,
    optimizer_state_dict,
    optimizer_tensors,
    prefixed,
    unprefixed,
)
from dumo.runs.folder import (
    RESUMABLE_KEYS,
    RunLock,
    check_global_batch,
    check_run_dir,
    prepare_run_dir,
    record_start,
    remove_torn_writes,
)
from dumo.runs.layout import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    CORRUPT_SUFFIX,
    EVAL_LOG,
    SAMPLES_DIR,
    TEACHER_FILE,
    TENSORBOARD_DIR,
    TRAIN_LOG,
    checkpoint_path,
    list_checkpoints,
    snapshot_path,
)
from dumo.sampling import is_guided, sampling_cost
from dumo.training.ema import EMA
from dumo.training.initialise import initial_weights
from dumo.training.parallel import (
    full_model_state,
    full_optimizer_state,
    full_tensor,
    load_full_optimizer_state,
    set_gradient_sync,
    wrap_for_training,
)
from dumo.training.snapshots import save_snapshot, snapshot_due, snapshot_metadata
from dumo.training.throughput import ThroughputMeter
from dumo.version import __version__

#: exit status of ``dumo train`` when it stopped before train.steps because train.max_minutes was spent
#: (a signal gives 128 + its number: 130 for SIGINT, 143 for SIGTERM)
EXIT_OUT_OF_TIME = 3
#: what rank 0 broadcasts instead of a checkpoint step when it starts afresh, or could not choose one
NO_CHECKPOINT, RANK0_FAILED = -1, -2


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_batch_fits(config: Config, shape: tuple[int, ...], shards: int = 1) -> None:
    """Refuse a batch whose tensors alone exceed this machine's memory, before anything is allocated
    (a batch of 10**9 would otherwise be killed by the kernel, or end in an allocator traceback).

    The estimate is a lower bound: the data-sized tensors of one step (x, noise, x_t, targets,
    passes: 16 of them) plus one activation per block of the network (mlp, DiT; width x tokens).
    """
    total = physical_memory()
    if total is None:
        return
    rows = config.data.batch_size // max(shards, 1)  # what one accumulated shard of one process runs
    need = config.data.batch_size * 16 * math.prod(shape) * 4  # the stream draws the global batch at once
    model, activation = config.model, 0
    if model.name == "mlp":
        activation = 4 * (model.hidden_dim or 256) * (model.depth if model.depth is not None else 4) * 4
    elif model.name != "unet" and len(shape) == 3:
        size, patch = model.dit_size(), int(model.name.rsplit("/", 1)[1])
        activation = 4 * (shape[1] // patch) * (shape[2] // patch) * size.hidden_dim * size.depth * 4
    need += rows * activation
    if need > total:
        raise ConfigError(
            f"data.batch_size={config.data.batch_size} needs at least {need / 1e9:.1f} GB for one step, more than "
            f"this machine's {total / 1e9:.1f} GB of memory: lower data.batch_size (or use train.grad_accumulation)"
        )


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None
    interrupted: bool = False
    seconds: float = 0.0
    signal: int | None = None  # the signal that stopped the run, if one did
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient, over the whole run
    already_done: bool = False  # the run was already at or past train.steps: nothing was trained
    note: str | None = None  # a caveat about the metrics, for the person reading them

    @property
    def exit_status(self) -> int:
        """0 when the run reached train.steps; else 128 + the signal, or 3 when train.max_minutes ran out,
        so that a scheduler requeues a preempted run instead of taking it for finished."""
        if not self.interrupted:
            return 0
        return 128 + self.signal if self.signal is not None else EXIT_OUT_OF_TIME


class Trainer:
    """Owns the model, EMA, optimiser and data stream of one run directory."""

    def __init__(self, config: Config, run_dir: str | Path):
        self.config = config
        self.run_dir = Path(run_dir)
        self.dist = from_environment()
        self.device = resolve_device(config.train.device, self.dist.local_rank)
        if config.train.tf32 and self.device.type == "cuda":
            # TF32 matmuls and convolutions for every fp32 computation; the target passes follow
            # objective.target_precision (fp32 keeps them exact) whatever this says.
            torch.set_float32_matmul_precision("high")
            torch.backends.cudnn.allow_tf32 = True
        self.shards = self.dist.world_size * config.train.grad_accumulation
        if config.data.batch_size % self.shards:
            raise ConfigError(
                f"data.batch_size {config.data.batch_size} (the global batch) must be divisible by "
                f"{self.dist.world_size} ranks x train.grad_accumulation {config.train.grad_accumulation}"
            )
        if config.train.tensorboard and self.dist.is_main:
            summary_writer_class()  # a missing package fails here, before the run folder is touched
        self.tensorboard = None  # the SummaryWriter of a run with train.tensorboard (rank 0, while it runs)
        torch.manual_seed(config.train.seed)
        self.dataset = build_dataset(config.data)
        check_batch_fits(config, self.dataset.shape, self.shards)
        self.num_classes = conditioning_classes(self.dataset, config.data)
        self.objective = build_objective(config.objective, self.num_classes)
        if self.objective.wants_teacher() and config.train.init_from is None:
            asking = [f"objective.{key}=teacher" for key, value in vars(config.objective).items() if value == "teacher"]
            named = " and ".join(asking) or "this objective"
            verb = "need" if len(asking) > 1 else "needs"
            raise ConfigError(f"{named} {verb} train.init_from (the teacher is the frozen initial weights)")
        self.teacher: nn.Module | None = None  # set in run(): from init_from, or from the run folder on resume
        self.model = self.build_plain_model().to(self.device)
        self.ema = EMA(self.model, config.train.ema_decay, config.train.ema_warmup)
        self.sharded = self.dist.enabled and config.train.parallel == "fsdp"
        if config.train.parallel == "fsdp" and self.objective.needs_forward_ad():
            # refused in a single process too (where FSDP is not applied): the config fails alike everywhere
            raise ConfigError(
                "train.parallel=fsdp needs objective.derivative=finite_difference: "
                "forward-mode AD (jvp) cannot run through FSDP's parameter gathering"
            )
        if self.dist.is_main:
            for line in ineffective_settings(config, self.num_classes, self.dist.enabled):
                print(f"dumo: warning: {line}", file=sys.stderr, flush=True)
        # The objective calls the DDP-wrapped or FSDP-sharded (and/or compiled) module, so that
        # gradients are reduced over ranks whatever the objective does (its exact-JVP pass
        # included). Under FSDP the EMA copy is sharded the same way, so its update stays local.
        param_dtype = torch.bfloat16 if config.train.fsdp_param_dtype == "bf16" else None
        fsdp_bf16 = config.train.parallel == "fsdp" and param_dtype is not None
        if fsdp_bf16 and self.objective.target_precision() not in (None, "bf16"):
            raise ConfigError(
                "train.fsdp_param_dtype=bf16 runs the blocks in bf16 in every pass, the target passes included: "
                "set objective.target_precision=bf16 to accept that, or keep fsdp_param_dtype=fp32"
            )
        self.parallel_model = wrap_for_training(self.model, self.dist, config.train.parallel, self.device, param_dtype)
        if self.sharded:
            wrap_for_training(self.ema.model, self.dist, "fsdp", self.device, param_dtype)
        self.step_model = torch.compile(self.parallel_model) if config.train.compile else self.parallel_model
        # theta^- for the no-grad target passes. Under DDP they use the unwrapped module: they need
        # no gradient averaging, and DDP's forward cannot run inside torch.func.jvp. Under FSDP
        # the sharded module itself serves (every rank runs the same passes).
        self.target_model: nn.Module | None = None
        if self.objective.target_network() == "ema":
            self.target_model = self.ema.model
        elif self.dist.enabled and not self.sharded:
            self.target_model = torch.compile(self.model) if config.train.compile else self.model
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=config.optim.lr,
            betas=config.optim.betas,
            weight_decay=config.optim.weight_decay,
            eps=config.optim.eps,
            fused=self.device.type == "cuda",  # one kernel for all parameters; CPU keeps the foreach default
        )
        self.stream = build_stream(self.dataset, config.data, seed=config.train.seed + 1)
        self.space = SampleSpace.of(self.dataset)
        self.wall_seconds = 0.0  # training time over every invocation of this run
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.skipped_steps = 0
        self._stop_signal: int | None = None

    # -- checkpoints ---------------------------------------------------------------------------

    def build_plain_model(self) -> nn.Module:
        """A freshly initialised, unwrapped network of this run's architecture."""
        return build_network(self.config, self.dataset.shape, self.num_classes)

    def scratch_model(self) -> nn.Module:
        """A network of this run's architecture built without touching the run's random stream
        (its initial values are overwritten anyway), so that a resumed run draws what the
        uninterrupted one drew."""
        with torch.random.fork_rng(devices=[]):
            return self.build_plain_model()

    def save(self) -> Path | None:
        """Write a checkpoint from rank 0. Under FSDP every rank must call it (gathering is collective)."""
        model_state = full_model_state(self.model)
        ema_state = full_model_state(self.ema.model)
        optimizer_state = full_optimizer_state(self.model, self.optimizer)
        if not self.dist.is_main:
            return None
        tensors = {
            **prefixed(model_state, "model."),
            **prefixed(ema_state, "ema."),
            "rng.torch": torch.get_rng_state(),
            "rng.data": self.stream.state(),
        }
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        optimizer_flat, param_groups = optimizer_tensors(optimizer_state)
        tensors.update(optimizer_flat)
        metadata = {
            "step": str(self.step),
            "skipped_steps": str(self.skipped_steps),
            "optimizer_param_groups": param_groups,
            "config": json.dumps(self.config.to_dict()),
            "data": self.space.to_json(),  # what sampling needs without the data (see dumo.data.space)
            "dumo_version": __version__,
            "wall_seconds": repr(self.wall_seconds),
        }
        path = checkpoint_path(self.run_dir, self.step)
        try:
            save_checkpoint(path, tensors, metadata)
        except DiskFullError as error:
            kept = list_checkpoints(self.run_dir)
            resume = f"; {kept[-1].name} is intact: free some space and resume" if kept else ""
            raise DiskFullError(f"{error}{resume}") from error
        for old in list_checkpoints(self.run_dir)[: -self.config.train.keep_checkpoints]:
            old.unlink(missing_ok=True)
        return path

    def initialise_from(self, path: str) -> None:
        """Load the weights at ``path`` into model and EMA before step 0 (see dumo.training.initialise)."""
        model_config = self.config.model
        weights = initial_weights(path, self.scratch_model(), model_config.u_head_init, model_config)
        load_weights(self.model, weights.state, str(weights.source))
        load_weights(self.ema.model, weights.state, str(weights.source))
        if self.objective.wants_teacher() and self.dist.is_main:
            save_checkpoint(self.run_dir / TEACHER_FILE, weights.state, {"step": "0"}, kind=MODEL_FORMAT)
        if self.dist.is_main:
            print(f"init_from: {weights.summary()}", flush=True)

    def load_teacher(self) -> None:
        """The frozen teacher from the run folder (written when the run started from init_from)."""
        path = self.run_dir / TEACHER_FILE
        if not path.is_file():
            raise RunDirError(f"{self.run_dir} has no {TEACHER_FILE}; the objective needs the teacher to resume")
        teacher = self.scratch_model()
        load_weights(teacher, load_checkpoint(path, kind=MODEL_FORMAT)[0], str(path))
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)

    def restore(self, path: Path) -> None:
        """Load the training state at ``path`` into this rank (under FSDP every rank must call it)."""
        self._load_state(path, *self.read_checkpoint(path))

    def read_checkpoint(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors and metadata at ``path``, verified and checked against this run; nothing loaded yet
        (and nothing collective: ranks may do it apart and then agree on the outcome)."""
        tensors, metadata = load_checkpoint(path)
        self.check_matches(path, metadata)
        return tensors, metadata

    def _load_state(self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        load_weights(self.model, unprefixed(tensors, "model."), str(path))
        load_weights(self.ema.model, unprefixed(tensors, "ema."), str(path))
        optimizer_state = optimizer_state_dict(tensors, metadata["optimizer_param_groups"])
        load_full_optimizer_state(self.model, self.optimizer, optimizer_state)
        torch.set_rng_state(tensors["rng.torch"])
        self.stream.load_state(tensors["rng.data"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.step = int(metadata["step"])
        self.skipped_steps = int(metadata.get("skipped_steps", 0))
        self.wall_seconds = float(metadata.get("wall_seconds", 0.0))

    def check_matches(self, path: Path, metadata: dict[str, str]) -> None:
        """Refuse to resume a checkpoint trained with another config or on other data.

        config.yaml can be edited (or, before the run lock, replaced by a second process) between
        two invocations; the checkpoint's own record of both is what its weights were trained with.
        """
        try:
            stored = config_from_dict(json.loads(metadata["config"]))
        except (KeyError, ValueError, ConfigError):
            stored = None  # written by a dumo that had other keys: nothing reliable to compare
        if stored is not None:
            differences = config_differences(stored, self.config, ignore=RESUMABLE_KEYS)
            if differences == ["data.batch_size"]:
                check_global_batch(stored, self.config, path)
            if differences:
                key = differences[0]
                old, new = _lookup(stored.to_dict(), key), _lookup(self.config.to_dict(), key)
                more = f" (and {len(differences) - 1} more keys)" if len(differences) > 1 else ""
                raise RunDirError(
                    f"{path} was trained with {key}={old!r} but the config now says {new!r}{more}; restore "
                    f"{CONFIG_FILE} or start afresh with --overwrite"
                )
        if "data" in metadata:
            then = SampleSpace.from_json(metadata["data"])
            if then.fingerprint and then.fingerprint != self.space.fingerprint:
                raise RunDirError(
                    f"the training data changed since {path} was written ({then.summary} then, {self.space.summary} "
                    "now); put the original data back, or start afresh with --overwrite or another --out"
                )

    # -- one step ------------------------------------------------------------------------------

    def train_step(self) -> dict[str, float] | None:
        """One optimiser step; None when it was skipped for a non-finite loss or gradient."""
        cfg = self.config.train
        self.model.train()
        # Every rank draws the same global batch on the CPU and copies only its own rows to the device.
        batch = self.stream.next_batch()
        rows = batch.x.shape[0] // self.shards
        first = self.dist.rank * cfg.grad_accumulation
        batch = batch.slice(first * rows, (first + cfg.grad_accumulation) * rows).to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, Tensor] = {}  # on the device: read back once per step, not once per value
        for j in range(cfg.grad_accumulation):
            piece = batch.slice(j * rows, (j + 1) * rows)
            last = j == cfg.grad_accumulation - 1
            with set_gradient_sync(self.parallel_model, last), self._randomness(first + j):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                    output = self.objective(
                        self.step_model, piece, target_model=self.target_model, teacher_model=self.teacher
                    )
                # A non-finite loss is still backpropagated: its NaN gradients reach every rank through
                # the all-reduce, so all ranks see the same gradient norm and skip the step together.
                (output.loss / cfg.grad_accumulation).backward()
            for name, value in {"loss": output.loss, **output.parts}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() / cfg.grad_accumulation
        max_norm = self.config.optim.grad_clip or math.inf
        norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        # The step's one host synchronisation: the gradient norm decides whether to skip the step.
        *values, grad_norm = torch.stack([*sums.values(), norm.detach().float()]).tolist()
        parts = dict(zip(sums, values))
        self.step += 1
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                shown = ", ".join(f"{k}={v:.4g}" for k, v in parts.items() if k != "loss")
                last_good = list_checkpoints(self.run_dir)
                raise TrainingError(
                    f"non-finite loss or gradient for {self.nonfinite_in_a_row} steps in a row at step {self.step} "
                    f"({shown}); last good checkpoint: {last_good[-1] if last_good else 'none'}"
                )
            return None
        self.nonfinite_in_a_row = 0
        self.optimizer.step()
        self.ema.update(self.model, self.step)
        if cfg.log_every and self.step % cfg.log_every == 0:  # ranks agree on the mean only when it is logged
            parts = dict(zip(parts, self.dist.mean(list(parts.values()), self.device)))
        return {**parts, "grad_norm": grad_norm}

    def _randomness(self, shard: int):
        """Noise and times of a shard: from the global RNG in a plain single-process run, else from
        a seed of (step, shard), so that any split of the global batch computes the same step."""
        if self.shards == 1:
            return contextlib.nullcontext()
        return shard_randomness(shard_seed(self.config.train.seed, self.step, shard), self.device)

    def sampling_model(self) -> nn.Module | None:
        """The EMA weights as a plain module on rank 0, None on the other ranks.

        Under FSDP the EMA copy is sharded, so every rank must call this (gathering is collective).
        """
        if not self.sharded:
            return self.ema.model if self.dist.is_main else None
        state = full_model_state(self.ema.model)
        if not self.dist.is_main:
            return None
        model = self.build_plain_model()
        model.load_state_dict(state)
        return model.to(self.device).eval().requires_grad_(False)

    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Sample quality of the EMA weights (2-D data: MMD and sliced Wasserstein; images: domain FD).

        Latent runs are not scored in the loop: that needs the decoder and an image metric.
        """
        if isinstance(self.dataset, LatentDataset):
            return {}
        return evaluate(
            model if model is not None else self.ema.model,
            self.config.objective.name,
            self.dataset,
            self.config.sample,
            num=self.config.train.eval_samples,
            num_classes=self.num_classes,
            device=self.device,
        )

    # -- the loop ------------------------------------------------------------------------------

    def run(self, overwrite: bool = False) -> TrainResult:
        """Train up to ``train.steps``, holding the run folder's lock throughout (rank 0)."""
        lock = RunLock(self.run_dir)
        if self.dist.is_main:
            check_run_dir(self.config, self.run_dir, overwrite)  # refuse before creating anything
            lock.acquire()
        try:
            return self._run(overwrite)
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
                self.tensorboard = None
            lock.release()

    def _resume_latest(self) -> Path | None:
        """Restore, on every rank, the checkpoint that rank 0 chooses; None when there is none.

        Rank 0 picks its newest checkpoint that verifies (a corrupt one is renamed aside with a
        message) and broadcasts its step; every other rank reads the checkpoint of that step from
        its own view of the run folder, and refuses if it sees another newest one (a node-local
        folder would otherwise silently restart it from other weights). All ranks then agree on
        success before any of them loads the state, so that one rank's error stops every rank
        instead of leaving the others waiting at a collective.
        """
        chosen: tuple[Path, dict[str, torch.Tensor], dict[str, str]] | None = None
        failure: Exception | None = None
        if self.dist.is_main:
            try:
                chosen = self._choose_checkpoint()
            except Exception as error:  # re-raised below, once the other ranks know
                failure = error
        code = RANK0_FAILED if failure is not None else NO_CHECKPOINT if chosen is None else int(chosen[2]["step"])
        step = self.dist.broadcast_int(code, self.device)
        if not self.dist.is_main and step != RANK0_FAILED:
            try:
                path = agreed_checkpoint(self.run_dir, None if step == NO_CHECKPOINT else step, self.dist.rank)
                chosen = None if path is None else (path, *self.read_checkpoint(path))
            except Exception as error:
                failure = error
        succeeded = self.dist.flags(failure is None, self.device)
        if failure is not None:
            raise failure
        if not all(succeeded):
            failed = [str(rank) for rank, ok in enumerate(succeeded) if not ok]
            ranks = f"rank{'s' * (len(failed) > 1)} {', '.join(failed)}"
            what = f"checkpoint step {step}" if step >= 0 else "the run"
            raise CheckpointError(
                f"rank {self.dist.rank} stopped without resuming: {ranks} could not resume {what} (its error says why)"
            )
        if chosen is None:
            return None
        path, tensors, metadata = chosen
        self._load_state(path, tensors, metadata)
        return path

    def _choose_checkpoint(self) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]] | None:
        """Rank 0: the newest checkpoint that verifies, read; a corrupt one is renamed aside with a message."""
        existing = list_checkpoints(self.run_dir)
        for path in reversed(existing):
            try:
                return path, *self.read_checkpoint(path)
            except CorruptCheckpointError as error:
                aside = path.with_name(path.name + CORRUPT_SUFFIX)
                with contextlib.suppress(OSError):
                    path.rename(aside)
                older = "the previous checkpoint" if path != existing[0] else "nothing: no readable checkpoint"
                print(f"dumo: warning: {error}; moved it to {aside.name}, resuming from {older}", file=sys.stderr)
        if existing:
            raise CheckpointError(
                f"no checkpoint in {self.run_dir / CHECKPOINT_DIR} could be read (see above): put a good copy back, "
                "or start afresh with --overwrite"
            )
        return None

    def _run(self, overwrite: bool) -> TrainResult:
        cfg = self.config.train
        main = self.dist.is_main
        if main:
            removed = prepare_run_dir(self.config, self.run_dir, overwrite)
            if removed:
                print(f"--overwrite: removed {', '.join(removed)} from {self.run_dir}", flush=True)
            remove_torn_writes(self.run_dir)
        self.dist.barrier()
        resumed_from = None
        restored = self._resume_latest()
        if restored is not None:
            resumed_from = self.step
        if restored is not None and self.step >= cfg.steps:
            # Already trained this far (say, the original command rerun after a longer --set train.steps):
            # nothing to train, so leave config.yaml, the logs and the evaluations as they are.
            return TrainResult(self.run_dir, self.step, {}, resumed_from, already_done=True)
        if main:
            save_config(self.config, self.run_dir / CONFIG_FILE)  # only rewritten when it changed
            record_start(self.run_dir, self.step)
        if restored is None and cfg.init_from is not None:
            self.initialise_from(cfg.init_from)
        self.dist.barrier()  # the teacher file is written by rank 0
        if self.objective.wants_teacher():
            self.load_teacher()
        if main:
            truncate_log(self.run_dir / TRAIN_LOG, self.step)
            truncate_log(self.run_dir / EVAL_LOG, self.step)
            if cfg.tensorboard:
                # a resumed run drops the events logged after its checkpoint, as the CSV logs do
                self.tensorboard = summary_writer_class()(
                    str(self.run_dir / TENSORBOARD_DIR), purge_step=self.step if restored is not None else None
                )

        started = time.perf_counter()
        wall_before = self.wall_seconds
        metrics: dict[str, float] = {}
        last_saved = self.step if restored is not None else None
        evaluated_at: int | None = None
        progress = Progress(cfg.steps, self.step, enabled=cfg.progress and main)
        meter = None  # the throughput columns: FLOPs counted once here, the rest read at log steps only
        if main and cfg.log_every:
            meter, line = ThroughputMeter.for_run(
                self.config, self.dataset.shape, self.num_classes, self.device, self.dist.world_size
            )
            if cfg.progress:
                print(line, flush=True)
        window_start, window_steps = time.perf_counter(), 0
        with self._signals_to_flag():
            while self.step < cfg.steps and not self._should_stop(started):
                logged = self.train_step()
                self.wall_seconds = wall_before + time.perf_counter() - started
                window_steps += 1
                progress.update(self.step)
                if logged is not None and main and cfg.log_every and self.step % cfg.log_every == 0:
                    seconds = max(time.perf_counter() - window_start, 1e-9)
                    rate = window_steps / seconds
                    throughput = meter.measure(window_steps, seconds) if meter is not None else {}
                    window_start, window_steps = time.perf_counter(), 0
                    row = {
                        "step": self.step,
                        **logged,
                        "steps_per_sec": rate,
                        **throughput,
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "wall_seconds": self.wall_seconds,
                    }
                    append_row(self.run_dir / TRAIN_LOG, row)
                    self._add_scalars("train", row)
                    progress.log(self.step, logged, rate, throughput)
                paused = False  # evaluations and saves are not training time: the window restarts after them
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    metrics = self._evaluate_and_log()
                    evaluated_at = self.step
                    paused = True
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self._save_everywhere()
                    last_saved = self.step
                    paused = True
                if snapshot_due(self.step, cfg.snapshot_steps, cfg.snapshot_every):
                    self._save_snapshot()
                    paused = True
                if paused:
                    window_start, window_steps = time.perf_counter(), 0
                    if meter is not None:
                        meter.restart_memory()
        progress.close()
        interrupted = self.step < cfg.steps
        if last_saved != self.step:
            self._save_everywhere()
        if not interrupted and evaluated_at != self.step:  # the last step's evaluation, unless the loop made it
            metrics = self._evaluate_and_log()
        if not interrupted and self.step and self.skipped_steps > cfg.max_skipped_fraction * self.step:
            raise TrainingError(
                f"{self.skipped_steps} of {self.step} steps were skipped for a non-finite loss or gradient (more than "
                f"train.max_skipped_fraction={cfg.max_skipped_fraction}); the weights were saved, but check the data "
                "and learning rate before trusting them"
            )
        return TrainResult(
            self.run_dir,
            self.step,
            metrics,
            resumed_from,
            interrupted,
            time.perf_counter() - started,
            signal=self._stop_signal,
            skipped_steps=self.skipped_steps,
            note=self.metrics_note() if metrics else None,
        )

    def metrics_note(self) -> str | None:
        """Caveats about the metrics for the person reading them: too little data, guided samples."""
        notes = [small_data_note(self.dataset)]
        if is_guided(self.config.sample, self.num_classes > 0):
            notes.append(
                f"the scores are of samples drawn with guidance scale {self.config.sample.guidance_scale}: "
                "each NFE above is 2 network passes"
            )
        return "; ".join(note for note in notes if note) or None

    def _save_everywhere(self) -> None:
        """Rank 0 writes (under FSDP after every rank helped gather the state); the others wait."""
        self.save()
        self.dist.barrier()

    def _evaluate_and_log(self) -> dict[str, float]:
        """Score the EMA weights (pixel and 2-D data), log the scores and save a picture of samples
        (latent runs: decoded through the autoencoder; random latents have none, so no picture)."""
        metrics = {}
        latent = isinstance(self.dataset, LatentDataset)
        if latent and self.space.autoencoder is None:
            return metrics
        model = self.sampling_model()  # collective under FSDP: every rank takes the same branch
        if self.dist.is_main:
            if not latent:
                try:
                    metrics = self.evaluate(model)
                except MetricsError as error:  # samples a metric refuses (NaN) must not end a long run
                    print(f"dumo: warning: step {self.step}: no scores: {error}", file=sys.stderr, flush=True)
            if metrics:
                append_row(self.run_dir / EVAL_LOG, {"step": self.step, **metrics})
                self._add_scalars("eval", metrics)
            self._save_picture_logged(model if model is not None else self.ema.model)
        self.dist.barrier()
        return metrics

    #: why pictures of this run cannot be drawn (a latent run whose decoder is missing), once known
    _picture_error: str | None = None

    def _save_picture_logged(self, model: nn.Module) -> Path | None:
        """:meth:`save_picture`, also to TensorBoard; a missing decoder is reported once, not fatal
        (a two-week run should not stop at its first evaluation because a VAE folder moved)."""
        if self._picture_error is not None:
            return None
        try:
            path = self.save_picture(model)
        except DumoError as error:
            if isinstance(error, DiskFullError):  # the next checkpoint would not fit either: stop now
                raise
            self._picture_error = str(error)
            print(f"dumo: warning: no sample pictures for this run: {error}", file=sys.stderr, flush=True)
            return None
        if self.tensorboard is not None:
            import numpy as np
            from PIL import Image

            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.tensorboard.add_image("samples", pixels, self.step, dataformats="HWC")
            self.tensorboard.flush()
        return path

    def _add_scalars(self, group: str, row: dict[str, float | None]) -> None:
        """Write a logged row to TensorBoard as ``group/name`` scalars at the current step (an empty
        value, such as the MFU of a device without a peak figure, is left out)."""
        if self.tensorboard is None:
            return
        for name, value in row.items():
            if name != "step" and value is not None:
                self.tensorboard.add_scalar(f"{group}/{name}", float(value), self.step)
        self.tensorboard.flush()

    def save_picture(self, model: nn.Module) -> Path:
        """RUN/samples/step_XXXXXXXX.png: 1-NFE samples of the EMA weights (a grid of images with their
        classes, decoded by the autoencoder for latent runs, or 2-D points over the data density), to
        watch a run by eye."""
        from dumo.plotting import image_grid, scatter_over_density
        from dumo.sampling import balanced_labels, generate

        num = 40 if self.space.is_images else 1000
        labels = balanced_labels(num, self.num_classes, self.device)
        x = generate(
            model,
            self.config.objective.name,
            (num, *self.dataset.shape),
            1,
            self.config.sample,
            0,
            labels,
            device=self.device,
        )
        data = self._to_data(x)
        path = self.run_dir / SAMPLES_DIR / f"step_{self.step:08d}.png"
        cost = sampling_cost(model, self.config.objective.name, 1, self.config.sample, conditional=labels is not None)
        title = f"{self.config.objective.name}, step {self.step}, {cost} (EMA)"
        path.parent.mkdir(exist_ok=True)
        with atomic_output(path) as tmp:
            if self.space.is_images:
                names = None if labels is None else [self.space.class_name(int(c)) for c in labels]
                image_grid(data.numpy(), names, tmp, title=title, columns=10)
            else:
                reference, _ = self.dataset.sample(20_000, torch.Generator().manual_seed(0))
                scatter_over_density([(title, data.numpy())], reference.numpy(), tmp)
        return path

    def _to_data(self, x: Tensor, chunk: int = 8) -> Tensor:
        """Samples in model space as data on the CPU; latents are decoded on the training device, a few
        at a time, and the autoencoder goes back to the CPU afterwards (training keeps the memory)."""
        if self.space.kind != "latents":
            return self.space.unstandardise(x.cpu())
        autoencoder = self.space.codec().autoencoder
        autoencoder.to(self.device)
        try:
            return torch.cat([self.space.unstandardise(part) for part in x.split(chunk)])
        finally:
            autoencoder.to("cpu")

    def _save_snapshot(self) -> Path | None:
        """RUN/snapshots/ema_step_XXXXXXXX.safetensors: the EMA weights in fp16, kept whatever checkpoint
        rotation deletes (see dumo.training.snapshots). Every rank calls it (FSDP gathers); rank 0 writes."""
        state = full_model_state(self.ema.model)
        path = None
        if self.dist.is_main:
            metadata = snapshot_metadata(
                self.step, json.dumps(self.config.to_dict()), self.space.to_json(), __version__
            )
            path = save_snapshot(snapshot_path(self.run_dir, self.step), state, metadata)
        self.dist.barrier()
        return path

    def _should_stop(self, started: float) -> bool:
        """A signal or the time budget on any rank stops every rank after the same step."""
        return self.dist.any(self._stop_signal is not None or self._out_of_time(started), self.device)

    def _out_of_time(self, started: float) -> bool:
        budget = self.config.train.max_minutes
        return budget is not None and time.perf_counter() - started >= 60 * budget

    def _signals_to_flag(self):
        """SIGINT/SIGTERM end the loop after the current step; the run then saves a checkpoint."""
        trainer = self

        class Handler:
            def __enter__(self):
                self.previous = {}
                if threading.current_thread() is threading.main_thread():
                    for sig in (signal.SIGINT, signal.SIGTERM):
                        self.previous[sig] = signal.signal(sig, self.handle)

            def handle(self, signum, frame):
                trainer._stop_signal = signum

            def __exit__(self, *exc):
                for sig, handler in self.previous.items():
                    signal.signal(sig, handler)

        return Handler()


def ineffective_settings(config: Config, num_classes: int, distributed: bool) -> list[str]:
    """Settings of ``config`` that cannot take effect in this run, each with what happens instead."""
    found = []
    zeta = getattr(config.objective, "zeta", 0.0)
    if zeta > 0 and num_classes == 0:
        found.append(
            f"objective.zeta={zeta:g} is training-time guidance, which needs class labels; this run is unconditional "
            "(data.conditional is false or the data has no classes), so it trains without guidance"
        )
    if config.train.parallel == "fsdp" and not distributed:
        found.append(
            "train.parallel=fsdp shards the model over torchrun's processes; in this single process the model "
            "trains whole and unsharded"
        )
    if config.train.fsdp_param_dtype == "bf16" and not (distributed and config.train.parallel == "fsdp"):
        found.append(
            "train.fsdp_param_dtype=bf16 applies to train.parallel=fsdp under torchrun only; the blocks keep "
            "their fp32 parameters here (train.precision decides the compute)"
        )
    return found


def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or a one-line ConfigError when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ConfigError(
            f"train.tensorboard is true but the tensorboard package is missing ({error}): pip install tensorboard "
            "(or set train.tensorboard=false)"
        ) from None
    return SummaryWriter


SMALL_DATA = 1000  # below this many training images the domain classifier mostly measures memorisation


def small_data_note(dataset) -> str | None:
    if isinstance(dataset, LatentDataset) or not hasattr(dataset, "images") or len(dataset) >= SMALL_DATA:
        return None
    return (
        f"the domain FD and class fidelity use a classifier fit on these same {len(dataset)} training images; "
        "on so few images they measure closeness to them (memorisation) as much as quality"
    )


def _lookup(raw: dict, dotted: str):
    node = raw
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


class Progress:
    """Training progress for a person: a tqdm bar on a terminal, else one plain line per logged step.

    Logs, pipes and batch systems get readable lines instead of tqdm's carriage returns; the
    bar and the lines show the loss parts (under adaptive weighting the total sits near 1).
    """

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total = total
        self.enabled = enabled
        self.started = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=min(initial, total), desc="train", file=sys.stderr)

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(
        self, step: int, logged: dict[str, float], rate: float, throughput: dict[str, float | None] | None = None
    ) -> None:
        """Show a logged step; ``throughput`` adds images/s and, where known, the MFU."""
        parts = {k: v for k, v in logged.items() if k.startswith("loss")}
        throughput = throughput or {}
        images, mfu = throughput.get("images_per_sec"), throughput.get("mfu")
        if self.bar is not None:
            extra = {"rate": f"{rate:.0f}/s"}
            if images is not None:
                extra["img/s"] = f"{images:.0f}"
            if mfu is not None:
                extra["MFU"] = f"{100 * mfu:.0f}%"
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items()} | extra)
        elif self.enabled:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in parts.items())
            elapsed = time.perf_counter() - self.started
            speed = f"{rate:.1f} steps/s" + (f"  {images:.1f} img/s" if images is not None else "")
            speed += f"  MFU {100 * mfu:.1f}%" if mfu is not None else ""
            print(f"step {step}/{self.total}  {shown}  {speed}  {elapsed:.0f} s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def append_row(path: Path, row: dict[str, float]) -> None:
    """Append to a CSV log, writing the header when the file is new (or was left empty).

    A log begun by an older dumo keeps its own columns, so the file stays one table.
    """
    fields = list(row)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as handle:
            header = next(csv.reader(handle), None)
        if header:
            fields = header
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def truncate_log(path: Path, step: int) -> None:
    """Drop rows logged after ``step`` (they belong to steps a resumed run will redo), and a torn
    last row; the file is replaced atomically, so a kill here leaves the old log."""
    if not path.exists():
        return
    text = path.read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    fields = rows[0].keys() if rows else None
    if rows and not text.endswith("\n"):
        rows[-1] = {}  # cut off by a kill mid-append (the next row would be glued to it)

    def kept_step(row: dict) -> bool:
        try:
            return int(row["step"]) <= step and None not in row.values()
        except (KeyError, TypeError, ValueError):
            return False  # a row cut off by a kill mid-append

    kept = [row for row in rows if kept_step(row)]
    if not rows:
        if path.stat().st_size:
            path.unlink()  # a file with no table in it: the next row writes a header again
        return
    if len(kept) != len(rows):
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(kept)
        atomic_write(path, buffer.getvalue().encode())


def train(config: Config, run_dir: str | Path, overwrite: bool = False) -> TrainResult:
    """Train (or resume) the run in ``run_dir`` up to ``config.train.steps``."""
    return Trainer(config, run_dir).run(overwrite)

"""The training loop: build the model, EMA, optimiser and data stream of a run, then take
optimiser steps until train.steps, with periodic evaluation (:mod:`dumo.training.periodic`), logs
(:mod:`dumo.training.logs`) and atomic checkpoints that resume exactly (:mod:`dumo.training.state`).

The loop asks the objective for a loss and never looks inside it: a new objective changes nothing here.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from dumo.config import Config, save_config
from dumo.data import SampleSpace, build_dataset, build_stream, conditioning_classes, dataset_prompts
from dumo.distributed import from_environment, resolve_device, shard_randomness, shard_seed
from dumo.errors import ConfigError, TrainingError
from dumo.models import set_activation_checkpointing
from dumo.network import build_network, network_dataset
from dumo.objectives import build_objective
from dumo.runs.folder import RunLock, check_run_dir, prepare_run_dir, record_start, remove_torn_writes
from dumo.runs.layout import CONFIG_FILE, list_checkpoints
from dumo.training.checks import check_batch_fits, ineffective_settings
from dumo.training.compiling import check_compile_fits, compile_network
from dumo.training.ema import EMA
from dumo.training.logs import Progress, RunLogs, summary_writer_class
from dumo.training.parallel import full_tensor, set_gradient_sync, wrap_for_training
from dumo.training.periodic import evaluate_and_log, metrics_note, save_ema_snapshot
from dumo.training.snapshots import snapshot_due
from dumo.training.state import initialise_from, load_teacher, resume_latest, save_everywhere
from dumo.training.throughput import ThroughputMeter

#: exit status of ``dumo train`` when it stopped before train.steps because train.max_minutes was spent
#: (a signal gives 128 + its number: 130 for SIGINT, 143 for SIGTERM)
EXIT_OUT_OF_TIME = 3


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
        self.logs = RunLogs(self.run_dir)  # written by rank 0
        torch.manual_seed(config.train.seed)
        self.dataset = build_dataset(config.data)
        check_batch_fits(config, self.dataset.shape, self.shards)
        self.num_classes = conditioning_classes(self.dataset, config.data)
        # text data: how its prompts become the network's condition (None: class labels or nothing)
        self.prompts = dataset_prompts(self.dataset, config.text)
        self.text = None if self.prompts is None else self.prompts.spec
        # a diffusers transformer reads its pipeline's latents and cached prompt embeddings
        self.dataset = network_dataset(config, self.dataset, self.prompts, self.device)
        self.objective = build_objective(config.objective, self.num_classes)
        if self.objective.wants_teacher() and config.train.init_from is None:
            asking = [f"objective.{key}=teacher" for key, value in vars(config.objective).items() if value == "teacher"]
            named = " and ".join(asking) or "this objective"
            verb = "need" if len(asking) > 1 else "needs"
            raise ConfigError(f"{named} {verb} train.init_from (the teacher is the frozen initial weights)")
        self.teacher: nn.Module | None = None  # set in run(): from init_from, or from the run folder on resume
        self.model = self.build_plain_model().to(self.device)
        check_compile_fits(self.model, config.train.compile, config.train.activation_checkpointing)
        set_activation_checkpointing(self.model, config.train.activation_checkpointing)
        self.ema = EMA(self.model, config.train.ema_decay, config.train.ema_warmup)
        self.sharded = self.dist.enabled and config.train.parallel == "fsdp"
        if config.train.parallel == "fsdp" and self.objective.needs_forward_ad():
            # refused in a single process too (where FSDP is not applied): the config fails alike everywhere
            raise ConfigError(
                "train.parallel=fsdp needs objective.derivative=finite_difference: "
                "forward-mode AD (jvp) cannot run through FSDP's parameter gathering"
            )
        if self.dist.is_main:
            for line in ineffective_settings(config, self.conditional, self.dist.enabled):
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
        self.step_model = compile_network(self.parallel_model, config.train.compile)
        # theta^- for the no-grad target passes, compiled like the step's network. Under DDP they
        # use the unwrapped module: they need no gradient averaging, and DDP's forward cannot run
        # inside torch.func.jvp. Under FSDP the sharded module itself serves (every rank runs the same passes).
        self.target_model: nn.Module | None = None
        if self.objective.target_network() == "ema":
            self.target_model = compile_network(self.ema.model, config.train.compile)
        elif self.dist.enabled and not self.sharded:
            self.target_model = compile_network(self.model, config.train.compile)
        self.optimizer = torch.optim.AdamW(
            [parameter for parameter in self.model.parameters() if parameter.requires_grad],  # not a frozen base
            lr=config.optim.lr,
            betas=config.optim.betas,
            weight_decay=config.optim.weight_decay,
            eps=config.optim.eps,
            fused=self.device.type == "cuda",  # one kernel for all parameters; CPU keeps the foreach default
        )
        self.stream = build_stream(self.dataset, config.data, seed=config.train.seed + 1, prompts=self.prompts)
        self.space = SampleSpace.of(self.dataset, self.text)
        self.wall_seconds = 0.0  # training time over every invocation of this run
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.skipped_steps = 0
        self._stop_signal: int | None = None
        # why pictures of this run cannot be drawn (a latent run whose decoder is missing), once known
        self.picture_error: str | None = None

    # -- the network ---------------------------------------------------------------------------

    def build_plain_model(self) -> nn.Module:
        """A freshly initialised, unwrapped network of this run's architecture."""
        return build_network(self.config, self.dataset.shape, self.num_classes, self.text)

    @property
    def conditional(self) -> bool:
        """Whether the model is conditioned (on class labels or prompts): guidance has something to guide by."""
        return self.num_classes > 0 or self.text is not None

    def scratch_model(self) -> nn.Module:
        """A network of this run's architecture built without touching the run's random stream
        (its initial values are overwritten anyway), so that a resumed run draws what the
        uninterrupted one drew."""
        with torch.random.fork_rng(devices=[]):
            return self.build_plain_model()

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
            self.logs.close()
            lock.release()

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
        restored = resume_latest(self)
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
            initialise_from(self, cfg.init_from)
        self.dist.barrier()  # the teacher file is written by rank 0
        if self.objective.wants_teacher():
            load_teacher(self)
        if main:
            self.logs.open(self.step, resumed=restored is not None, tensorboard=cfg.tensorboard)

        started = time.perf_counter()
        wall_before = self.wall_seconds
        metrics: dict[str, float] = {}
        last_saved = self.step if restored is not None else None
        evaluated_at: int | None = None
        progress = Progress(cfg.steps, self.step, enabled=cfg.progress and main)
        meter = None  # the throughput columns: FLOPs counted once here, the rest read at log steps only
        if main and cfg.log_every:
            meter, line = ThroughputMeter.for_run(
                self.config, self.dataset.shape, self.num_classes, self.device, self.dist.world_size, self.text
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
                        **logged,
                        "steps_per_sec": rate,
                        **throughput,
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "wall_seconds": self.wall_seconds,
                    }
                    self.logs.write("train", self.step, row)
                    progress.log(self.step, logged, rate, throughput)
                paused = False  # evaluations and saves are not training time: the window restarts after them
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    metrics = evaluate_and_log(self)
                    evaluated_at = self.step
                    paused = True
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    save_everywhere(self)
                    last_saved = self.step
                    paused = True
                if snapshot_due(self.step, cfg.snapshot_steps, cfg.snapshot_every):
                    save_ema_snapshot(self)
                    paused = True
                if paused:
                    window_start, window_steps = time.perf_counter(), 0
                    if meter is not None:
                        meter.restart_memory()
        progress.close()
        interrupted = self.step < cfg.steps
        if last_saved != self.step:
            save_everywhere(self)
        if not interrupted and evaluated_at != self.step:  # the last step's evaluation, unless the loop made it
            metrics = evaluate_and_log(self)
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
            note=metrics_note(self) if metrics else None,
        )

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


def train(config: Config, run_dir: str | Path, overwrite: bool = False) -> TrainResult:
    """Train (or resume) the run in ``run_dir`` up to ``config.train.steps``."""
    return Trainer(config, run_dir).run(overwrite)

"""Make a multi-step flow model one-step: train a Flow Matching teacher, fine-tune DuMo and MeanFlow
from it, and score them against the teacher (domain FD, class fidelity), over several seeds.

    .venv/bin/python experiments/from_teacher.py stability --dataset digits      # u-loss per candidate
    .venv/bin/python experiments/from_teacher.py results --dataset digits --seeds 0 1 2
    .venv/bin/python experiments/from_teacher.py results --dataset digits --table-only --samples 5000  # rescore
    .venv/bin/python experiments/from_teacher.py guidance --dataset digits       # FD vs fidelity figure
    .venv/bin/python experiments/from_teacher.py derivative RUN_DIR              # |t du/dt| and FD error by t
    .venv/bin/python experiments/from_teacher.py coupling RUN_DIR...             # how much noise samples keep
    .venv/bin/python experiments/from_teacher.py second-step TEACHER RUN_DIR...  # what limits 2 NFE

Every run is a ``dumo train`` process (one CPU thread each, ``--jobs`` at once) in --out; a run
that is already finished is not trained again, and an interrupted one resumes. Scores of each run
are kept in its folder (scores.json; scores-N.json for --samples N other than 1000), so the tables
can be rebuilt at no cost.

- ``stability``: from the teacher of seed 0 (and from scratch), plain-L2 DuMo with each candidate
  fix (clamp of du/dt, theta^- = EMA or the frozen teacher, learning rate, exact JVP, adaptive
  weighting), guidance off; writes stability.md (u-loss over steps and final scores).
- ``results``: per seed, the teacher (configs/DATASET/fm.yaml), DuMo and MeanFlow fine-tuned from
  it (configs/DATASET/{dumo,meanflow}-from-fm.yaml), without guidance and with the configs'
  guidance, and on images DuMo with a private last block per head and adaptive weight 0.75;
  writes results.md (mean +- std over seeds) and sample grids.
- ``guidance``: domain FD against class fidelity for training-time guidance (zeta) and for
  classifier-free guidance at sampling (scale w) on the zeta = 0 model; writes guidance.png/.md.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# experiments/common.py, found as the script's folder comes first on the path (python experiments/X.py;
# the tests' load_script puts it there too)
import common
from common import evaluate_run, last_step, metric, read_log

from dumo.runs.layout import TRAIN_LOG

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLES = 1000  # the tables' sample count; scores and tables at another count carry it in their names
NUM_SAMPLES = DEFAULT_SAMPLES  # set by --samples: samples per score (FD of fewer samples is noisier and biased up)
TABLE_ONLY = False  # set by --table-only: score existing runs as they are, train nothing
EULER_STEPS = 50

#: stability candidates: name -> config overrides on top of dumo-from-fm.yaml with guidance off, plain L2
CANDIDATES = {
    "plain": [],
    "clamp 1": ["objective.dudt_clamp=1.0"],
    "v-head direction": ["objective.derivative_direction=v_head"],
    "v-head direction, clamp 1": ["objective.derivative_direction=v_head", "objective.dudt_clamp=1.0"],
    "theta- = EMA": ["objective.target_network=ema"],
    "theta- = teacher": ["objective.target_network=teacher"],
    "lr 1e-4": ["optim.lr=0.0001"],
    "adaptive p=1": ["objective.adaptive_p=1.0"],
    "clamp 3": ["objective.dudt_clamp=3.0"],
    "clamp 10": ["objective.dudt_clamp=10.0"],
    "epsilon 0.02": ["objective.epsilon=0.02"],
    "epsilon 0.05": ["objective.epsilon=0.05"],
    "v-head direction, clamp 3": ["objective.derivative_direction=v_head", "objective.dudt_clamp=3.0"],
}
SCRATCH_CANDIDATES = ("plain", "clamp 3", "epsilon 0.05")
PLAIN = [
    "objective.zeta=0",
    "objective.adaptive_p=0",
    "objective.dudt_clamp=null",
    "objective.derivative_direction=conditional",
    "objective.epsilon=0.005",  # the paper's stencil; candidates may override it
]


# -- running -------------------------------------------------------------------------------------


def scores_file(run_dir: Path) -> Path:
    """Where a run's scores at NUM_SAMPLES samples are cached."""
    return run_dir / ("scores.json" if NUM_SAMPLES == DEFAULT_SAMPLES else f"scores-{NUM_SAMPLES}.json")


def train(config: Path, run_dir: Path, overrides: list[str]) -> Path:
    """``dumo train`` in its own process with one thread; a finished run is left as it is."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    if scores_file(run_dir).is_file():
        return run_dir
    wait_while_training(run_dir)
    if scores_file(run_dir).is_file() or (TABLE_ONLY and (run_dir / TRAIN_LOG).is_file()):
        return run_dir  # table-only: score whatever the run reached
    return common.run_training(config, run_dir, overrides)


def wait_while_training(run_dir: Path) -> None:
    """Wait while another process (an earlier invocation of this script) trains ``run_dir``."""
    import fcntl
    import time

    from dumo.runs.layout import LOCK_FILE

    lock = run_dir / LOCK_FILE
    if not lock.is_file():
        return
    with lock.open("a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(handle, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                time.sleep(10)


def score(run_dir: Path, evaluations: dict[str, dict]) -> dict[str, float]:
    """Domain FD and class fidelity of the run's EMA weights for each named evaluation
    (nfe, method, guidance: 1 unless given), cached in scores_file(run_dir)."""
    import torch

    from dumo.runs.loading import load_run

    path = scores_file(run_dir)
    scores = json.loads(path.read_text()) if path.is_file() else {}
    missing = {name: spec for name, spec in evaluations.items() if not any(k.startswith(f"{name}/") for k in scores)}
    if missing:
        torch.set_num_threads(1)
        # no sampling-time guidance unless an evaluation asks for it, whatever the run's config says
        unguided = {name: {"guidance": 1.0, **spec} for name, spec in missing.items()}
        scores.update(evaluate_run(load_run(run_dir), unguided, NUM_SAMPLES))
        path.write_text(json.dumps(scores, indent=1))
    return scores


def parallel(jobs: list, workers: int) -> list:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda job: job(), jobs))


def config_path(dataset: str, name: str) -> Path:
    if dataset == "moons":
        return ROOT / "configs" / "toy" / f"moons-{name}.yaml"
    return ROOT / "configs" / dataset / f"{name}.yaml"


def teacher(args: argparse.Namespace, seed: int) -> Path:
    overrides = [f"train.seed={seed}"] + ([f"train.steps={args.teacher_steps}"] if args.teacher_steps else [])
    run = train(config_path(args.dataset, "fm"), args.out / f"teacher-s{seed}", overrides)
    score(run, TEACHER_EVALUATIONS)
    return run


FEW_STEP_EVALUATIONS = {"1 NFE": {"nfe": 1}, "2 NFE": {"nfe": 2}}
DUMO_EVALUATIONS = {**FEW_STEP_EVALUATIONS, "v-head 50 Euler": {"nfe": EULER_STEPS, "method": "euler"}}
TEACHER_EVALUATIONS = {
    "1 Euler": {"nfe": 1, "method": "euler"},
    "2 Euler": {"nfe": 2, "method": "euler"},
    "50 Euler": {"nfe": EULER_STEPS, "method": "euler"},
}


def budget(args: argparse.Namespace) -> list[str]:
    """Overrides of the fine-tuning runs' step count (--steps), if given."""
    return [f"train.steps={args.steps}"] if args.steps else []


def mean_std(values: list[float]) -> str:
    """3 decimals, the std too."""
    return common.mean_std(values, ".3f")


# -- stages --------------------------------------------------------------------------------------


def stability(args: argparse.Namespace) -> None:
    start = teacher(args, 0)
    base = config_path(args.dataset, "dumo-from-fm")
    runs = {}
    for origin in ("teacher", "scratch"):
        for name, extra in CANDIDATES.items():
            if args.only and name not in args.only:
                continue
            if origin == "scratch" and name not in SCRATCH_CANDIDATES:
                continue
            init = [f"train.init_from={start}", *budget(args)] if origin == "teacher" else ["train.init_from=null"]
            if origin == "scratch":
                init.append(f"train.steps={args.scratch_steps}")
            folder = args.out / "stability" / f"{origin}-{name.replace(' ', '_').replace('=', '')}"
            if args.table_only and not (folder / TRAIN_LOG).is_file():
                continue
            runs[(origin, name)] = (folder, [*PLAIN, *extra, *init, "train.checkpoint_every=500"])
    jobs = [lambda f=f, o=o: score(train(base, f, o), FEW_STEP_EVALUATIONS) for f, o in runs.values()]
    parallel(jobs, args.jobs)
    if args.only:
        return  # a partial study: the table is written by a run over every candidate
    key = metric(args.dataset)
    logs = {run: read_log(folder, "loss_u") for run, (folder, _) in runs.items()}
    steps = [s for s in (100, 300, 500, 700, 1000, 1500, 2000, 3000, 6000) if any(s in log for log in logs.values())]
    lines = [
        f"Plain-L2 DuMo on {args.dataset} (beta 0.7, zeta 0, adaptive weighting off unless named), one seed: "
        "u-loss (loss_u in train_log.csv, a single batch every 100 steps) by step, and the EMA weights' domain FD "
        f"at the end ({NUM_SAMPLES} samples). Teacher: {config_path(args.dataset, 'fm').relative_to(ROOT)} seed 0.",
        "",
        "| start | candidate | " + " | ".join(f"u-loss @{s}" for s in steps) + f" | {key} 1 NFE | {key} 2 NFE |",
        "|---|---|" + "---|" * (len(steps) + 2),
    ]
    for (origin, name), (folder, _) in runs.items():
        loss = logs[(origin, name)]
        scores = json.loads(scores_file(folder).read_text())
        shown = [f"{loss[s]:.3g}" if s in loss else "" for s in steps]
        lines.append(
            f"| {origin} | {name} | "
            + " | ".join(shown)
            + f" | {scores[f'1 NFE/{key}']:.4f} | {scores[f'2 NFE/{key}']:.4f} |"
        )
    write(args.out / "stability.md", lines)


def variants(args: argparse.Namespace) -> list[tuple[str, str, list[str], list[int]]]:
    """(objective, label, overrides, seeds) of the fine-tuning runs of ``results``, most important first:
    the dataset's study, its first --variants N, of those the ones --names picks."""
    found = study_variants(args)
    found = found[: args.variants] if args.variants else found
    names = getattr(args, "names", None)
    if names:
        found_names = [variant_name(method, label) for method, label, _, _ in found]
        unknown = sorted(set(names) - set(found_names))
        if unknown:
            raise SystemExit(
                f"from_teacher.py: unknown --names {', '.join(unknown)}; the variants are: {', '.join(found_names)}"
            )
        found = [variant for variant, name in zip(found, found_names) if name in names]
    return found


def study_variants(args: argparse.Namespace) -> list[tuple[str, str, list[str], list[int]]]:
    """Every fine-tuning variant of the dataset's study."""
    seeds = args.seeds
    found = [("dumo", "zeta 0", ["objective.zeta=0"], seeds), ("meanflow", "zeta 0", ["objective.zeta=0"], seeds)]
    # the flow-map target built from the frozen teacher's velocity (distillation), both methods
    distilled = ["objective.zeta=0", "objective.u_velocity=teacher"]
    found += [
        ("dumo", "zeta 0, teacher velocity", distilled, seeds),
        ("meanflow", "zeta 0, teacher velocity", distilled, seeds),
    ]
    if args.dataset == "moons":  # unconditional, and an MLP: no guidance, no private head blocks
        return found
    # README "Giving the heads their own blocks": a private last block per head, adaptive weight 0.75
    private = ["objective.zeta=0", "model.head_blocks=1", "objective.adaptive_p=0.75"]
    found.append(("dumo", "zeta 0, own head block, p 0.75", private, seeds))
    zeta = f"objective.zeta={args.zeta}"
    for direction in ("conditional", "guided", "v_head"):
        label = f"zeta {args.zeta}, {direction} direction"
        extra = [zeta, f"objective.derivative_direction={direction}"]
        found.append(("dumo", label, extra, seeds if direction == "conditional" else args.direction_seeds or seeds))
        if direction == "conditional":  # MeanFlow under the same guidance, before the other directions
            found.append(("meanflow", f"zeta {args.zeta}", [zeta], seeds))
    return found


def variant_name(method: str, label: str) -> str:
    """A variant's run folder, less its -sSEED ("dumo", "zeta 0.5, conditional direction" ->
    dumo-zeta0.5-conditionaldirection)."""
    return f"{method}-{label.replace(' ', '').replace(',', '-')}"


def results(args: argparse.Namespace) -> None:
    key = metric(args.dataset)
    found = variants(args)  # before any training: a mistyped --names stops here, not after the teachers
    teachers = parallel([lambda s=s: teacher(args, s) for s in args.seeds], args.jobs)
    rows: dict[tuple[str, str], list[dict]] = {
        ("Flow Matching teacher", "-"): [
            {**json.loads(scores_file(run).read_text()), "step": last_step(run)} for run in teachers
        ]
    }
    jobs, labels = [], []
    for method, label, extra, seeds in found:
        for seed, start in zip(args.seeds, teachers):
            if seed not in seeds:
                continue
            folder = args.out / f"{variant_name(method, label)}-s{seed}"
            if args.table_only and not (folder / TRAIN_LOG).is_file():
                continue
            labels.append((method, label))
            config = config_path(args.dataset, f"{method}-from-fm")
            overrides = [f"train.init_from={start}", f"train.seed={seed}", *extra, *budget(args)]
            evaluations = DUMO_EVALUATIONS if method == "dumo" else FEW_STEP_EVALUATIONS
            jobs.append(
                lambda c=config, f=folder, o=overrides, e=evaluations: {
                    **score(train(c, f, o), e),
                    "step": last_step(f),
                }
            )
    for key_, outcome in zip(labels, parallel(jobs, args.jobs)):
        rows.setdefault(key_, []).append(outcome)
    titles = {"dumo": "DuMo from the teacher", "meanflow": "MeanFlow from the teacher"}
    lines = [
        f"{args.dataset}: teacher = {config_path(args.dataset, 'fm').relative_to(ROOT)}; DuMo and MeanFlow "
        f"fine-tuned from its EMA weights with {config_path(args.dataset, 'dumo-from-fm').relative_to(ROOT)} and "
        f"the meanflow-from-fm config; mean ± std over the seeds in the table (of {args.seeds}); EMA weights, "
        f"{NUM_SAMPLES} samples; {key} lower is better, class fidelity higher.",
        "",
        f"| model | guidance (training) | sampler | seeds | steps | {key} | class fidelity |",
        "|---|---|---|---|---|---|---|",
    ]
    for (method, guidance), seeds in rows.items():
        for name in seeds[0]:
            if not name.endswith(f"/{key}") or not all(name in scores for scores in seeds):
                continue  # another stage's extra evaluation of one seed
            evaluation = name[: -len(f"/{key}")]
            quality = mean_std([s[name] for s in seeds])
            fidelity = (
                mean_std([s[f"{evaluation}/fidelity"] for s in seeds]) if f"{evaluation}/fidelity" in seeds[0] else "-"
            )
            trained = sorted({s["step"] for s in seeds})
            shown_steps = str(trained[0]) if len(trained) == 1 else f"{trained[0]}-{trained[-1]}"
            lines.append(
                f"| {titles.get(method, method)} | {guidance} | {evaluation} | {len(seeds)} | {shown_steps} "
                f"| {quality} | {fidelity} |"
            )
    write(args.out / ("results.md" if NUM_SAMPLES == DEFAULT_SAMPLES else f"results-{NUM_SAMPLES}-samples.md"), lines)
    if key == "fd":
        grids(args)


def grids(args: argparse.Namespace) -> None:
    """40 samples of seed 0's teacher (50 Euler), DuMo (1 NFE) and MeanFlow (1 NFE), both kinds of guidance."""
    from dumo.plotting import image_grid
    from dumo.runs.loading import load_run
    from dumo.sampling import balanced_labels, generate

    slug = f"zeta{args.zeta}"
    panels = [("teacher-s0", 50, "euler"), ("dumo-zeta0-s0", 1, "auto"), ("dumo-zeta0-s0", 2, "auto")]
    panels += [(f"dumo-{slug}-conditionaldirection-s0", 1, "auto"), ("meanflow-zeta0-s0", 1, "auto")]
    for folder, nfe, method in panels:
        if not (args.out / folder).is_dir():
            continue
        run = load_run(args.out / folder)
        labels = balanced_labels(40, run.num_classes)
        x = generate(run.model, run.objective_name, (40, *run.dataset.shape), nfe, run.config.sample, 0, labels, method)
        image_grid(
            run.dataset.unstandardise(x).numpy(),
            labels.numpy(),
            args.out / f"{folder}-{nfe}nfe.png",
            title=f"{folder}, {nfe} NFE",
        )


def guidance(args: argparse.Namespace) -> None:
    """FD against class fidelity: training-time zeta (one run each) and sampling-time scale w."""
    start = teacher(args, 0)
    config = config_path(args.dataset, "dumo-from-fm")
    points: dict[str, list[tuple[float, float, str]]] = {"training-time zeta": [], "sampling-time w (zeta 0)": []}
    jobs = []
    for zeta in args.zetas:
        # zeta 0 is the results stage's seed-0 run, when it exists (the same config)
        folder = args.out / f"guidance-zeta{zeta}"
        if zeta == 0:
            folder = args.out / "dumo-zeta0-s0"
        elif zeta == args.zeta:
            folder = args.out / f"dumo-zeta{zeta}-conditionaldirection-s0"
        overrides = [f"train.init_from={start}", f"objective.zeta={zeta}", *budget(args)]
        jobs.append(lambda f=folder, o=overrides: (f, score(train(config, f, o), {"1 NFE": {"nfe": 1}})))
    for (_, scores), zeta in zip(parallel(jobs, args.jobs), args.zetas):
        points["training-time zeta"].append((scores["1 NFE/fd"], scores["1 NFE/fidelity"], f"ζ={zeta}"))
    zero = args.out / "dumo-zeta0-s0"
    evaluations = {f"1 NFE w={w}": {"nfe": 1, "guidance": w} for w in args.scales}
    scores = score(zero, evaluations)
    for w in args.scales:
        points["sampling-time w (zeta 0)"].append(
            (scores[f"1 NFE w={w}/fd"], scores[f"1 NFE w={w}/fidelity"], f"w={w}")
        )
    lines = [
        f"{args.dataset}, DuMo fine-tuned from the seed-0 teacher, 1 NFE, {NUM_SAMPLES} samples, one seed. "
        "Sampling-time guidance costs two network passes per step.",
        "",
        "| kind | setting | domain FD | class fidelity |",
        "|---|---|---|---|",
    ]
    for kind, entries in points.items():
        for fd, fidelity, label in entries:
            lines.append(f"| {kind} | {label} | {fd:.3f} | {fidelity:.3f} |")
    write(args.out / "guidance.md", lines)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 4))
    for (kind, entries), marker in zip(points.items(), ("o-", "s--")):
        axis.plot([e[1] for e in entries], [e[0] for e in entries], marker, label=kind)
        for fd, fidelity, label in entries:
            axis.annotate(label, (fidelity, fd), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.set_yscale("log")  # a diverged run sits far above the others
    axis.set_xlabel("class fidelity (higher: more class-typical)")
    axis.set_ylabel("domain FD, log scale (lower: closer to the data)")
    axis.set_title(f"{args.dataset}: DuMo 1 NFE, guidance trade-off")
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.out / "guidance.png", dpi=120)


def derivative(args: argparse.Namespace) -> None:
    """For each checkpoint of a DuMo run: RMS of t du/dt (the part of the u-target that feeds back)
    and the finite difference's error against the exact JVP, by t, on one fixed batch."""
    import torch

    from dumo.data import build_dataset
    from dumo.files import load_checkpoint
    from dumo.models import build_model
    from dumo.objectives import DuMoConfig, DuMoObjective, TimeConfig
    from dumo.runs.checkpoints import unprefixed
    from dumo.runs.layout import checkpoint_step, list_checkpoints
    from dumo.runs.loading import load_run

    torch.set_num_threads(2)
    run_dir = args.run_dir
    bins = [(0.0, 0.02), (0.02, 0.1), (0.1, 0.3), (0.3, 0.7), (0.7, 0.9), (0.9, 0.98), (0.98, 1.0)]
    lines = [
        f"{run_dir}: RMS of t du/dt by t (finite difference, the checkpoint's online weights) along the conditional "
        "path z - x / along the v-head's velocity, and in brackets the relative error of the conditional finite "
        "difference against the exact JVP; 256 training images, t uniform in each bin.",
        "",
        "| step | " + " | ".join(f"t in [{a}, {b}]" for a, b in bins) + " |",
        "|---|" + "---|" * len(bins),
    ]
    run = load_run(run_dir)
    dataset = build_dataset(run.config.data)
    generator = torch.Generator().manual_seed(0)
    index = torch.randint(0, len(dataset), (256,), generator=generator)
    x = dataset.standardise(dataset.images[index]) if hasattr(dataset, "images") else dataset.sample(256)[0]
    labels = dataset.labels[index] if run.num_classes else None
    z = torch.randn(x.shape, generator=generator)
    for checkpoint in list_checkpoints(run_dir):
        model = build_model(run.config.model, dataset.shape, ("v", "u"), run.num_classes)
        model.load_state_dict(unprefixed(load_checkpoint(checkpoint)[0], "model."))
        model.eval()
        cells = []
        for low, high in bins:
            t = low + (high - low) * torch.rand(x.shape[0], generator=generator)
            config = DuMoConfig(time=TimeConfig("uniform"), epsilon=run.config.objective.epsilon)
            fd = DuMoObjective(config, run.num_classes).loss(model, x, z, t, labels).targets["du_dt"]
            jvp_config = DuMoConfig(time=TimeConfig("uniform"), derivative="jvp")
            exact = DuMoObjective(jvp_config, run.num_classes).loss(model, x, z, t, labels).targets["du_dt"]
            head_config = DuMoConfig(
                time=TimeConfig("uniform"), epsilon=run.config.objective.epsilon, derivative_direction="v_head"
            )
            along_v = DuMoObjective(head_config, run.num_classes).loss(model, x, z, t, labels).targets["du_dt"]
            scale = t.view(-1, *[1] * (x.dim() - 1))
            rms = (scale * fd).square().mean().sqrt().item()
            rms_v = (scale * along_v).square().mean().sqrt().item()
            error = ((fd - exact).norm() / exact.norm().clamp(min=1e-12)).item()
            cells.append(f"{rms:.3g} / {rms_v:.3g} ({error:.0%})")
        lines.append(f"| {checkpoint_step(checkpoint)} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


def coupling(args: argparse.Namespace) -> None:
    """How much of its starting noise each run's samples keep: the per-pixel least-squares slope
    (and correlation) of the sample on the noise it was drawn from, averaged over pixels, over
    1000 samples of seed 0. A Flow Matching run is sampled with 50 Euler steps (the ODE's own
    coupling), the others with their 1-NFE sampler; a student that reproduces its teacher's ODE
    map keeps the teacher's slope."""
    import torch

    from dumo.runs.loading import load_run
    from dumo.sampling import balanced_labels, generate

    torch.set_num_threads(1)
    lines = [
        "| run | sampler | slope of sample on noise | correlation |",
        "|---|---|---|---|",
    ]
    for run_dir in args.run_dirs:
        run = load_run(run_dir)
        sample = run.config.sample
        ode = run.objective_name == "fm"
        method, nfe = ("euler", EULER_STEPS) if ode else ("auto", 1)
        labels = balanced_labels(NUM_SAMPLES, run.num_classes)
        states: list = []
        x = generate(
            run.model, run.objective_name, (NUM_SAMPLES, *run.space.shape), nfe, sample, 0, labels, method, path=states
        )
        noise = states[0]
        x, noise = x - x.mean(0), noise - noise.mean(0)
        covariance = (x * noise).mean(0)
        slope = (covariance / noise.var(0, unbiased=False)).mean().item()
        correlation = (covariance / (x.std(0, unbiased=False) * noise.std(0, unbiased=False)).clamp(min=1e-12)).mean()
        lines.append(f"| {run_dir} | {'50 Euler' if ode else '1 NFE'} | {slope:.4f} | {correlation.item():.4f} |")
    print("\n".join(lines))


def second_step(model, objective_name: str, x0, s: float, labels, generator):
    """Re-noise clean images ``x0`` to time ``s`` with fresh noise and map them back to t = 0 with one
    evaluation of the run's own one-step map from s (DuMo: x_s - s u(x_s, s); MeanFlow: its
    interval map from s to 0). The second half of the consistency-style two-step sampler."""
    import torch

    from dumo.samplers import sample
    from dumo.sampling import sampler_for

    x_s = s * torch.randn(x0.shape, generator=generator, dtype=x0.dtype) + (1 - s) * x0
    return sample(model, x_s, 1, sampler_for(objective_name), cond=labels, times=[s])


def second_step_stage(args: argparse.Namespace) -> None:
    """What limits a run's two steps: its own 2 NFE, and its second step (fresh noise to s, one step
    to 0) taken from its own 1-NFE samples and from the teacher's 50 Euler steps, same noise for
    every run. If the teacher's samples make the second step much better, the first step limits;
    MeanFlow's own 2 NFE is its deterministic interval map, which the re-noised rows do not use."""
    import torch

    from dumo.evaluation import image_scorer
    from dumo.runs.loading import load_run
    from dumo.sampling import balanced_labels, generate

    torch.set_num_threads(1)
    teacher_run = load_run(args.teacher)
    fd_scorer = image_scorer(teacher_run.dataset, NUM_SAMPLES)
    labels = balanced_labels(NUM_SAMPLES, teacher_run.num_classes)
    shape = (NUM_SAMPLES, *teacher_run.space.shape)
    teacher_samples = generate(
        teacher_run.model, teacher_run.objective_name, shape, EULER_STEPS, teacher_run.config.sample, 0, labels, "euler"
    )
    starts = " | ".join(f"{source} -> s={s}" for s in args.times for source in ("own 1 NFE", "teacher"))
    lines = [
        f"teacher {args.teacher}: {EULER_STEPS} Euler steps {fd_scorer(teacher_samples, labels)['fd']:.3f}; "
        f"domain FD of {NUM_SAMPLES} samples, EMA weights; 'X -> s' re-noises X to s with fresh noise and takes "
        "one step to 0.",
        "",
        f"| run | 1 NFE | 2 NFE | {starts} |",
        "|---|---|---|" + "---|" * (2 * len(args.times)),
    ]
    for run_dir in args.run_dirs:
        run = load_run(run_dir)  # the samplers run without autograd
        own = {nfe: generate(run.model, run.objective_name, shape, nfe, run.config.sample, 0, labels) for nfe in (1, 2)}
        cells = [f"{fd_scorer(own[nfe], labels)['fd']:.3f}" for nfe in (1, 2)]
        for s in args.times:
            for start in (own[1], teacher_samples):
                generator = torch.Generator().manual_seed(1)
                x = second_step(run.model, run.objective_name, start, s, labels, generator)
                cells.append(f"{fd_scorer(x, labels)['fd']:.3f}")
        lines.append(f"| {run_dir} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


def write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = parser.add_subparsers(dest="stage", required=True)
    for name in ("stability", "results", "guidance"):
        stage = stages.add_parser(name)
        stage.add_argument("--dataset", choices=("digits", "fashion_mnist", "mnist", "moons"), default="digits")
        stage.add_argument("--out", type=Path, help="default: experiments/results/from_teacher/DATASET")
        stage.add_argument("--jobs", type=int, default=2, help="runs at once (one CPU thread each)")
        stage.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        stage.add_argument("--table-only", action="store_true", help="tabulate the runs that exist")
        stage.add_argument("--only", nargs="+", help="stability: run only these candidates (no table)")
        stage.add_argument("--teacher-steps", type=int, help="teacher steps (default: the fm config's)")
        stage.add_argument("--steps", type=int, help="fine-tuning steps (default: the from-fm config's)")
        stage.add_argument("--scratch-steps", type=int, default=1500, help="stability: steps of the runs from scratch")
        stage.add_argument("--direction-seeds", type=int, nargs="+", help="results: seeds of the other directions")
        stage.add_argument("--variants", type=int, help="results: only the first N fine-tuning variants")
        stage.add_argument(
            "--names", nargs="+", help="results: only these variants, by run-folder name less -sSEED (dumo-zeta0, ...)"
        )
        stage.add_argument(
            "--samples", type=int, default=DEFAULT_SAMPLES, help=f"samples per score (default {DEFAULT_SAMPLES})"
        )
        stage.add_argument("--zeta", type=float, default=0.5, help="results: training-time guidance of the guided runs")
        stage.add_argument("--zetas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
        stage.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.25, 1.5, 2.0, 3.0])
    stage = stages.add_parser("derivative")
    stage.add_argument("run_dir", type=Path)
    stage = stages.add_parser("coupling")
    stage.add_argument("run_dirs", type=Path, nargs="+")
    stage = stages.add_parser("second-step")
    stage.add_argument("teacher", type=Path, help="a Flow Matching run (its 50 Euler steps are the reference starts)")
    stage.add_argument("run_dirs", type=Path, nargs="+")
    stage.add_argument("--times", type=float, nargs="+", default=[0.5, 0.25], help="re-noising times s")
    args = parser.parse_args()
    global TABLE_ONLY, NUM_SAMPLES
    TABLE_ONLY = getattr(args, "table_only", False)
    NUM_SAMPLES = getattr(args, "samples", NUM_SAMPLES)
    if args.stage not in ("derivative", "coupling", "second-step"):
        args.out = args.out or ROOT / "experiments" / "results" / "from_teacher" / args.dataset
    stages = {
        "stability": stability,
        "results": results,
        "guidance": guidance,
        "derivative": derivative,
        "coupling": coupling,
        "second-step": second_step_stage,
    }
    stages[args.stage](args)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The Fashion-MNIST "make your flow model one-step" runs at the shipped recipe on one GPU, in phases
# that each fit a fixed wall-clock budget (a lent GPU machine gives 10 minutes a command):
#
#   bash experiments/from_teacher_gpu.sh teachers WORK_DIR EXPORT_DIR SECONDS
#   bash experiments/from_teacher_gpu.sh students WORK_DIR EXPORT_DIR SECONDS TEACHERS_DIR
#
# teachers: three Flow Matching teachers (configs/fashion_mnist/fm.yaml, 20,000 steps) side by side.
# students: DuMo and MeanFlow fine-tuned from each teacher in TEACHERS_DIR (a WORK_DIR or EXPORT_DIR
# of the first phase) with the *-from-fm.yaml configs, at most half the steps the teacher reached
# (10,000 for a finished one), six runs side by side. Extra overrides per method, space-separated:
#   DUMO_SET="objective.u_velocity=teacher model.head_blocks=1" MEANFLOW_SET="optim.lr=0.0001" bash ... students ...
# (runs keep their names: give each set of overrides its own WORK_DIR and EXPORT_DIR).
# A phase takes about SECONDS + 30 s (start-up, then the export; 305 s of teachers took 332 s on an H200).
# A run that runs out of time stops cleanly with a checkpoint (train.max_minutes) and resumes when the
# same phase is run again on the same WORK_DIR. Every run's EMA weights are then exported
# (dumo export) into EXPORT_DIR/NAME with its logs: small enough to copy off the machine, and scored
# elsewhere with `experiments/from_teacher.py results --dataset fashion_mnist --variants 2 --table-only
# --out EXPORT_DIR`.
#
# One thread per process: DiT-XS/4 steps are CPU-bound on a GPU (kernel launches, batch assembly),
# and PyTorch's default of one thread per core made three runs on a 16-core H200 machine 5.5x slower
# in total than with OMP_NUM_THREADS=1 (33 vs 180 teacher steps/s, all three runs together).
set -u
phase=${1:?teachers or students}
work=${2:?WORK_DIR}
export_dir=${3:?EXPORT_DIR}
seconds=${4:?SECONDS}
seeds=${SEEDS:-0 1 2}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
dumo=(python3 -m dumo)
mkdir -p "$work" "$export_dir"

train() {  # config run_dir overrides...
    local config=$1 run_dir=$2
    shift 2
    local overrides=()
    # train.max_minutes stops the run cleanly with a checkpoint; timeout is the backstop
    for item in "$@" train.progress=false "train.max_minutes=$(python3 -c "print($seconds / 60)")"; do
        overrides+=(--set "$item")
    done
    timeout --signal=INT $((seconds + 30)) "${dumo[@]}" train "$config" --out "$run_dir" "${overrides[@]}" \
        >>"$run_dir.log" 2>&1
    echo "$(basename "$run_dir"): exit $? at step $(reached "$run_dir"), last log row: $(tail -n 1 "$run_dir/train_log.csv" 2>&1)"
}

reached() {  # the step of a run's latest checkpoint or of an export's weights; 0 if none
    local weights
    weights=$(ls "$1"/checkpoints/*.safetensors "$1"/model.safetensors 2>/dev/null | sort | tail -n 1)
    [ -n "$weights" ] || { echo 0; return; }
    python3 -c "import sys; from safetensors import safe_open
with safe_open(sys.argv[1], 'pt') as f: print(f.metadata()['step'])" "$weights"
}

case $phase in
teachers)
    for seed in $seeds; do
        train configs/fashion_mnist/fm.yaml "$work/teacher-s$seed" "train.seed=$seed" &
    done
    ;;
students)
    teachers=${5:?TEACHERS_DIR}
    for seed in $seeds; do
        start=$teachers/teacher-s$seed
        steps=$(($(reached "$start") / 2))
        [ "$steps" -gt 0 ] || { echo "$start: no teacher weights"; exit 1; }
        for method in dumo meanflow; do
            extra=DUMO_SET
            [ "$method" = meanflow ] && extra=MEANFLOW_SET
            # shellcheck disable=SC2086 # word splitting: one override per word
            train "configs/fashion_mnist/$method-from-fm.yaml" "$work/$method-zeta0-s$seed" "train.init_from=$start" \
                "train.seed=$seed" "objective.zeta=0" "train.steps=$((steps < 10000 ? steps : 10000))" ${!extra:-} &
        done
    done
    ;;
*)
    echo "unknown phase $phase: give teachers or students"
    exit 2
    ;;
esac
wait

for run_dir in "$work"/*/; do
    run_dir=${run_dir%/}
    name=$(basename "$run_dir")
    [ -d "$run_dir/checkpoints" ] || continue
    (
        rm -rf "${export_dir:?}/$name"
        "${dumo[@]}" export "$run_dir" "$export_dir/$name" >/dev/null
        cp "$run_dir"/{train_log.csv,eval_log.csv,history.txt} "$export_dir/$name/" 2>/dev/null
        cp "$run_dir.log" "$export_dir/$name.log"
    ) &
done
wait
echo "done after ${SECONDS}s"

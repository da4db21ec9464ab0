#!/usr/bin/env bash
# The GPU numbers in one prepared run, about six minutes on one H100 (each stage has a time cap):
#   - flash attention on the finite-difference path, math kernel only inside the exact JVP,
#     FD vs JVP du/dt on a DiT-B/2 (benchmarks/gpu_checks.py);
#   - du/dt error of each objective.target_precision (fp32, tf32, bf16) against fp64 on a DiT-B/2
#     (benchmarks/dudt_precision.py);
#   - AdamW (per-tensor, foreach, fused) and the EMA update on DiT-XL/2 (benchmarks/optimizer_step.py);
#   - step cost of every objective on DiT-B/2 and DiT-XL/2, bf16 autocast, fused attention, peak
#     memory and single-GPU training images/s; DuMo's target passes in fp32, tf32 and bf16 on DiT-XL/2;
#     torch.compile on DiT-B/2.
# Usage: bash benchmarks/gpu.sh [OUT_DIR]   (a CUDA build of torch in .venv, or PYTHON=...)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
stage() {  # stage NAME SECONDS COMMAND...: run with a time cap, keep the output, go on if it fails
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
}
"$py" -c "import torch; p = torch.cuda.get_device_properties(0); print(torch.__version__, p.name, f'{p.total_memory / 2**30:.0f} GiB')" \
  | tee "$out/device.txt"
stage checks 60 "$py" benchmarks/gpu_checks.py
stage dudt-precision 45 "$py" benchmarks/dudt_precision.py --batch 16
stage optimizer-step 40 "$py" benchmarks/optimizer_step.py --model DiT-XL/2
stage dit-b2-bf16 60 "$py" benchmarks/step_cost.py --networks dit-b2 --batch 128 --precision bf16 --steps 10
fewer=(--methods "DuMo (FD, batched)")  # with the two baselines step_cost always adds: FM, MeanFlow FD
for target in fp32 tf32 bf16; do
  stage "dit-xl2-bf16-target-$target" 75 "$py" benchmarks/step_cost.py --networks dit-xl2 --batch 64 \
    --precision bf16 --steps 5 --target-precision "$target" "${fewer[@]}"
done
stage dit-b2-bf16-compile 75 "$py" benchmarks/step_cost.py --networks dit-b2 --batch 128 --precision bf16 \
  --steps 10 --compile "${fewer[@]}"
echo "results in $out"

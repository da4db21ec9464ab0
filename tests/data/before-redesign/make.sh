#!/usr/bin/env bash
# Writes the fixtures of tests/test_same_samples.py with the dumo of the current checkout: two short
# runs (the demo's moons config and the digits DuMo config), their exports, and samples drawn from
# them. They were made once, before the package redesign, so that the test can show that the moved
# code trains and samples exactly as the old code did. Single-threaded, so the arithmetic is the
# same on every run on one machine.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dumo="${DUMO:-.venv/bin/dumo}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
"$dumo" train configs/toy/moons-dumo.yaml --out "$work/moons" --set train.steps=300 train.progress=false
"$dumo" train configs/digits/dumo.yaml --out "$work/digits" --set train.steps=60 train.eval_every=0 train.progress=false
for run in moons digits; do
  rm -rf "${here:?}/$run"
  "$dumo" export "$work/$run" "$here/$run"
done
"$dumo" sample "$here/moons" --nfe 1 -n 256 --seed 3 --out "$here/moons-1nfe.npy"
"$dumo" sample "$here/moons" --nfe 2 -n 256 --seed 3 --out "$here/moons-2nfe.npy"
"$dumo" sample "$here/digits" --nfe 1 -n 32 --seed 3 --out "$here/digits-1nfe.npz"
"$dumo" sample "$here/digits" --nfe 2 -n 32 --seed 3 --out "$here/digits-2nfe.npz"

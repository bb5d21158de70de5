#!/bin/bash
# usage: bench/results-cost-once/kernel_ab.sh TOKENS ROUNDS [SCORING]: the probe with ggml's flash kernel kept
# (KVC_KEEP_FLASH_KERNEL=1) and skipped (0), alternating, each run a fresh process (bench/probe_ab.py --child), flash on
cd "$(dirname "$0")/.."
source ../.venv/bin/activate
T=$1; R=$2; S=${3:-reconstruct}
for i in $(seq $R); do
  for keep in 1 0; do
    out=$(KVC_KEEP_FLASH_KERNEL=$keep python probe_ab.py --child --tokens $T --flash on --scoring $S 2>/dev/null | tail -1)
    echo "keep=$keep $out"
  done
done

#!/usr/bin/env bash
# The DiT-XL/2 256px bf16 table and plots on one GPU, in one device call: samples/s and peak memory of non-private
# training, flash_bk and Opacus ghost (embedders frozen) at batch 16, 32 and 64, then the largest batch of each in
# MEMORY_LIMIT GiB (default 24, as on a 24 GiB GPU; 0: the whole GPU, which takes far longer). Run from the
# repository root; where diffusers/opacus are missing, first the wheels of ../shared/tools/gpu/fetch-wheels.sh in
# .whl/. Results (device.txt, results.jsonl, tables.md, PNGs) go to $OUT (or ./gpu-results). The suite resumes:
# rerun the script with the same $OUT to finish what a time limit cut off.
set -uo pipefail
source "$(dirname "$0")/gpu_setup.sh"
limit=${MEMORY_LIMIT:-24}
max_batch=(--max_batch)
[ "$limit" != 0 ] && max_batch+=(--memory_limit "$limit")
timeout "${SUITE_TIMEOUT:-540}" python3 -m benchmarks.suite --models DiT-XL/2 --latent_sizes 32 --precisions bf16 \
  --batch_sizes 16 32 64 --modes non_private flash_bk opacus_ghost --steps 5 --warmup 2 --timeout 150 \
  "${max_batch[@]}" --no_plots --output_dir "$out/dit-xl2-256px-bf16" 2>&1 | tail -5
python3 -m benchmarks.plots "$out/dit-xl2-256px-bf16" && cat "$out/dit-xl2-256px-bf16/tables.md"

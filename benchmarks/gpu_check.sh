#!/usr/bin/env bash
# The GPU checks of one session, in one device call: the CUDA tests (engine, noise, CUDA graphs), then DiT-XL/2 at
# 256px (32x32 latents) in bf16 autocast at batch 64, 128 and 32, first with CUDA graphs (non-private captured whole;
# flash_bk with dp_utils.CudaGraphedStep and make_private(cuda_graphs=True)), then eager. Run from the repository
# root; where diffusers/opacus are missing, first the wheels of ../shared/tools/gpu/fetch-wheels.sh in .whl/.
# Results (device.txt, gpu_tests.log, bench_xl.md with its JSON lines, table.md from gpu_table.py) go to $OUT (or
# ./gpu-results).
# Everything ends within DEADLINE seconds (default 540, under a device call's 600): each part gets at most its own
# cap and what is left, most important first, so that a part that hangs costs only the parts after it.
set -uo pipefail
end=$((SECONDS + ${DEADLINE:-540}))
source "$(dirname "$0")/gpu_setup.sh"

# the seconds a part may run: its cap, or what is left before the deadline
allowed() { local left=$((end - SECONDS)); echo $((left < $1 ? left : $1)); }
run() {
  local limit
  limit=$(allowed "$1")
  if [ "$limit" -le 5 ]; then
    echo "skipped (deadline): ${*:2}" | tee -a "$out/skipped.txt"
    return
  fi
  timeout "$limit" "${@:2}"
}
bench() {
  run "$1" python3 benchmarks/bench_step.py --model DiT-XL/2 --latent_size 32 --bf16 --steps 5 --warmup 2 "${@:2}" 2>&1 \
    | tee -a "$out/bench_xl.md"
}
[ -n "${SKIP_TESTS:-}" ] || run 120 python3 -m pytest -q -p no:warnings tests/clipping/test_engine_gpu.py \
  tests/privacy/test_noise.py tests/privacy/test_cuda_graphs.py 2>&1 | tail -25 | tee "$out/gpu_tests.log"
bench 110 --batch_size 64 --modes non_private flash_bk --cuda_graphs
bench 100 --batch_size 128 --modes non_private flash_bk --cuda_graphs
bench 80 --batch_size 32 --modes non_private flash_bk --cuda_graphs
bench 100 --batch_size 64 --modes non_private flash_bk opacus_ghost
bench 80 --batch_size 128 --modes non_private flash_bk
bench 60 --batch_size 32 --modes non_private flash_bk
python3 benchmarks/gpu_table.py "$out/bench_xl.md" | tee "$out/table.md"

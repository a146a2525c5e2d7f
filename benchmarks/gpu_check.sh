#!/usr/bin/env bash
# The GPU checks of one session, in one device call: the CUDA tests (engine, noise, CUDA graphs), then DiT-XL/2 at
# 256px (32x32 latents) in bf16 autocast at batch 64, 128 and 32, eager and with CUDA graphs (non-private captured
# whole; flash_bk with dp_utils.CudaGraphedStep and make_private(cuda_graphs=True)). Run from the repository root with the wheels of ../shared/tools/gpu/fetch-wheels.sh
# in .whl/; results (test log, tables, JSON lines) go to $OUT (or ./gpu-results).
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
site=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
export PYTHONPATH=$site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, diffusers, opacus; print(torch.__version__, diffusers.__version__, opacus.__version__)" \
  | tee -a "$out/device.txt"
[ -n "${SKIP_TESTS:-}" ] || timeout 90 python3 -m pytest -q -p no:warnings tests/clipping/test_engine_gpu.py tests/privacy/test_noise.py tests/privacy/test_cuda_graphs.py 2>&1 | tail -15 \
  | tee "$out/gpu_tests.log"
bench() { timeout "$1" python3 benchmarks/bench_step.py --model DiT-XL/2 --latent_size 32 --bf16 --steps 5 --warmup 2 \
  "${@:2}" 2>&1 | tee -a "$out/bench_xl.md"; }
bench 120 --batch_size 64 --modes non_private flash_bk --cuda_graphs
bench 100 --batch_size 128 --modes non_private flash_bk --cuda_graphs
bench 70 --batch_size 32 --modes non_private flash_bk --cuda_graphs
bench 120 --batch_size 64 --modes non_private flash_bk opacus_ghost
bench 90 --batch_size 128 --modes non_private flash_bk
bench 70 --batch_size 32 --modes non_private flash_bk

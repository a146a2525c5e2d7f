#!/usr/bin/env bash
# How the quickstart's public model (examples/digits_to_mnist/public-model) was made: a small DiT trained without
# privacy on scikit-learn's 1797 digits at 16x16, as a Hub checkpoint is made from public data. This rebuilds it into
# mnist-quickstart/public-model (30 min on 2 CPU cores); `PUBLIC_MODEL=mnist-quickstart/public-model quickstart.sh`
# uses it. A killed run continues with the same train_dp_dit.py command and --resume_from_checkpoint latest.
#   bash examples/digits_to_mnist/pretrain_public.sh [steps]      (THREADS=1 on a machine others share)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=mnist-quickstart
launch="accelerate launch -q --config_file accelerate_configs/cpu.yaml --num_cpu_threads_per_process ${THREADS:-2}"

python examples/digits_to_mnist/prepare_data.py --output_dir "$out/data"
python precompute_latents.py --train_data_dir "$out/data/public" --vae none --resolution 16 --output_dir "$out/cache-public"
$launch train_dp_dit.py --model_config examples/digits_to_mnist/dit_small.json --latent_cache "$out/cache-public" \
    --output_dir "$out/public-model" --noise_multiplier 0 --max_grad_norm 1e6 --logical_batch_size 128 \
    --max_physical_batch_size 256 --max_train_steps "${1:-3000}" --learning_rate 1e-3 --use_ema --ema_decay 0.999 \
    --checkpointing_steps 250 --checkpoints_total_limit 1 --validation_steps 250 \
    --validation_classes 0 1 2 3 4 5 6 7 8 9 --num_validation_images 6 --report_to none

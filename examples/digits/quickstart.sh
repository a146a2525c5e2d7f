#!/usr/bin/env bash
# Offline quickstart on 2 CPU cores: scikit-learn's digits, a small DiT from a config, DP at epsilon 10, and the
# same model trained without privacy, both judged by a classifier trained on the real digits.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=quickstart
launch="accelerate launch --config_file accelerate_configs/cpu.yaml --num_cpu_threads_per_process 2"
train_flags=(--model_config examples/digits/dit_digits.json --latent_cache "$out/cache" --logical_batch_size 256
             --max_physical_batch_size 256 --max_train_steps 400 --learning_rate 1e-3 --checkpointing_steps 0
             --validation_steps 400 --num_validation_images 8 --report_to none --overwrite_output_dir)

python examples/digits/prepare_digits.py --output_dir "$out/digits"
python precompute_latents.py --train_data_dir "$out/digits" --vae none --resolution 8 --output_dir "$out/cache"
$launch train_dp_dit.py "${train_flags[@]}" --output_dir "$out/dp-eps10" --target_epsilon 10
$launch train_dp_dit.py "${train_flags[@]}" --output_dir "$out/non-private" --noise_multiplier 0 --max_grad_norm 1e6
python examples/digits/judge_digits.py "$out/dp-eps10" "$out/non-private"
echo "Privacy report: $out/dp-eps10/privacy_report.json; samples: $out/dp-eps10/samples/step-000400.png"

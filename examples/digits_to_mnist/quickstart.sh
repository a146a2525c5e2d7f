#!/usr/bin/env bash
# Public -> private on CPU, offline: a DiT pre-trained on scikit-learn's digits (examples/digits_to_mnist/public-model,
# shipped as a Hub checkpoint would be; pretrain_public.sh rebuilds it, PUBLIC_MODEL=<folder> picks another) is
# fine-tuned with DP-SGD at epsilon = 10 on 4000 real MNIST digits, on diffusion timesteps 200 to 999 only, where
# shape and style are set (dp-eps10-raw), then averaged half and half with the public model's weights (dp-eps10:
# post-processing, no privacy cost; docs/tradeoff.md); the public model and both DP models are then judged against
# 1000 held-out MNIST digits (evaluate.py).
#   bash examples/digits_to_mnist/quickstart.sh          the public model and DP at epsilon 10
#   bash examples/digits_to_mnist/quickstart.sh --all    the README's table: also epsilon 1, attention-only and LoRA,
#                                                        non-private fine-tuning of the same length, DP from scratch
# THREADS=1 on a machine others share (two threads that wait for each other are slower there than one).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=mnist-quickstart
public=${PUBLIC_MODEL:-examples/digits_to_mnist/public-model}
launch="accelerate launch -q --config_file accelerate_configs/cpu.yaml --num_cpu_threads_per_process ${THREADS:-2}"
finetune=(--latent_cache "$out/cache-private" --logical_batch_size 500 --max_physical_batch_size 500
          --max_train_steps 100 --learning_rate 1e-3 --use_ema --ema_decay 0.99 --checkpointing_steps 0
          --report_to none --overwrite_output_dir)

run() {  # output name, then train_dp_dit.py flags; prints the wall time
    local start=$SECONDS
    $launch train_dp_dit.py "${finetune[@]}" --output_dir "$out/$1" "${@:2}"
    echo "$1: $((SECONDS - start)) s"
}

python examples/digits_to_mnist/prepare_data.py --output_dir "$out/data"
python precompute_latents.py --train_data_dir "$out/data/private" --vae none --resolution 16 --output_dir "$out/cache-private"
run dp-eps10-raw --pretrained_model_name_or_path "$public" --target_epsilon 10 --timestep_min 200
# alpha = 0.5 fixed in advance, not chosen on private or held-out digits: halves the noise in the weights
python interpolate_weights.py "$out/dp-eps10-raw" "$public" --alpha 0.5 --output_dir "$out/dp-eps10" --overwrite_output_dir
models=("$public" "$out/dp-eps10-raw" "$out/dp-eps10")
if [[ "${1:-}" == "--all" ]]; then
    run dp-eps10-attention --pretrained_model_name_or_path "$public" --target_epsilon 10 --trainable attention
    run dp-eps10-lora --pretrained_model_name_or_path "$public" --target_epsilon 10 --trainable lora --lora_rank 8 --save_merged
    run dp-eps1 --pretrained_model_name_or_path "$public" --target_epsilon 1
    run dp-eps1-attention --pretrained_model_name_or_path "$public" --target_epsilon 1 --trainable attention
    run non-private --pretrained_model_name_or_path "$public" --noise_multiplier 0 --max_grad_norm 1e6
    run dp-eps10-scratch --model_config examples/digits_to_mnist/dit_small.json --target_epsilon 10
    models+=("$out"/{dp-eps10-attention,dp-eps10-lora,dp-eps1,dp-eps1-attention,non-private,dp-eps10-scratch})
fi
python examples/digits_to_mnist/evaluate.py --data_dir "$out/data" --results_dir "$out" "${models[@]}"
echo "Privacy report: $out/dp-eps10/privacy_report.json; sample grids: $out/grids/"

#!/usr/bin/env bash
# Continued pretraining. Edit the variables; the defaults train the embedded default model on CPU.
# On a GPU:  MODEL=Qwen/Qwen2.5-0.5B bash run_pt.sh   (then consider --bf16, --gradient_checkpointing)
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${MODEL:-}                           # hub name or local path; empty = embedded default model
TRAIN=${TRAIN:-data/pretrain/train}
VALID=${VALID:-data/pretrain/validation}
OUTPUT=${OUTPUT:-outputs-pt}
USE_PEFT=${USE_PEFT:-False}                # LoRA barely moves a randomly initialised model: full FT by default
EPOCHS=${EPOCHS:-2}
LR=${LR:-1e-3}
BATCH=${BATCH:-8}
GRAD_ACCUM=${GRAD_ACCUM:-1}
BLOCK_SIZE=${BLOCK_SIZE:-256}

python pretraining.py \
    ${MODEL:+--model_name_or_path "$MODEL"} \
    --train_file_dir "$TRAIN" --validation_file_dir "$VALID" --output_dir "$OUTPUT" \
    --use_peft "$USE_PEFT" --block_size "$BLOCK_SIZE" \
    --num_train_epochs "$EPOCHS" --learning_rate "$LR" --warmup_steps 20 --lr_scheduler_type cosine \
    --per_device_train_batch_size "$BATCH" --per_device_eval_batch_size "$BATCH" \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --eval_strategy steps --eval_steps 100 --save_steps 200 --logging_steps 10 \
    "$@"

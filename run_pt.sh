#!/usr/bin/env bash
# Continued pretraining. Edit the variables (or set them in the environment). The defaults suit a real
# model and also run as they are on the embedded default model on CPU.
# On a GPU:  MODEL=Qwen/Qwen2.5-0.5B bash run_pt.sh --gradient_checkpointing
# A randomly initialised model (the embedded default) needs full fine-tuning: USE_PEFT=False LR=2e-3.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)        # the checkout; TRAIN, VALID, OUTPUT are relative to your directory

MODEL=${MODEL:-}                           # hub name or local path; empty = embedded default model
# Default: the sample set and its validation split. With your own TRAIN, VALID is what you give: files, or
# empty (the default) to hold out 1% of TRAIN (--validation_split_percentage).
if [ -z "${TRAIN:-}" ]; then TRAIN=$HERE/data/pretrain/train; VALID=${VALID-$HERE/data/pretrain/validation}; fi
VALID=${VALID:-}
OUTPUT=${OUTPUT:-outputs-pt}
USE_PEFT=${USE_PEFT:-True}                 # False = full fine-tuning
LORA_RANK=${LORA_RANK:-8}
EPOCHS=${EPOCHS:-1}
LR=${LR:-2e-4}
BATCH=${BATCH:-8}
GRAD_ACCUM=${GRAD_ACCUM:-1}
BLOCK_SIZE=${BLOCK_SIZE:-512}

python "$HERE/pretraining.py" \
    ${MODEL:+--model_name_or_path "$MODEL"} \
    --train_file_dir "$TRAIN" ${VALID:+--validation_file_dir "$VALID"} --output_dir "$OUTPUT" \
    --use_peft "$USE_PEFT" --lora_rank "$LORA_RANK" --lora_alpha $((LORA_RANK * 2)) --target_modules all \
    --block_size "$BLOCK_SIZE" \
    --num_train_epochs "$EPOCHS" --learning_rate "$LR" --warmup_steps 20 --lr_scheduler_type cosine \
    --per_device_train_batch_size "$BATCH" --per_device_eval_batch_size "$BATCH" \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --eval_strategy steps --eval_steps 100 --save_steps 200 --logging_steps 10 \
    "$@"

#!/usr/bin/env bash
# Supervised fine-tuning. Edit the variables; the defaults fine-tune the PT output (or the embedded
# default model) on CPU.  On a GPU:  MODEL=Qwen/Qwen2.5-0.5B-Instruct bash run_sft.sh
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${MODEL:-}                           # hub name or local path; empty = embedded default model
TRAIN=${TRAIN:-data/sft/train}
VALID=${VALID:-data/sft/validation}
OUTPUT=${OUTPUT:-outputs-sft}
TEMPLATE=${TEMPLATE:-}                     # empty = the tokenizer's own chat template
USE_PEFT=${USE_PEFT:-True}
LORA_RANK=${LORA_RANK:-8}
EPOCHS=${EPOCHS:-3}
LR=${LR:-2e-4}
BATCH=${BATCH:-8}
GRAD_ACCUM=${GRAD_ACCUM:-1}
MAX_LENGTH=${MAX_LENGTH:-512}
PACKING=${PACKING:-True}

python supervised_finetuning.py \
    ${MODEL:+--model_name_or_path "$MODEL"} ${TEMPLATE:+--template_name "$TEMPLATE"} \
    --train_file_dir "$TRAIN" --validation_file_dir "$VALID" --output_dir "$OUTPUT" \
    --use_peft "$USE_PEFT" --lora_rank "$LORA_RANK" --lora_alpha $((LORA_RANK * 2)) --target_modules all \
    --max_length "$MAX_LENGTH" --packing "$PACKING" \
    --num_train_epochs "$EPOCHS" --learning_rate "$LR" --warmup_steps 20 --lr_scheduler_type cosine \
    --per_device_train_batch_size "$BATCH" --per_device_eval_batch_size "$BATCH" \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --eval_strategy steps --eval_steps 100 --save_steps 200 --logging_steps 10 \
    "$@"

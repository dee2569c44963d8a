#!/usr/bin/env bash
# Supervised fine-tuning. Edit the variables (or set them in the environment); the defaults fine-tune the embedded
# default model on CPU. On a GPU:  MODEL=Qwen/Qwen2.5-0.5B-Instruct bash run_sft.sh
# After run_pt.sh, fine-tune its result with MODEL=<a merged PT model or a full-fine-tuning --output_dir>.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)        # the checkout; TRAIN, VALID, OUTPUT are relative to your directory

MODEL=${MODEL:-}                           # hub name or local path; empty = embedded default model
# Default: the sample set and its validation split. With your own TRAIN, VALID is what you give: files, or
# empty (the default) to hold out 1% of TRAIN (--validation_split_percentage).
if [ -z "${TRAIN:-}" ]; then TRAIN=$HERE/data/sft/train; VALID=${VALID-$HERE/data/sft/validation}; fi
VALID=${VALID:-}
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

python "$HERE/supervised_finetuning.py" \
    ${MODEL:+--model_name_or_path "$MODEL"} ${TEMPLATE:+--template_name "$TEMPLATE"} \
    --train_file_dir "$TRAIN" ${VALID:+--validation_file_dir "$VALID"} --output_dir "$OUTPUT" \
    --use_peft "$USE_PEFT" --lora_rank "$LORA_RANK" --lora_alpha $((LORA_RANK * 2)) --target_modules all \
    --max_length "$MAX_LENGTH" --packing "$PACKING" \
    --num_train_epochs "$EPOCHS" --learning_rate "$LR" --warmup_steps 20 --lr_scheduler_type cosine \
    --per_device_train_batch_size "$BATCH" --per_device_eval_batch_size "$BATCH" \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --eval_strategy steps --eval_steps 100 --save_steps 200 --logging_steps 10 \
    "$@"

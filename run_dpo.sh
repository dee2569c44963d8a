#!/usr/bin/env bash
# DPO: preference optimisation against a reference (the LoRA-disabled base, or a frozen copy).
# Edit the variables (or set them in the environment). The defaults suit a real model (LoRA) and also run
# as they are on the embedded default model on CPU.  On a GPU:  MODEL=Qwen/Qwen2.5-0.5B-Instruct bash run_dpo.sh
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)        # the checkout; TRAIN, VALID, OUTPUT are relative to your directory

MODEL=${MODEL:-}                           # hub name or local path (usually the SFT model, merged); empty = embedded
# Default: the sample set and its validation split. With your own TRAIN, VALID is what you give: files, or
# empty (the default) to hold out 1% of TRAIN (--validation_split_percentage).
if [ -z "${TRAIN:-}" ]; then TRAIN=$HERE/data/preference/train; VALID=${VALID-$HERE/data/preference/validation}; fi
VALID=${VALID:-}
OUTPUT=${OUTPUT:-outputs-dpo}
TEMPLATE=${TEMPLATE:-}                     # empty = the tokenizer's own chat template
USE_PEFT=${USE_PEFT:-True}
LORA_RANK=${LORA_RANK:-8}
EPOCHS=${EPOCHS:-1}
LR=${LR:-5e-5}
BATCH=${BATCH:-4}
GRAD_ACCUM=${GRAD_ACCUM:-1}
MAX_LENGTH=${MAX_LENGTH:-1024}             # prompt + answer tokens; longer pairs are cut, prompt first
LONG_PAIRS=${LONG_PAIRS:-truncate}         # truncate or drop pairs over MAX_LENGTH
BETA=${BETA:-0.1}
LOSS_TYPE=${LOSS_TYPE:-sigmoid}            # sigmoid, ipo, hinge, robust, ... (see: python dpo_training.py --help)

python "$HERE/dpo_training.py" \
    ${MODEL:+--model_name_or_path "$MODEL"} ${TEMPLATE:+--template_name "$TEMPLATE"} \
    --train_file_dir "$TRAIN" ${VALID:+--validation_file_dir "$VALID"} --output_dir "$OUTPUT" \
    --use_peft "$USE_PEFT" --lora_rank "$LORA_RANK" --lora_alpha $((LORA_RANK * 2)) --target_modules all \
    --max_length "$MAX_LENGTH" --long_pairs "$LONG_PAIRS" \
    --num_train_epochs "$EPOCHS" --learning_rate "$LR" --warmup_steps 10 --lr_scheduler_type cosine \
    --per_device_train_batch_size "$BATCH" --per_device_eval_batch_size "$BATCH" \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --eval_strategy steps --eval_steps 50 --save_steps 200 --logging_steps 10 \
    --beta "$BETA" --loss_type "$LOSS_TYPE" "$@"

#!/usr/bin/env bash
# On-policy distillation: the student answers the prompts of SFT conversations and learns the teacher's next-token
# distributions on its own answers. Teacher and student must share a tokenizer (else: offline distillation, README).
# Edit the variables (or set them in the environment). The defaults distil a merged SFT model into the embedded
# default model on CPU. On a GPU:
#   MODEL=Qwen/Qwen2.5-0.5B-Instruct TEACHER=Qwen/Qwen2.5-7B-Instruct TEACHER_4BIT=True bash run_distill.sh
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)        # the checkout; TRAIN, VALID, OUTPUT, TEACHER are relative to your directory

MODEL=${MODEL:-}                           # the student: hub name or local path; empty = embedded default model
TEACHER=${TEACHER:-outputs-sft-merged}     # the teacher: a merged model (merge_peft_adapter.py) or hub name
TEACHER_4BIT=${TEACHER_4BIT:-False}        # load the teacher in 4-bit (bitsandbytes) to save memory
# Default: the sample set and its validation split. With your own TRAIN, VALID is what you give: files, or
# empty (the default) to hold out 1% of TRAIN (--validation_split_percentage).
if [ -z "${TRAIN:-}" ]; then TRAIN=$HERE/data/sft/train; VALID=${VALID-$HERE/data/sft/validation}; fi
VALID=${VALID:-}
OUTPUT=${OUTPUT:-outputs-distill}
TEMPLATE=${TEMPLATE:-}                     # empty = the tokenizer's own chat template
USE_PEFT=${USE_PEFT:-True}
LORA_RANK=${LORA_RANK:-8}
EPOCHS=${EPOCHS:-1}
LR=${LR:-1e-5}
BATCH=${BATCH:-8}
GRAD_ACCUM=${GRAD_ACCUM:-1}
MAX_COMPLETION_LENGTH=${MAX_COMPLETION_LENGTH:-256}
TEMPERATURE=${TEMPERATURE:-1.0}            # sampling and loss temperature
BETA=${BETA:-1.0}                          # 0 = forward KL, 0.5 = JSD, 1 = reverse KL (TRL's default)

python "$HERE/distillation_training.py" \
    ${MODEL:+--model_name_or_path "$MODEL"} --teacher_model_name_or_path "$TEACHER" \
    --teacher_load_in_4bit "$TEACHER_4BIT" ${TEMPLATE:+--template_name "$TEMPLATE"} \
    --train_file_dir "$TRAIN" ${VALID:+--validation_file_dir "$VALID"} --output_dir "$OUTPUT" \
    --use_peft "$USE_PEFT" --lora_rank "$LORA_RANK" --lora_alpha $((LORA_RANK * 2)) --target_modules all \
    --max_completion_length "$MAX_COMPLETION_LENGTH" --temperature "$TEMPERATURE" --beta "$BETA" \
    --num_train_epochs "$EPOCHS" --learning_rate "$LR" --warmup_steps 20 --lr_scheduler_type cosine \
    --per_device_train_batch_size "$BATCH" --per_device_eval_batch_size "$BATCH" \
    --gradient_accumulation_steps "$GRAD_ACCUM" --save_steps 200 --logging_steps 10 \
    "$@"

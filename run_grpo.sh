#!/usr/bin/env bash
# GRPO: sample NUM_GENERATIONS answers per question, reward them with rule-based checks (and optionally a reward
# model), and push the policy towards the better ones of each group.
# Edit the variables (or set them in the environment). The defaults suit a real model (LoRA) and also run as they
# are on the embedded default model on CPU.  On a GPU:  MODEL=Qwen/Qwen2.5-0.5B-Instruct bash run_grpo.sh
# The final evaluation samples NUM_GENERATIONS answers for each of the first 32 validation prompts; pass
# --max_eval_samples N to evaluate more (or fewer), VALID= with --validation_split_percentage 0 for none.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)        # the checkout; TRAIN, VALID, OUTPUT are relative to your directory

MODEL=${MODEL:-}                           # hub name or local path (usually the SFT model, merged); empty = embedded
# Default: the sample set and its validation split. With your own TRAIN, VALID is what you give: files, or
# empty (the default) to hold out 1% of TRAIN (--validation_split_percentage).
if [ -z "${TRAIN:-}" ]; then TRAIN=$HERE/data/grpo/train; VALID=${VALID-$HERE/data/grpo/validation}; fi
VALID=${VALID:-}
OUTPUT=${OUTPUT:-outputs-grpo}
TEMPLATE=${TEMPLATE:-}                     # empty = the tokenizer's own chat template
USE_PEFT=${USE_PEFT:-True}
LORA_RANK=${LORA_RANK:-8}
EPOCHS=${EPOCHS:-1}
MAX_STEPS=${MAX_STEPS:--1}                 # -1 = run EPOCHS epochs
LR=${LR:-1e-5}
BATCH=${BATCH:-8}                          # completions per device step: BATCH / NUM_GENERATIONS prompts
GRAD_ACCUM=${GRAD_ACCUM:-1}
NUM_GENERATIONS=${NUM_GENERATIONS:-4}      # must divide BATCH * GRAD_ACCUM * number of GPUs
MAX_COMPLETION_LENGTH=${MAX_COMPLETION_LENGTH:-256}
TEMPERATURE=${TEMPERATURE:-1.0}
BETA=${BETA:-0.0}                          # KL weight; 0 = no reference model
LOSS_TYPE=${LOSS_TYPE:-dapo}               # dapo, grpo, dr_grpo, bnpo, ... (see: python grpo_training.py --help)
REWARD_FUNCS=${REWARD_FUNCS:-format_reward,answer_accuracy}  # names from medicalgpt/rewards.py or module:function
REWARD_WEIGHTS=${REWARD_WEIGHTS:-}         # comma-separated, one per reward; empty = all 1.0
REWARD_MODEL=${REWARD_MODEL:-}             # a merged reward model (see merge_peft_adapter.py); empty = none
USE_VLLM=${USE_VLLM:-False}                # True needs vllm and a CUDA GPU

python "$HERE/grpo_training.py" \
    ${MODEL:+--model_name_or_path "$MODEL"} ${TEMPLATE:+--template_name "$TEMPLATE"} \
    --train_file_dir "$TRAIN" ${VALID:+--validation_file_dir "$VALID"} --output_dir "$OUTPUT" \
    --use_peft "$USE_PEFT" --lora_rank "$LORA_RANK" --lora_alpha $((LORA_RANK * 2)) --target_modules all \
    --num_train_epochs "$EPOCHS" --max_steps "$MAX_STEPS" --learning_rate "$LR" --warmup_steps 10 \
    --lr_scheduler_type cosine --per_device_train_batch_size "$BATCH" --per_device_eval_batch_size "$BATCH" \
    --gradient_accumulation_steps "$GRAD_ACCUM" --save_steps 50 --logging_steps 5 \
    --num_generations "$NUM_GENERATIONS" --max_completion_length "$MAX_COMPLETION_LENGTH" \
    --temperature "$TEMPERATURE" --beta "$BETA" --loss_type "$LOSS_TYPE" --use_vllm "$USE_VLLM" \
    --reward_funcs "$REWARD_FUNCS" ${REWARD_WEIGHTS:+--reward_weights "$REWARD_WEIGHTS"} \
    ${REWARD_MODEL:+--reward_model "$REWARD_MODEL"} "$@"

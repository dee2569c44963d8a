#!/usr/bin/env bash
# GRPO: sample num_generations answers per question, reward them with rule-based checks (and optionally a
# reward model), and push the policy towards the better ones of each group. The settings suit a real model
# (LoRA) and also run as they are on the embedded default model on CPU.
# On a GPU:  MODEL=Qwen/Qwen2.5-0.5B-Instruct bash run_grpo.sh
# The final evaluation samples num_generations answers for each of the first 32 validation prompts; pass
# --max_eval_samples N to evaluate more (or fewer), VALID= with --validation_split_percentage 0 for none.
# Settings live in configs/grpo.yaml: edit it (or a copy, named by CONFIG), or pass flags, which win over it:
#   bash run_grpo.sh --learning_rate 1e-4 --num_train_epochs 2
# The variables below (set them here or in the environment) are what depends on your machine and data.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)        # the checkout; CONFIG, TRAIN, VALID, OUTPUT are relative to your directory

CONFIG=${CONFIG:-$HERE/configs/grpo.yaml}
MODEL=${MODEL:-}                           # hub name or local path (usually the SFT model, merged); empty = embedded
REWARD_MODEL=${REWARD_MODEL:-}             # a merged reward model (see merge_peft_adapter.py); empty = none
# Default: the sample set and its validation split. With your own TRAIN, VALID is what you give: files, or
# empty (the default) to hold out 1% of TRAIN (--validation_split_percentage).
if [ -z "${TRAIN:-}" ]; then TRAIN=$HERE/data/grpo/train; VALID=${VALID-$HERE/data/grpo/validation}; fi
VALID=${VALID:-}
OUTPUT=${OUTPUT:-}                         # empty = the config's output_dir (outputs-grpo)
TEMPLATE=${TEMPLATE:-}                     # empty = the tokenizer's own chat template
LAUNCH=${LAUNCH:-python}                   # or e.g. "torchrun --nproc_per_node 8": one process per GPU

# shellcheck disable=SC2086  # LAUNCH is a command and its arguments
$LAUNCH "$HERE/grpo_training.py" "$CONFIG" \
    ${MODEL:+--model_name_or_path "$MODEL"} ${TEMPLATE:+--template_name "$TEMPLATE"} \
    ${REWARD_MODEL:+--reward_model "$REWARD_MODEL"} \
    --train_file_dir "$TRAIN" ${VALID:+--validation_file_dir "$VALID"} ${OUTPUT:+--output_dir "$OUTPUT"} "$@"

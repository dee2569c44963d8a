#!/usr/bin/env bash
# DPO: preference optimisation against a reference (the LoRA-disabled base, or a frozen copy).
# The settings suit a real model (LoRA) and also run as they are on the embedded default model on CPU.
# On a GPU:  MODEL=Qwen/Qwen2.5-0.5B-Instruct bash run_dpo.sh
# Settings live in configs/dpo.yaml: edit it (or a copy, named by CONFIG), or pass flags, which win over it:
#   bash run_dpo.sh --learning_rate 1e-4 --num_train_epochs 2
# The variables below (set them here or in the environment) are what depends on your machine and data.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)        # the checkout; CONFIG, TRAIN, VALID, OUTPUT are relative to your directory

CONFIG=${CONFIG:-$HERE/configs/dpo.yaml}
MODEL=${MODEL:-}                           # hub name or local path (usually the SFT model, merged); empty = embedded
# Default: the sample set and its validation split. With your own TRAIN, VALID is what you give: files, or
# empty (the default) to hold out 1% of TRAIN (--validation_split_percentage).
if [ -z "${TRAIN:-}" ]; then TRAIN=$HERE/data/preference/train; VALID=${VALID-$HERE/data/preference/validation}; fi
VALID=${VALID:-}
OUTPUT=${OUTPUT:-}                         # empty = the config's output_dir (outputs-dpo)
TEMPLATE=${TEMPLATE:-}                     # empty = the tokenizer's own chat template
LAUNCH=${LAUNCH:-python}                   # or e.g. "torchrun --nproc_per_node 8": one process per GPU

# shellcheck disable=SC2086  # LAUNCH is a command and its arguments
$LAUNCH "$HERE/dpo_training.py" "$CONFIG" \
    ${MODEL:+--model_name_or_path "$MODEL"} ${TEMPLATE:+--template_name "$TEMPLATE"} \
    --train_file_dir "$TRAIN" ${VALID:+--validation_file_dir "$VALID"} ${OUTPUT:+--output_dir "$OUTPUT"} "$@"

#!/usr/bin/env bash
# Supervised fine-tuning; the settings fine-tune the embedded default model on CPU as they are.
# On a GPU:  MODEL=Qwen/Qwen2.5-0.5B-Instruct bash run_sft.sh
# After run_pt.sh, fine-tune its result with MODEL=<a merged PT model or a full-fine-tuning --output_dir>.
# Settings live in configs/sft.yaml: edit it (or a copy, named by CONFIG), or pass flags, which win over it:
#   bash run_sft.sh --learning_rate 1e-4 --num_train_epochs 2
# The variables below (set them here or in the environment) are what depends on your machine and data.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)        # the checkout; CONFIG, TRAIN, VALID, OUTPUT are relative to your directory

CONFIG=${CONFIG:-$HERE/configs/sft.yaml}
MODEL=${MODEL:-}                           # hub name or local path; empty = embedded default model
# Default: the sample set and its validation split. With your own TRAIN, VALID is what you give: files, or
# empty (the default) to hold out 1% of TRAIN (--validation_split_percentage).
if [ -z "${TRAIN:-}" ]; then TRAIN=$HERE/data/sft/train; VALID=${VALID-$HERE/data/sft/validation}; fi
VALID=${VALID:-}
OUTPUT=${OUTPUT:-}                         # empty = the config's output_dir (outputs-sft)
TEMPLATE=${TEMPLATE:-}                     # empty = the tokenizer's own chat template
LAUNCH=${LAUNCH:-python}                   # or e.g. "torchrun --nproc_per_node 8": one process per GPU

# shellcheck disable=SC2086  # LAUNCH is a command and its arguments
$LAUNCH "$HERE/supervised_finetuning.py" "$CONFIG" \
    ${MODEL:+--model_name_or_path "$MODEL"} ${TEMPLATE:+--template_name "$TEMPLATE"} \
    --train_file_dir "$TRAIN" ${VALID:+--validation_file_dir "$VALID"} ${OUTPUT:+--output_dir "$OUTPUT"} "$@"

#!/usr/bin/env bash
# On-policy distillation: the student answers the prompts of SFT conversations and learns the teacher's next-token
# distributions on its own answers. Teacher and student must share a tokenizer (else: offline distillation, README).
# The defaults distil a merged SFT model into the embedded default model on CPU. On a GPU, with a 4-bit teacher:
#   MODEL=Qwen/Qwen2.5-0.5B-Instruct TEACHER=Qwen/Qwen2.5-7B-Instruct bash run_distill.sh --teacher_load_in_4bit True
# Settings live in configs/distill.yaml: edit it (or a copy, named by CONFIG), or pass flags, which win over it:
#   bash run_distill.sh --learning_rate 1e-4 --beta 0.5
# The variables below (set them here or in the environment) are what depends on your machine and data.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)        # the checkout; CONFIG, TEACHER, TRAIN, VALID, OUTPUT are relative to your directory

CONFIG=${CONFIG:-$HERE/configs/distill.yaml}
MODEL=${MODEL:-}                           # the student: hub name or local path; empty = embedded default model
TEACHER=${TEACHER:-outputs-sft-merged}     # the teacher: a merged model (merge_peft_adapter.py) or hub name
# Default: the sample set and its validation split. With your own TRAIN, VALID is what you give: files, or
# empty (the default) to hold out 1% of TRAIN (--validation_split_percentage).
if [ -z "${TRAIN:-}" ]; then TRAIN=$HERE/data/sft/train; VALID=${VALID-$HERE/data/sft/validation}; fi
VALID=${VALID:-}
OUTPUT=${OUTPUT:-}                         # empty = the config's output_dir (outputs-distill)
TEMPLATE=${TEMPLATE:-}                     # empty = the tokenizer's own chat template
LAUNCH=${LAUNCH:-python}                   # or e.g. "torchrun --nproc_per_node 8": one process per GPU

# shellcheck disable=SC2086  # LAUNCH is a command and its arguments
$LAUNCH "$HERE/distillation_training.py" "$CONFIG" \
    ${MODEL:+--model_name_or_path "$MODEL"} --teacher_model_name_or_path "$TEACHER" \
    ${TEMPLATE:+--template_name "$TEMPLATE"} \
    --train_file_dir "$TRAIN" ${VALID:+--validation_file_dir "$VALID"} ${OUTPUT:+--output_dir "$OUTPUT"} "$@"

#!/usr/bin/env bash
# RLHF chain: SFT (LoRA) -> merge -> reward model (LoRA, on the merged SFT model) -> PPO.
# The defaults run on the embedded default model on CPU; on a GPU:  MODEL=Qwen/Qwen2.5-0.5B-Instruct bash run_ppo.sh
# With an SFT model already at hand, skip the first two steps:  SFT_MODEL=path/to/merged-sft bash run_ppo.sh
# PPO's settings live in configs/ppo.yaml: edit it (or a copy, named by CONFIG), or pass flags, which reach PPO only:
#   bash run_ppo.sh --learning_rate 1e-4 --max_steps 200
# The SFT and reward-model steps run with configs/sft.yaml and configs/rm.yaml on the sample data.
# The variables below (set them here or in the environment) are what depends on your machine and data.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)        # the checkout; CONFIG, OUT, PROMPTS, SFT_MODEL are relative to your directory

CONFIG=${CONFIG:-$HERE/configs/ppo.yaml}
MODEL=${MODEL:-}                           # base model for SFT; empty = embedded default model
SFT_MODEL=${SFT_MODEL:-}                   # a merged SFT model: skips SFT and merging
OUT=${OUT:-outputs-rlhf}
PROMPTS=${PROMPTS:-$HERE/data/sft/train}   # SFT conversations (every user turn becomes a prompt) or prompt files
TEMPLATE=${TEMPLATE:-}                     # empty = the tokenizer's own chat template

# The wrappers of the first steps read these variables too: they must not see PPO's.
step() { env -u CONFIG -u TRAIN -u VALID -u OUTPUT "$@"; }

if [ -z "$SFT_MODEL" ]; then
    echo "==> SFT"
    step MODEL="$MODEL" OUTPUT="$OUT/sft" TEMPLATE="$TEMPLATE" bash "$HERE/run_sft.sh" --resume_from_checkpoint auto
    echo "==> Merge the SFT adapter"
    python "$HERE/merge_peft_adapter.py" ${MODEL:+--base_model "$MODEL"} --lora_model "$OUT/sft" \
        --output_dir "$OUT/sft-merged"
    SFT_MODEL=$OUT/sft-merged
fi

echo "==> Reward model"
step MODEL="$SFT_MODEL" OUTPUT="$OUT/rm" TEMPLATE="$TEMPLATE" bash "$HERE/run_rm.sh" --resume_from_checkpoint auto

echo "==> PPO"  # one process: PPO's loop has no data parallelism
python "$HERE/ppo_training.py" "$CONFIG" --model_name_or_path "$SFT_MODEL" ${TEMPLATE:+--template_name "$TEMPLATE"} \
    --reward_model "$OUT/rm" --train_file_dir "$PROMPTS" --output_dir "$OUT/ppo" --resume_from_checkpoint auto "$@"

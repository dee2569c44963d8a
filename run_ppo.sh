#!/usr/bin/env bash
# RLHF chain: SFT (LoRA) -> merge -> reward model (LoRA, on the merged SFT model) -> PPO.
# Edit the variables (or set them in the environment). The defaults run on the embedded default model on CPU;
# on a GPU:  MODEL=Qwen/Qwen2.5-0.5B-Instruct bash run_ppo.sh
# With an SFT model already at hand, skip the first two steps:  SFT_MODEL=path/to/merged-sft bash run_ppo.sh
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)        # the checkout; OUT, PROMPTS, SFT_MODEL are relative to your directory

MODEL=${MODEL:-}                           # base model for SFT; empty = embedded default model
SFT_MODEL=${SFT_MODEL:-}                   # a merged SFT model: skips SFT and merging
OUT=${OUT:-outputs-rlhf}
PROMPTS=${PROMPTS:-$HERE/data/sft/train}   # SFT conversations (every user turn becomes a prompt) or prompt files
TEMPLATE=${TEMPLATE:-}                     # empty = the tokenizer's own chat template
PPO_STEPS=${PPO_STEPS:-100}
BATCH=${BATCH:-8}                          # prompts per rollout batch
MINI_BATCH=${MINI_BATCH:-4}
PPO_EPOCHS=${PPO_EPOCHS:-2}
LR=${LR:-1e-5}
KL_COEF=${KL_COEF:-0.05}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-64}
VALUE_MODEL=${VALUE_MODEL:-head}           # head (on the policy) or critic (initialised from the reward model)

# The SFT and reward-model steps run with their own wrappers' defaults and sample data: variables set for PPO
# (BATCH, LR, ...) do not reach them. Tune them with SFT_MODEL (your own SFT model), or run those wrappers yourself.
step() { env -u TRAIN -u VALID -u OUTPUT -u EPOCHS -u LR -u BATCH -u GRAD_ACCUM -u USE_PEFT -u LORA_RANK "$@"; }

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

echo "==> PPO"
python "$HERE/ppo_training.py" --model_name_or_path "$SFT_MODEL" ${TEMPLATE:+--template_name "$TEMPLATE"} \
    --reward_model "$OUT/rm" --value_model "$VALUE_MODEL" \
    --train_file_dir "$PROMPTS" --output_dir "$OUT/ppo" \
    --max_steps "$PPO_STEPS" --batch_size "$BATCH" --mini_batch_size "$MINI_BATCH" --ppo_epochs "$PPO_EPOCHS" \
    --learning_rate "$LR" --kl_coef "$KL_COEF" --max_new_tokens "$MAX_NEW_TOKENS" \
    --resume_from_checkpoint auto "$@"

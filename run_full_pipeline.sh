#!/usr/bin/env bash
# The main job (`make demo`): every stage on the embedded default model, offline, on CPU, with a table of
# held-out metrics before and after each stage.
#   base model -> PT -> SFT -> reward model -> PPO,   and from the SFT model: DPO, ORPO, GRPO (after an SFT warm-up);
#   plus an SFT run without PT (what PT is worth), distillation of the SFT model into a student made of two of its
#   layers (against plain SFT of the same student), merged models and sample answers through inference.py.
#   RAG: the SFT model answers from data/rag's documents, without and with retrieval (docs/rag.md).
#   Tool use: SFT of the SFT model on data/tools, with tool-call and in-context copy accuracy before and after
#   (docs/tool-calling.md).
# Writes $OUT/results.{json,md} (the table), $OUT/curves.png (every stage's curves) and each stage's outputs.
# FAST=1 runs a few steps of everything (the test suite's end-to-end check).
set -euo pipefail
cd "$(dirname "$0")"

OUT=${OUT:-outputs-pipeline}
export OMP_NUM_THREADS=${PIPELINE_THREADS:-2} HF_HUB_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1
if [ "${FAST:-0}" = 1 ]; then   # a smoke run: a few steps of every stage
    PT=(--max_steps 4) SFT=(--max_steps 4) PREF=(--max_steps 2) DPO=(--max_steps 2) RL=(--max_steps 2)
    GRPO_WARMUP=(--max_steps 2) GRPO=(--max_steps 2) DISTILL=(--max_steps 2) STUDENT_SFT=(--max_steps 2)
    TOOLS=(--max_steps 2) TOOL_TOKENS=8
    EVAL=(--max_new_tokens 8) MODEL_SIZE=tiny STUDENT_LAYERS=0   # the tiny model has 2 layers
else
    PT=(--num_train_epochs 30) SFT=(--num_train_epochs 4) PREF=(--num_train_epochs 2) DPO=(--num_train_epochs 3)
    RL=(--max_steps 50) GRPO_WARMUP=(--num_train_epochs 6) GRPO=(--max_steps 60) DISTILL=(--max_steps 120)
    STUDENT_SFT=(--num_train_epochs 1)
    TOOLS=(--max_steps 80) TOOL_TOKENS=96
    EVAL=() MODEL_SIZE=default STUDENT_LAYERS=0,3   # the first and last of 4
fi
COMMON=(--report_to tensorboard --save_strategy no --logging_steps 5 --disable_tqdm True)
# TUNED: the stage configs warm up, decay the learning rate and evaluate every few steps; these short runs were tuned
# without warm-up, with a linear decay, and are evaluated once at the end by evaluate_model.py.
TUNED=("${COMMON[@]}" --warmup_steps 0 --lr_scheduler_type linear --eval_strategy no)
HELD_OUT=(--perplexity_files data/pretrain/validation --mcq_file data/eval/mcq_validation.jsonl)
PAIRS=(--train_file_dir data/preference/train --validation_file_dir data/preference/validation)
RESULTS=$OUT/results.jsonl

START=$SECONDS
stage() { printf '\n==> [%4ds] %s\n' $((SECONDS - START)) "$*"; }
evaluate() { python evaluate_model.py --results_file "$RESULTS" "${EVAL[@]}" "$@" 2>&1 | tail -n 1; }  # its table row
rm -rf "$OUT" && mkdir -p "$OUT"

stage "Build the embedded default model ($MODEL_SIZE)"
python -m medicalgpt.default_model --output_dir "$OUT/base" --size "$MODEL_SIZE"
evaluate --name base --model_name_or_path "$OUT/base" "${HELD_OUT[@]}"

stage "PT: continued pretraining on data/pretrain (full fine-tuning of a random model)"
python pretraining.py --model_name_or_path "$OUT/base" --output_dir "$OUT/pt" --use_peft False \
    --train_file_dir data/pretrain/train --validation_file_dir data/pretrain/validation --block_size 256 \
    --learning_rate 2e-3 --warmup_steps 20 --lr_scheduler_type cosine --per_device_train_batch_size 8 \
    --eval_strategy epoch "${COMMON[@]}" "${PT[@]}"
evaluate --name pt --model_name_or_path "$OUT/pt" "${HELD_OUT[@]}"

sft() {  # sft NAME BASE: LoRA SFT on data/sft, then merged for the next stages
    python supervised_finetuning.py --model_name_or_path "$2" --output_dir "$OUT/$1" \
        --train_file_dir data/sft/train --validation_file_dir data/sft/validation --packing True \
        --lora_rank 16 --lora_alpha 32 --learning_rate 2e-3 --warmup_steps 10 --lr_scheduler_type cosine \
        --per_device_train_batch_size 8 --eval_strategy epoch "${COMMON[@]}" "${SFT[@]}"
    python merge_peft_adapter.py --base_model "$2" --lora_model "$OUT/$1" --output_dir "$OUT/$1-merged"
}
stage "SFT: LoRA on the PT model, data/sft"
sft sft "$OUT/pt"
evaluate --name sft --model_name_or_path "$OUT/sft-merged" "${HELD_OUT[@]}" \
    --preference_file data/preference/validation --answer_file data/grpo/validation
stage "SFT without PT (the same recipe on the untrained model: what PT is worth)"
sft sft_no_pt "$OUT/base"
evaluate --name sft_no_pt --model_name_or_path "$OUT/sft_no_pt-merged" "${HELD_OUT[@]}"

stage "Distillation: a student of the SFT model's layers $STUDENT_LAYERS learns its distributions on its own answers"
python -m medicalgpt.student --teacher_model "$OUT/sft-merged" --keep_layers "$STUDENT_LAYERS" \
    --output_dir "$OUT/student"
STUDENT_EVAL=(--teacher_model "$OUT/sft-merged" --answer_file data/grpo/validation "${HELD_OUT[@]}")
evaluate --name student --model_name_or_path "$OUT/student" "${STUDENT_EVAL[@]}"
python distillation_training.py --model_name_or_path "$OUT/student" --teacher_model_name_or_path "$OUT/sft-merged" \
    --output_dir "$OUT/distill" --train_file_dir data/sft/train --use_peft False --learning_rate 5e-4 --beta 0 \
    --per_device_train_batch_size 8 --max_completion_length 32 "${TUNED[@]}" "${DISTILL[@]}"
evaluate --name distill --model_name_or_path "$OUT/distill" "${STUDENT_EVAL[@]}"
python supervised_finetuning.py --model_name_or_path "$OUT/student" --output_dir "$OUT/student_sft" \
    --train_file_dir data/sft/train --use_peft False --learning_rate 3e-4 --per_device_train_batch_size 8 \
    --packing True "${TUNED[@]}" "${STUDENT_SFT[@]}"
evaluate --name student_sft --model_name_or_path "$OUT/student_sft" "${STUDENT_EVAL[@]}"

stage "Reward model on the SFT model, data/preference"
python reward_modeling.py --model_name_or_path "$OUT/sft-merged" --output_dir "$OUT/rm" "${PAIRS[@]}" \
    --lora_rank 16 --lora_alpha 32 --learning_rate 2e-3 --per_device_train_batch_size 8 "${TUNED[@]}" "${PREF[@]}"
# The rm row also scores the SFT model's answers to held-out questions (PPO's start) and the references (its ceiling).
REWARD_EVAL=(--reward_model "$OUT/rm" --reward_file data/sft/validation)
evaluate --name rm --model_name_or_path "$OUT/sft-merged" --preference_file data/preference/validation \
    "${REWARD_EVAL[@]}"

stage "PPO from the SFT model against the reward model"
# 50 steps: at 40 the held-out reward had gone 47% of the way to the references', at 60 past them with MCQ lower.
python ppo_training.py --model_name_or_path "$OUT/sft-merged" --reward_model "$OUT/rm" --output_dir "$OUT/ppo" \
    --train_file_dir data/sft/train --batch_size 8 --mini_batch_size 4 --max_new_tokens 32 --learning_rate 3e-4 \
    --lora_rank 16 --lora_alpha 32 --kl_coef 0.3 --report_to tensorboard "${RL[@]}"
evaluate --name ppo --model_name_or_path "$OUT/sft-merged" --lora_model "$OUT/ppo" "${HELD_OUT[@]}" \
    "${REWARD_EVAL[@]}" --answer_file data/grpo/validation

stage "DPO from the SFT model"
python dpo_training.py --model_name_or_path "$OUT/sft-merged" --output_dir "$OUT/dpo" "${PAIRS[@]}" --beta 0.5 \
    --lora_rank 16 --lora_alpha 32 --learning_rate 1e-3 --per_device_train_batch_size 8 "${TUNED[@]}" "${DPO[@]}"
evaluate --name dpo --model_name_or_path "$OUT/sft-merged" --lora_model "$OUT/dpo" "${HELD_OUT[@]}" \
    --preference_file data/preference/validation --implicit_reward

stage "ORPO from the SFT model"
python orpo_training.py --model_name_or_path "$OUT/sft-merged" --output_dir "$OUT/orpo" "${PAIRS[@]}" --beta 0.1 \
    --lora_rank 16 --lora_alpha 32 --learning_rate 1e-3 --per_device_train_batch_size 8 "${TUNED[@]}" "${PREF[@]}"
evaluate --name orpo --model_name_or_path "$OUT/sft-merged" --lora_model "$OUT/orpo" "${HELD_OUT[@]}" \
    --preference_file data/preference/validation --implicit_reward

stage "GRPO from the SFT model: SFT on data/grpo/train's answers (the form GRPO rewards), then GRPO, medical rewards"
# The SFT model answers many questions in the wrong form (a letter for "the drug name only", a sentence for "the letter
# only"); GRPO alone barely moves its greedy answers, so a short SFT on the training questions' reference answers
# teaches the form first and GRPO continues the same adapter (docs/main-job.md).
python supervised_finetuning.py --model_name_or_path "$OUT/sft-merged" --output_dir "$OUT/grpo_warmup" \
    --train_file_dir data/grpo/train --validation_split_percentage 0 --lora_rank 16 --lora_alpha 32 \
    --learning_rate 2e-3 --per_device_train_batch_size 8 "${TUNED[@]}" "${GRPO_WARMUP[@]}"
evaluate --name grpo_warmup --model_name_or_path "$OUT/sft-merged" --lora_model "$OUT/grpo_warmup" \
    --answer_file data/grpo/validation
python grpo_training.py --model_name_or_path "$OUT/sft-merged" --peft_path "$OUT/grpo_warmup" --output_dir "$OUT/grpo" \
    --train_file_dir data/grpo/train --reward_funcs answer_accuracy --system_prompt "" \
    --num_generations 8 --temperature 0.3 --max_completion_length 32 --per_device_train_batch_size 32 \
    --learning_rate 5e-4 "${TUNED[@]}" "${GRPO[@]}"
evaluate --name grpo --model_name_or_path "$OUT/sft-merged" --lora_model "$OUT/grpo" \
    --answer_file data/grpo/validation

stage "RAG: index data/rag/docs; the SFT model answers questions only they answer, without and with retrieval"
python rag.py index data/rag/docs --index_dir "$OUT/rag-index"
evaluate --name rag --model_name_or_path "$OUT/sft-merged" --rag_index "$OUT/rag-index"

stage "Tool use: full SFT of the SFT model on data/tools (three medical tools), tool and copy accuracy before and after"
TOOL_EVAL=(--tool_file data/tools/validation --max_new_tokens "$TOOL_TOKENS" --copy_accuracy True)
evaluate --name tools_before --model_name_or_path "$OUT/sft-merged" "${TOOL_EVAL[@]}"
python supervised_finetuning.py --model_name_or_path "$OUT/sft-merged" --output_dir "$OUT/tools" --use_peft False \
    --train_file_dir data/tools/train --max_length 768 --packing True --learning_rate 2e-3 --warmup_steps 5 \
    --lr_scheduler_type cosine --per_device_train_batch_size 8 "${COMMON[@]}" "${TOOLS[@]}"
evaluate --name tools --model_name_or_path "$OUT/tools" "${TOOL_EVAL[@]}"
python inference.py --base_model "$OUT/tools" --data_file data/tools/questions.jsonl \
    --output_file "$OUT/tool_answers.jsonl" --temperature 0 --max_new_tokens 96
head -n 2 "$OUT/tool_answers.jsonl"

stage "Merge DPO and answer held-out questions with inference.py"
python merge_peft_adapter.py --base_model "$OUT/sft-merged" --lora_model "$OUT/dpo" --output_dir "$OUT/dpo-merged"
python inference.py --base_model "$OUT/dpo-merged" --data_file data/sft/validation/sharegpt_medical.jsonl \
    --output_file "$OUT/answers.jsonl" --temperature 0 --max_new_tokens 48
head -n 3 "$OUT/answers.jsonl"

stage "Report"
python -m medicalgpt.report "$OUT"
stage "Done: $OUT/results.md, $OUT/results.json, $OUT/curves.png; tensorboard --logdir $OUT"

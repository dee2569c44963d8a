#!/usr/bin/env bash
# The main job (`make demo`): build the embedded default model, pretrain it on the medical corpus,
# fine-tune it on medical conversations, and show what each stage changed on held-out data:
# perplexity on held-out text, and answers to questions about conditions no SFT example mentions.
# Offline, on CPU. Outputs, loss curves and TensorBoard logs go to $OUT.
set -euo pipefail
cd "$(dirname "$0")"

OUT=${OUT:-outputs-demo}
export OMP_NUM_THREADS=${DEMO_THREADS:-2} HF_HUB_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1
RESULTS=$OUT/results.jsonl
HELD_OUT_TEXT=data/pretrain/validation
HELD_OUT_QUESTIONS=data/sft/validation

START=$SECONDS
stage() { printf '\n==> [%4ds] %s\n' $((SECONDS - START)) "$*"; }
rm -rf "$OUT" && mkdir -p "$OUT"

stage "1/5 Build the embedded default model"
python -m medicalgpt.default_model --output_dir "$OUT/base"

stage "2/5 Evaluate the untrained model"
python evaluate.py --name base --model_name_or_path "$OUT/base" \
    --perplexity_files "$HELD_OUT_TEXT" --results_file "$RESULTS"

stage "3/5 Continued pretraining (PT) on data/pretrain"
# A randomly initialised model: full fine-tuning, a high learning rate and many passes over a small corpus.
MODEL=$OUT/base OUTPUT=$OUT/pt USE_PEFT=False LR=2e-3 EPOCHS=12 BLOCK_SIZE=256 bash run_pt.sh
python evaluate.py --name pt --model_name_or_path "$OUT/pt" \
    --perplexity_files "$HELD_OUT_TEXT" --results_file "$RESULTS"

stage "4/5 Supervised fine-tuning (SFT, LoRA) on data/sft"
MODEL=$OUT/pt OUTPUT=$OUT/sft LORA_RANK=16 LR=2e-3 EPOCHS=4 bash run_sft.sh

stage "5/5 Evaluate the fine-tuned model on held-out questions"
python evaluate.py --name sft --model_name_or_path "$OUT/pt" --lora_model "$OUT/sft" \
    --perplexity_files "$HELD_OUT_TEXT" --questions_file "$HELD_OUT_QUESTIONS" --num_questions 6 \
    --results_file "$RESULTS"

stage "Done. Metrics: $RESULTS; loss curves: $OUT/pt/loss.png, $OUT/sft/loss.png; tensorboard --logdir $OUT"

"""Stage 2 — supervised fine-tuning (SFT) on conversations, loss on the assistant's tokens only.

Reads ShareGPT, OpenAI-messages and Alpaca records (auto-detected per file), renders them with the
chat template (--template_name, default: the tokenizer's own) into token ids and a loss mask, and
trains with TRL's SFTTrainer. --packing packs samples into --max_length rows without letting them
attend to each other (position ids restart per sample; works with sdpa on CPU and flash-attn on GPU).

    python supervised_finetuning.py --train_file_dir data/sft/train --validation_file_dir data/sft/validation \
        --output_dir outputs-sft --num_train_epochs 3
"""

from pathlib import Path

import medicalgpt.quiet  # noqa: F401  (before the libraries: it filters what they print on import)

from trl import SFTConfig

from medicalgpt.args import LoraArguments, ModelArguments, SFTDataArguments, parse_args
from medicalgpt.data import build_sft_splits, pack_sft_splits, sorted_by_length, to_conversation
from medicalgpt.data.collators import PackedRowsCollator
from medicalgpt.errors import run_cli
from medicalgpt.modeling import apply_lora, check_model_args, load_model, set_stop_tokens
from medicalgpt.packed_attention import enable_packed_attention
from medicalgpt.trainers import CPUFriendlySFTTrainer
from medicalgpt.training import STAGE_DEFAULTS, check_streaming, load_chat_inputs, prepare_run, train_and_save


def main(argv: list[str] | None = None) -> dict:
    model_args, lora_args, data_args, training_args = parse_args(
        (ModelArguments, LoraArguments, SFTDataArguments, SFTConfig), argv,
        defaults=STAGE_DEFAULTS,
        config=Path(__file__).with_name("configs") / "sft.yaml")
    check_model_args(model_args, lora_args)
    check_streaming(data_args, training_args)
    resume = prepare_run(training_args)

    records, tokenizer, template = load_chat_inputs(model_args, data_args, training_args, to_conversation)
    with training_args.main_process_first(desc="dataset preparation"):
        splits = build_sft_splits(records, tokenizer, template, training_args.max_length, data_args.train_on_inputs,
                                  data_args.preprocessing_num_workers)
        # Flash-attention packs best padding-free inside TRL; other kernels get our per-row packs.
        pack_rows = training_args.packing and model_args.attn_implementation != "flash_attention_2"
        if pack_rows:
            splits = pack_sft_splits(splits, training_args.max_length)
            training_args.packing = False  # already packed: TRL must neither re-pack nor go padding-free
        elif "validation" in splits and not data_args.streaming:
            splits["validation"] = sorted_by_length(splits["validation"])
    model = load_model(model_args)
    if pack_rows:
        enable_packed_attention(model, training_args.max_length)
    model = apply_lora(model, lora_args, training_args)
    set_stop_tokens(model, tokenizer, template.stop_words)

    trainer = CPUFriendlySFTTrainer(model=model, args=training_args, processing_class=tokenizer,
                                    train_dataset=splits["train"], eval_dataset=splits.get("validation"),
                                    data_collator=PackedRowsCollator(tokenizer.pad_token_id) if pack_rows else None)
    return train_and_save(trainer, resume, report_perplexity=True)


if __name__ == "__main__":
    run_cli(main)

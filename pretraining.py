"""Stage 1 — continued pretraining (PT): next-token prediction on domain text.

Documents are tokenised with EOS between them and grouped into --block_size blocks; validation
perplexity is reported. LoRA by default; --use_peft False trains every weight. --load_best_model_at_end True keeps
the checkpoint with the lowest held-out loss, and --early_stopping_patience N stops N evaluations after it.

    python pretraining.py --train_file_dir data/pretrain/train --validation_file_dir data/pretrain/validation \
        --output_dir outputs-pt --num_train_epochs 1
"""

from pathlib import Path

import medicalgpt.quiet  # noqa: F401  (before the libraries: it filters what they print on import)

from transformers import Trainer, TrainingArguments
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from medicalgpt.args import (
    EarlyStoppingArguments,
    LoraArguments,
    ModelArguments,
    PretrainDataArguments,
    parse_args,
)
from medicalgpt.data import build_pretraining_splits, to_text
from medicalgpt.errors import run_cli
from medicalgpt.modeling import apply_lora, check_model_args, load_model, load_tokenizer
from medicalgpt.training import (
    STAGE_DEFAULTS,
    check_streaming,
    early_stopping,
    load_records,
    prepare_run,
    train_and_save,
)


def main(argv: list[str] | None = None) -> dict:
    model_args, lora_args, data_args, training_args, stop_args = parse_args(
        (ModelArguments, LoraArguments, PretrainDataArguments, TrainingArguments, EarlyStoppingArguments), argv,
        defaults=STAGE_DEFAULTS,
        config=Path(__file__).with_name("configs") / "pt.yaml")
    check_model_args(model_args, lora_args)
    check_streaming(data_args, training_args)
    callbacks = early_stopping(stop_args.early_stopping_patience, training_args)
    resume = prepare_run(training_args)

    records = load_records(data_args, to_text, training_args)  # bad data fails before any model loads
    tokenizer = load_tokenizer(model_args)
    with training_args.main_process_first(desc="dataset preparation"):
        splits = build_pretraining_splits(records, tokenizer, data_args.block_size,
                                          data_args.preprocessing_num_workers)
    model = apply_lora(load_model(model_args), lora_args, training_args)

    trainer = Trainer(
        model=model, args=training_args, processing_class=tokenizer,
        train_dataset=splits["train"], eval_dataset=splits.get("validation"),
        data_collator=DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id), callbacks=callbacks,
    )
    return train_and_save(trainer, resume, report_perplexity=True)


if __name__ == "__main__":
    run_cli(main)

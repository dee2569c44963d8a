"""Kahneman-Tversky Optimization (KTO) on answers labelled desirable or undesirable.

Reads unpaired prompt/completion/label records, and preference pairs too (each pair gives its chosen
answer as desirable and its rejected one as undesirable). Reference model as in DPO: the base with the
LoRA adapter disabled, or a frozen copy under full fine-tuning.

    python kto_training.py --model_name_or_path outputs-sft-merged --train_file_dir data/preference/train \
        --validation_file_dir data/preference/validation --output_dir outputs-kto
"""

from pathlib import Path

import medicalgpt.quiet  # noqa: F401  (before the libraries: it filters what they print on import)

from trl import KTOConfig

from medicalgpt.args import LoraArguments, ModelArguments, PreferenceDataArguments, parse_args
from medicalgpt.data import build_unpaired_splits, to_unpaired
from medicalgpt.errors import run_cli
from medicalgpt.modeling import check_model_args
from medicalgpt.trainers import TokenizedKTOTrainer
from medicalgpt.training import STAGE_DEFAULTS, load_preference_inputs, prepare_run, train_and_save


def main(argv: list[str] | None = None) -> dict:
    model_args, lora_args, data_args, training_args = parse_args(
        (ModelArguments, LoraArguments, PreferenceDataArguments, KTOConfig), argv,
        defaults=STAGE_DEFAULTS,
        config=Path(__file__).with_name("configs") / "kto.yaml")
    check_model_args(model_args, lora_args)
    resume = prepare_run(training_args)

    model, tokenizer, splits = load_preference_inputs(model_args, lora_args, data_args, training_args,
                                                      convert=to_unpaired, build=build_unpaired_splits)
    trainer = TokenizedKTOTrainer(model=model, args=training_args, processing_class=tokenizer,
                                  train_dataset=splits["train"], eval_dataset=splits.get("validation"))
    return train_and_save(trainer, resume)


if __name__ == "__main__":
    run_cli(main)

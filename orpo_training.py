"""Odds Ratio Preference Optimization (ORPO): SFT and preference alignment in one loss, no reference model.

loss = NLL(chosen) - λ · log σ(log odds(chosen) - log odds(rejected)), with odds(y) = p(y) / (1 - p(y))
from the length-normalised answer probability; λ is --beta. TRL's ORPOTrainer (trl.experimental).

    python orpo_training.py --model_name_or_path outputs-sft-merged --train_file_dir data/preference/train \
        --validation_file_dir data/preference/validation --output_dir outputs-orpo --beta 0.1
"""

from pathlib import Path

import medicalgpt.quiet  # noqa: F401  (before the libraries: it filters what they print on import)

from trl.experimental.orpo import ORPOConfig

from medicalgpt.args import LoraArguments, ModelArguments, PreferenceDataArguments, parse_args
from medicalgpt.errors import run_cli
from medicalgpt.modeling import check_model_args
from medicalgpt.trainers import TokenizedORPOTrainer
from medicalgpt.training import STAGE_DEFAULTS, load_preference_inputs, prepare_run, train_and_save


def main(argv: list[str] | None = None) -> dict:
    model_args, lora_args, data_args, training_args = parse_args(
        (ModelArguments, LoraArguments, PreferenceDataArguments, ORPOConfig), argv,
        defaults=STAGE_DEFAULTS,
        config=Path(__file__).with_name("configs") / "orpo.yaml")
    check_model_args(model_args, lora_args)
    resume = prepare_run(training_args)

    model, tokenizer, splits = load_preference_inputs(model_args, lora_args, data_args, training_args)
    trainer = TokenizedORPOTrainer(model=model, args=training_args, processing_class=tokenizer,
                                   train_dataset=splits["train"], eval_dataset=splits.get("validation"))
    return train_and_save(trainer, resume)


if __name__ == "__main__":
    run_cli(main)

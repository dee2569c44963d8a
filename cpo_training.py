"""Contrastive Preference Optimization (CPO) and SimPO, reference-free preference training.

--loss_type simpo trains SimPO (length-normalised reward margin with target --simpo_gamma, no NLL term
unless --cpo_alpha > 0); the default sigmoid loss with --cpo_alpha 1 is CPO. TRL's CPOTrainer
(trl.experimental).

    python cpo_training.py --model_name_or_path outputs-sft-merged --train_file_dir data/preference/train \
        --output_dir outputs-simpo --loss_type simpo --cpo_alpha 0 --beta 2.0 --simpo_gamma 0.5
"""

from pathlib import Path

import medicalgpt.quiet  # noqa: F401  (before the libraries: it filters what they print on import)

from trl.experimental.cpo import CPOConfig

from medicalgpt.args import LoraArguments, ModelArguments, PreferenceDataArguments, parse_args
from medicalgpt.errors import run_cli
from medicalgpt.modeling import check_model_args
from medicalgpt.trainers import TokenizedCPOTrainer
from medicalgpt.training import STAGE_DEFAULTS, load_preference_inputs, prepare_run, train_and_save


def main(argv: list[str] | None = None) -> dict:
    model_args, lora_args, data_args, training_args = parse_args(
        (ModelArguments, LoraArguments, PreferenceDataArguments, CPOConfig), argv,
        defaults=STAGE_DEFAULTS,
        config=Path(__file__).with_name("configs") / "cpo.yaml")
    check_model_args(model_args, lora_args)
    resume = prepare_run(training_args)

    model, tokenizer, splits = load_preference_inputs(model_args, lora_args, data_args, training_args)
    trainer = TokenizedCPOTrainer(model=model, args=training_args, processing_class=tokenizer,
                                  train_dataset=splits["train"], eval_dataset=splits.get("validation"))
    return train_and_save(trainer, resume)


if __name__ == "__main__":
    run_cli(main)

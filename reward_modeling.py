"""Reward modeling (RM): a sequence-classification model scoring answers, trained on preference pairs.

One scalar output; pairwise loss -log σ(r_chosen - r_rejected); validation reports pairwise accuracy
(eval_accuracy) and mean margin (eval_margin). With LoRA the score head is trained in full and saved
with the adapter; merge it with merge_peft_adapter.py for PPO/GRPO.

    python reward_modeling.py --model_name_or_path outputs-sft-merged --train_file_dir data/preference/train \
        --validation_file_dir data/preference/validation --output_dir outputs-rm
"""

from pathlib import Path

import medicalgpt.quiet  # noqa: F401  (before the libraries: it filters what they print on import)

from transformers import AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer

from medicalgpt.args import LoraArguments, ModelArguments, PreferenceDataArguments, parse_args
from medicalgpt.errors import run_cli
from medicalgpt.modeling import check_model_args, check_model_class
from medicalgpt.training import STAGE_DEFAULTS, load_preference_inputs, prepare_run, train_and_save


def full_sequences(example: dict) -> dict:
    """The reward model scores whole conversations: prompt + answer."""
    return {"chosen_ids": example["prompt_ids"] + example["chosen_ids"],
            "rejected_ids": example["prompt_ids"] + example["rejected_ids"]}


def main(argv: list[str] | None = None) -> dict:
    model_args, lora_args, data_args, training_args = parse_args(
        (ModelArguments, LoraArguments, PreferenceDataArguments, RewardConfig), argv,
        defaults=STAGE_DEFAULTS,
        config=Path(__file__).with_name("configs") / "rm.yaml")
    check_model_args(model_args, lora_args)
    check_model_class(model_args, AutoModelForSequenceClassification)
    resume = prepare_run(training_args)

    model, tokenizer, splits = load_preference_inputs(
        model_args, lora_args, data_args, training_args, model_class=AutoModelForSequenceClassification,
        task_type="SEQ_CLS")
    model.config.pad_token_id = tokenizer.pad_token_id  # batches > 1: the score is read at the last non-pad token
    splits = splits.map(full_sequences, remove_columns=["prompt_ids"], desc="Joining prompts and answers")

    trainer = RewardTrainer(model=model, args=training_args, processing_class=tokenizer,
                            train_dataset=splits["train"], eval_dataset=splits.get("validation"))
    return train_and_save(trainer, resume, plotted=("loss", "accuracy"))


if __name__ == "__main__":
    run_cli(main)

"""Direct Preference Optimization (DPO) on chosen/rejected answer pairs.

With LoRA the reference model is the base with the adapter disabled (no second copy in memory); with
full fine-tuning it is --ref_model or a frozen copy of the starting model. --loss_type picks any loss
the installed TRL supports (sigmoid, ipo, hinge, robust, ...); --precompute_ref_log_probs scores the
reference once before training.

    python dpo_training.py --model_name_or_path outputs-sft-merged --train_file_dir data/preference/train \
        --validation_file_dir data/preference/validation --output_dir outputs-dpo --beta 0.1
"""

from dataclasses import dataclass, field, replace
from pathlib import Path

import medicalgpt.quiet  # noqa: F401  (before the libraries: it filters what they print on import)

from trl import DPOConfig

from medicalgpt.args import LoraArguments, ModelArguments, PreferenceDataArguments, parse_args
from medicalgpt.errors import run_cli
from medicalgpt.modeling import check_model_args, load_model
from medicalgpt.trainers import TokenizedDPOTrainer
from medicalgpt.training import STAGE_DEFAULTS, load_preference_inputs, prepare_run, train_and_save


@dataclass
class DPOArguments:
    ref_model: str | None = field(default=None, metadata={
        "help": "Reference model path. Default: the base with the LoRA adapter disabled, or a frozen copy of the "
                "starting model under full fine-tuning."})
    half_batches: bool = field(default=False, metadata={
        "help": "Run the policy's training forward as two half batches (chosen, then rejected): the activations of "
                "an SFT step of the same batch size instead of twice that, for one more half-batch forward "
                "(benchmarks/README.md has the time and memory figures). Off under --activation_checkpointing."})


def main(argv: list[str] | None = None) -> dict:
    model_args, lora_args, data_args, dpo_args, training_args = parse_args(
        (ModelArguments, LoraArguments, PreferenceDataArguments, DPOArguments, DPOConfig), argv,
        defaults=STAGE_DEFAULTS,
        config=Path(__file__).with_name("configs") / "dpo.yaml")
    check_model_args(model_args, lora_args)
    resume = prepare_run(training_args)

    model, tokenizer, splits = load_preference_inputs(model_args, lora_args, data_args, training_args)
    ref_model = None
    if dpo_args.ref_model:
        ref_model = load_model(replace(model_args, model_name_or_path=dpo_args.ref_model))

    trainer = TokenizedDPOTrainer(model=model, ref_model=ref_model, args=training_args, processing_class=tokenizer,
                                  train_dataset=splits["train"], eval_dataset=splits.get("validation"),
                                  half_batches=dpo_args.half_batches)
    return train_and_save(trainer, resume, plotted=("loss", "rewards/margins"))


if __name__ == "__main__":
    run_cli(main)

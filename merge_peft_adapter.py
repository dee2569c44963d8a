"""Merge a LoRA adapter into its base model and save a standalone model that loads without peft.

The output directory holds the merged weights, the tokenizer with its chat template (the adapter's, when it
was saved with one) and the generation config, so inference.py, the API server or vLLM use it as --base_model.
Reward models (sequence classification, one score) merge too: their trained `score` head comes from the
adapter's modules_to_save.

    python merge_peft_adapter.py --base_model outputs-pt --lora_model outputs-sft --output_dir outputs-merged
    python merge_peft_adapter.py --lora_model outputs-rm --output_dir outputs-rm-merged   # detected: seq_cls
"""

from dataclasses import dataclass, field

from transformers import AutoModelForSequenceClassification, PreTrainedModel

from medicalgpt.args import parse_args
from medicalgpt.errors import UsageError, run_cli
from medicalgpt.modeling import apply_adapter, load_model, load_tokenizer, with_adapter_base
from medicalgpt.serving import BaseModelArguments

TASK_TYPES = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "seq_cls"}


@dataclass
class MergeArguments:
    lora_model: str = field(metadata={"help": "The LoRA adapter directory to merge."})
    output_dir: str = field(metadata={"help": "Where the merged model, tokenizer and generation config go."})
    model_type: str = field(default="auto", metadata={
        "help": "causal_lm (chat models) or seq_cls (reward models); auto = the adapter's task_type.",
        "choices": ["auto", "causal_lm", "seq_cls"]})


def adapter_model_type(lora_model: str) -> str:
    """causal_lm or seq_cls, from the adapter's task_type (an adapter without one is a causal LM's)."""
    from peft import PeftConfig

    task_type = PeftConfig.from_pretrained(lora_model).task_type or "CAUSAL_LM"
    if task_type not in TASK_TYPES:
        raise UsageError(f"--lora_model {lora_model}: task_type {task_type} cannot be merged here; "
                         f"supported: {', '.join(TASK_TYPES)}")
    return TASK_TYPES[task_type]


def load_base(model_args: BaseModelArguments, model_type: str, pad_token_id: int) -> PreTrainedModel:
    if model_type == "seq_cls":
        # The reward head scores each sequence's last non-pad token, so the config must know the pad id; the
        # adapter brings the head (modules_to_save), so the base lacking it is expected.
        return load_model(model_args, AutoModelForSequenceClassification, new_head=True, num_labels=1,
                          pad_token_id=pad_token_id)
    return load_model(model_args)


def check_args(model_args: BaseModelArguments, args: MergeArguments) -> None:
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise UsageError("merge into a full-precision base: drop --load_in_4bit/--load_in_8bit (a QLoRA adapter "
                         "merges into the unquantized base)")


def main(argv: list[str] | None = None) -> str:
    model_args, args = parse_args((BaseModelArguments, MergeArguments), argv)
    check_args(model_args, args)
    model_args = with_adapter_base(model_args, args.lora_model)  # the adapter's recorded base unless given
    model_type = adapter_model_type(args.lora_model) if args.model_type == "auto" else args.model_type
    tokenizer = load_tokenizer(model_args, args.lora_model)
    base = load_base(model_args, model_type, tokenizer.pad_token_id)
    merged = apply_adapter(base, args.lora_model).merge_and_unload()
    merged.save_pretrained(args.output_dir)  # config, weights and (for a causal LM) generation_config.json
    tokenizer.save_pretrained(args.output_dir)
    print(f"Merged {args.lora_model} into {model_args.model_name_or_path} ({model_type}); "
          f"saved to {args.output_dir}")
    return args.output_dir


if __name__ == "__main__":
    run_cli(main)

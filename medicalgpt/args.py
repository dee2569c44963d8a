"""Arguments shared by the stages, and one parser for CLI flags, JSON and YAML config files.

A stage combines these dataclasses with its trainer's config (TrainingArguments, SFTConfig, ...):

    model_args, lora_args, data_args, training_args = parse_args(
        (ModelArguments, LoraArguments, SFTDataArguments, SFTConfig), defaults={"output_dir": "outputs-sft"})

Unknown or abbreviated flags are errors, and so are unknown keys in a config file; a config's own checks
(TrainingArguments.__post_init__) become one-line usage errors. MedicalGPT's flag spellings are translated first
(medicalgpt/aliases.py).
"""

import difflib
import json
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from medicalgpt.aliases import translate_aliases
from medicalgpt.distributed import check_deepspeed
from medicalgpt.errors import UsageError


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Hub name or local path. Default: the embedded default model (built on demand)."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Default: the model's tokenizer."})
    dtype: str = field(default="auto", metadata={
        "help": "Weights dtype. auto = bfloat16 on a GPU that supports it, float16 on other GPUs, float32 on CPU.",
        "choices": ["auto", "float32", "bfloat16", "float16"]})
    attn_implementation: str = field(default="sdpa", metadata={
        "help": "Attention kernel; flash_attention_2 needs the flash-attn package and a CUDA GPU.",
        "choices": ["sdpa", "eager", "flash_attention_2"]})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code shipped with the checkpoint."})
    rope_scaling: str | None = field(default=None, metadata={
        "help": "Extend the context: TYPE:FACTOR, e.g. linear:2.0, dynamic:2.0 or yarn:4.0."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: load the base in 4-bit (bitsandbytes)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base in 8-bit (bitsandbytes)."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit data type.", "choices": ["nf4", "fp4"]})
    bnb_4bit_use_double_quant: bool = field(default=True, metadata={"help": "Quantize the 4-bit scales too."})
    resize_embeddings: bool = field(default=False, metadata={
        "help": "Add embedding rows for the tokens --tokenizer_name_or_path adds to the model's own tokenizer "
                "(extend_tokenizer.py), each the mean of the subword rows it replaces."})


@dataclass
class LoraArguments:
    use_peft: bool = field(default=True, metadata={
        "help": "Train a LoRA adapter; --use_peft False = full fine-tuning."})
    lora_rank: int = field(default=8, metadata={"help": "Rank r of the LoRA update matrices."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={
        "help": "Dropout on the LoRA input. 0 skips the dropout layer (faster LoRA steps: benchmarks/README.md); "
                "0.05-0.1 can regularise a small dataset."})
    target_modules: str = field(default="all", metadata={
        "help": "Comma-separated module names, or 'all' = every linear layer except the output head and MoE routers."})
    modules_to_save: str | None = field(default=None, metadata={
        "help": "Comma-separated modules trained in full and saved with the adapter, e.g. embed_tokens,lm_head."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA scaling (alpha / sqrt(rank))."})
    peft_path: str | None = field(default=None, metadata={"help": "Continue training this LoRA adapter."})


@dataclass
class DataArguments:
    train_file_dir: str | None = field(default=None, metadata={
        "help": "Directory (searched recursively) or file(s) of .txt/.json/.jsonl/.parquet; comma-separated."})
    validation_file_dir: str | None = field(default=None, metadata={"help": "Like --train_file_dir, for validation."})
    dataset_name: str | None = field(default=None, metadata={"help": "A hub dataset (needs network access)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The hub dataset's configuration."})
    validation_split_percentage: float = field(default=1.0, metadata={
        "help": "Percent of the training records held out for validation when no validation files are given."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation set."})
    skip_bad_records: bool = field(default=False, metadata={
        "help": "Skip malformed records (counted and reported) instead of stopping at the first one."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    deidentify: bool = field(default=False, metadata={
        "help": "Replace names, ID numbers, phones, emails, dates, addresses and record numbers in every text field "
                "with [TYPE] placeholders as records load (the code of deidentify_data.py); medical terms stay."})


@dataclass
class StreamingArguments:
    streaming: bool = field(default=False, metadata={
        "help": "PT and SFT: read the data as training consumes it, for data larger than memory or disk cache: needs "
                "--max_steps; records are shuffled within a 10,000-record buffer, no validation split is held out "
                "(give --validation_file_dir), and a bad record stops training when it is reached."})


@dataclass
class PretrainDataArguments(StreamingArguments, DataArguments):
    block_size: int = field(default=512, metadata={"help": "Tokens per training block (documents are concatenated)."})


@dataclass
class ChatDataArguments(DataArguments):
    template_name: str | None = field(default=None, metadata={
        "help": "Built-in chat template (chatml, qwen, llama3, ...). Default: the tokenizer's own template."})
    tool_format: str | None = field(default=None, metadata={
        "help": "How tool calls and results are written: qwen (<tool_call> JSON), llama3 (JSON, ipython turns), "
                "mistral ([TOOL_CALLS] list, [TOOL_RESULTS]), glm4 (name line and JSON, observation turns) or json. "
                "Default: the chat template's own (qwen for chatml/qwen/qwen3, llama3 for llama3, mistral for "
                "mistral_v3, glm4 for glm4), else json.",
        "choices": ["qwen", "llama3", "mistral", "glm4", "json"]})
    allow_special_tokens_in_content: bool = field(default=False, metadata={
        "help": "Tokenise special-token strings inside message content (e.g. a typed end-of-turn token) as control "
                "tokens. "
                "Default: as plain text, so that no message can forge a turn."})


@dataclass
class SFTDataArguments(StreamingArguments, ChatDataArguments):
    train_on_inputs: bool = field(default=False, metadata={
        "help": "Also train on system/user tokens (default: loss on assistant tokens only)."})


@dataclass
class PreferenceDataArguments(ChatDataArguments):
    long_pairs: str = field(default="truncate", metadata={
        "help": "A pair (KTO: a row) whose prompt + longest answer exceeds --max_length: truncate = cut the prompt "
                "first (its oldest turns, then the start of its last user turn, down to half of --max_length), then "
                "the answers at their end; drop = drop it.",
        "choices": ["truncate", "drop"]})
    max_source_length: int | None = field(default=None, metadata={
        "help": "Also cap the prompt (with history and system prompt) at this many tokens, as --long_pairs says."})
    max_target_length: int | None = field(default=None, metadata={
        "help": "Also cap each answer (chosen, rejected or completion) at this many tokens, as --long_pairs says."})


@dataclass
class EarlyStoppingArguments:
    early_stopping_patience: int | None = field(default=None, metadata={
        "help": "Stop when this many evaluations in a row bring no better --metric_for_best_model (eval loss unless "
                "set); needs --load_best_model_at_end True (with --save_strategy equal to --eval_strategy), which "
                "saves the best checkpoint's weights, not the last."})


@dataclass
class RunArguments:
    """Flags of every training stage: parse_args accepts them wherever a group has resume_from_checkpoint (the
    trainer's config, PPO's arguments) and sets them on that group. transformers 5 dropped
    TrainingArguments.overwrite_output_dir."""
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Delete the checkpoint-* directories an earlier run left in --output_dir; without it (or "
                "--resume_from_checkpoint) a stage refuses to start there."})


def trainer_field(name: str) -> Any:
    """TrainingArguments' field `name` (its default and help), for a stage with its own loop (PPO): a setting it
    shares with the trainer stages is declared once."""
    declared = next(f for f in fields(TrainingArguments) if f.name == name)
    return field(default=declared.default, metadata=declared.metadata)


def _config_file_defaults(path: str | Path, parser: HfArgumentParser) -> dict[str, Any]:
    """Values from a JSON/YAML config file; an unknown key is an error that names the file and the closest key."""
    text = Path(path).read_text(encoding="utf-8")
    values = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if values is None:  # an empty YAML file, or one of comments only
        return {}
    if not isinstance(values, dict):
        parser.error(f"{path}: expected a mapping of argument names to values")
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        hints = [f"{key} (did you mean {match[0]}?)" if (match := difflib.get_close_matches(key, known, n=1))
                 else key for key in unknown]
        parser.error(f"{path}: unknown arguments: {', '.join(hints)}")
    return values


def parser_flags(parser: HfArgumentParser) -> list[str]:
    """Every option string the parser accepts (argparse lists them only on its actions)."""
    return [option for action in parser._actions for option in action.option_strings]


def closest_flags(unknown: list[str], known_flags: list[str]) -> str:
    """" (did you mean --x?)" for the unknown flags that are near a known one, else ""."""
    known = [flag for flag in known_flags if flag.startswith("--")]
    hints = [f"{flag} -> {match[0]}" for flag in (arg.split("=")[0] for arg in unknown if arg.startswith("--"))
             if (match := difflib.get_close_matches(flag, known, n=1, cutoff=0.75))]
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


def parse_args(dataclass_types: tuple[type, ...], args: list[str] | None = None,
               defaults: dict[str, Any] | None = None, config: str | Path | None = None,
               positional: str | None = None) -> tuple:
    """Parse CLI flags (optionally after a leading config.json/.yaml) into the given dataclasses; with
    `positional` (a name), one or more positional arguments too, returned as a list after the groups.

    Precedence: command-line flags > the leading config file > the stage's own config (`config`, its
    configs/<stage>.yaml) > `defaults` (values that depend on the machine) > the dataclass defaults.
    """
    # conflict_handler: a field defined twice (trust_remote_code in ours and in TRL's configs) becomes one flag
    # whose value fills both dataclasses.
    training = [t for t in dataclass_types if "resume_from_checkpoint" in {f.name for f in fields(t)}]
    parsed_types = (*dataclass_types, RunArguments) if training else dataclass_types
    parser = HfArgumentParser(parsed_types, allow_abbrev=False, conflict_handler="resolve")
    known = {f.name for dataclass_type in parsed_types for f in fields(dataclass_type)}
    parser.set_defaults(**{k: v for k, v in (defaults or {}).items() if k in known})
    if positional:
        parser.add_argument(positional, nargs="+", metavar=positional.upper())
    if config is not None:
        parser.set_defaults(**_config_file_defaults(config, parser))
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0].endswith((".json", ".yaml", ".yml")):
        parser.set_defaults(**_config_file_defaults(argv.pop(0), parser))
    known_flags = parser_flags(parser)
    namespace, remaining = parser.parse_known_args(translate_aliases(argv, set(known_flags)))
    if remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)}{closest_flags(remaining, known_flags)}")
    values = vars(namespace)
    check_deepspeed(values.get("deepspeed"))
    try:
        groups = tuple(dataclass_type(**{f.name: values[f.name] for f in fields(dataclass_type) if f.init})
                       for dataclass_type in dataclass_types)
    except ValueError as error:
        raise UsageError(str(error)) from None
    for group in groups:
        if type(group) in training:
            for f in fields(RunArguments):
                setattr(group, f.name, values[f.name])
    return (*groups, values[positional]) if positional else groups


def flag_reference(dataclass_type: type) -> str:
    """A Markdown table of the flags a dataclass adds to its bases (docs/flags.md)."""
    inherited = {f.name for base in dataclass_type.__bases__ if is_dataclass(base) for f in fields(base)}
    rows = ["| flag | default | what it does |", "|---|---|---|"]
    for f in (f for f in fields(dataclass_type) if f.name not in inherited):
        choices = f.metadata.get("choices")
        text = f.metadata.get("help", "") + (f" One of: {', '.join(choices)}." if choices else "")
        rows.append(f"| `--{f.name}` | `{f.default}` | {text.strip()} |")
    return "\n".join(rows)


def flag_reference_markdown() -> str:
    """The flag reference of every shared argument group, as docs/flags.md shows it."""
    groups = (ModelArguments, LoraArguments, DataArguments, StreamingArguments, PretrainDataArguments,
              ChatDataArguments, SFTDataArguments, PreferenceDataArguments, EarlyStoppingArguments, RunArguments)
    return "\n\n".join(f"#### {group.__name__}\n\n{flag_reference(group)}" for group in groups)


if __name__ == "__main__":
    print(flag_reference_markdown())

"""MedicalGPT's flag spellings, so that a user's run_*.sh and published commands run unchanged.

parse_args rewrites a flag only when the script does not know it: `--max_completion_length` stays GRPO's own flag
but becomes `--max_new_tokens` in ppo_training.py. An alias lists our flags in order of preference; the first one
the script has takes the (converted) value. A flag whose meaning has no equivalent is either dropped with a warning
(it changes nothing here, e.g. --model_type) or refused with the flag to use instead. docs/migration.md is
generated from these tables (python -m medicalgpt.aliases).
"""

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

from medicalgpt.errors import UsageError

logger = logging.getLogger("medicalgpt")

Converter = Callable[[list[str]], list[str] | None]  # the values after the flag -> ours (None: drop the flag)


def _truthy(values: list[str]) -> bool:
    """A bool flag's value as HfArgumentParser reads it (a bare flag is True)."""
    return not values or values[0].lower() in ("true", "1", "yes", "y")


def _same(values: list[str]) -> list[str]:
    return values


def _comma_list(values: list[str]) -> list[str]:
    """TRL's space-separated module list -> our comma-separated one ("all-linear" is our "all")."""
    joined = ",".join(value.strip(",") for value in values)
    return ["all" if joined == "all-linear" else joined]


def _true_or_drop(values: list[str]) -> list[str] | None:
    return ["True"] if _truthy(values) else None


def _flash_attention(values: list[str]) -> list[str] | None:
    return ["flash_attention_2"] if _truthy(values) else None


def _positive_or_drop(values: list[str]) -> list[str] | None:
    """-1 / 0 mean "all samples" or "off" there; ours is the flag's absence."""
    return values if values and float(values[0]) > 0 else None


@dataclass(frozen=True)
class Alias:
    flag: str  # MedicalGPT's spelling, with the dashes
    targets: tuple[str, ...] = ()  # ours, in order of preference: the first the script knows is used
    convert: Converter = _same
    ignored: str = ""  # no target the script knows: drop the flag with this warning
    refused: str = ""  # no target the script knows: stop with this one-line error
    note: str = ""  # how the value converts, for the migration table


ALIASES: dict[str, Alias] = {a.flag: a for a in [
    Alias("--torch_dtype", ("--dtype",)),
    Alias("--model_max_length", ("--max_length", "--block_size")),
    Alias("--flash_attn", ("--attn_implementation",), _flash_attention,
          note="True -> `flash_attention_2`; False: dropped"),
    Alias("--qlora", ("--load_in_4bit",), _true_or_drop, note="True -> `--load_in_4bit True`; False: dropped"),
    Alias("--lora_r", ("--lora_rank",)),
    Alias("--lora_target_modules", ("--target_modules",), _comma_list,
          note="space-separated -> comma-separated; `all-linear` -> `all`"),
    Alias("--lora_modules_to_save", ("--modules_to_save",), _comma_list, note="space- -> comma-separated"),
    Alias("--use_bnb_nested_quant", ("--bnb_4bit_use_double_quant",)),
    Alias("--neft_alpha", ("--neftune_noise_alpha",), _positive_or_drop, note="0: dropped"),
    Alias("--orpo_beta", ("--beta",)),
    Alias("--reward_model_path", ("--reward_model",)),
    Alias("--sft_model_path", ("--model_name_or_path",)),
    Alias("--train_samples", ("--max_train_samples",), _positive_or_drop, note="-1 (all): dropped"),
    Alias("--train_file", ("--train_file_dir",), note="a file is accepted there"),
    Alias("--validation_file", ("--validation_file_dir",), note="a file is accepted there"),
    Alias("--evaluation_strategy", ("--eval_strategy",)),
    Alias("--warmup_ratio", ("--warmup_steps",), note="a value below 1 is a ratio of the total steps"),
    Alias("--max_completion_length", ("--max_new_tokens",)),
    Alias("--max_source_length", ("--max_prompt_length",),
          refused="supervised_finetuning.py caps the whole conversation: use --max_length (over-long samples are "
                  "reported, never cut)"),
    Alias("--max_target_length", (),
          refused="supervised_finetuning.py caps the whole conversation: use --max_length (over-long samples are "
                  "reported, never cut)"),
    Alias("--per_device_train_batch_size", ("--mini_batch_size",), note="ppo_training.py: rollouts per update"),
    Alias("--gradient_checkpointing", ("--activation_checkpointing",)),
    # demo/inference.py
    Alias("--tokenizer_path", ("--tokenizer_name_or_path",)),
    Alias("--eval_batch_size", ("--batch_size",)),
    Alias("--resize_emb", ("--resize_embeddings",), note="new rows start as the mean of the subwords they replace"),
    Alias("--stop_str", ignored="generation stops at EOS and the chat template's end-of-turn tokens"),
    Alias("--single_tune", refused="--data_file answers each record alone; in --interactive, type `clear` to start "
                                   "over"),
    Alias("--model_type", ignored="the architecture is read from the model's config.json"),
    Alias("--device_map", ignored="placement is automatic (one device per process; torchrun/accelerate for more)"),
    Alias("--cache_dir", ignored="downloads go to the Hugging Face cache: set HF_HUB_CACHE to move it"),
    Alias("--use_fast_tokenizer", ignored="the fast tokenizer is always used"),
    Alias("--overwrite_cache", ignored="tokenised data is not cached between runs"),
    Alias("--ignore_pad_token_for_loss", ignored="padding never carries loss"),
    Alias("--packing", ignored="pretraining.py always concatenates documents into --block_size blocks"),
    # Trainer flags ppo_training.py has no use for: its loop runs --max_steps rollout batches and does not evaluate.
    *(Alias(flag, ignored="ppo_training.py runs --max_steps rollout steps and does not evaluate while training")
      for flag in ("--do_train", "--do_eval", "--eval_strategy", "--eval_steps", "--num_train_epochs",
                   "--per_device_eval_batch_size")),
    Alias("--hf_hub_token", refused="set the HF_TOKEN environment variable instead (tokens stay off command lines)"),
    Alias("--model_revision", refused="download that revision and pass its local path as --model_name_or_path"),
    Alias("--shift_attn", refused="shifted sparse attention (S^2-Attn) is not supported: extend the context with "
                                  "--rope_scaling TYPE:FACTOR"),
    Alias("--min_target_length", refused="no minimum answer length: filter the data with validate_data.py"),
]}

# MedicalGPT's scripts under other names here (its published commands).
RENAMED_SCRIPTS = {
    "inference_multigpu_demo.py": "inference_multigpu.py",
    "fastapi_server_demo.py": "openai_api.py",
    "demo/gradio_demo.py": "gradio_demo.py",
    "training/<stage>.py": "<stage>.py (at the top level)",
}

# The flags of MedicalGPT's current scripts/run_*.sh (their values as there), per script of ours that takes them:
# the migration table lists each one, and tests/test_migration.py runs each script with its set.
MEDICALGPT_COMMANDS = {
    "pretraining.py": (
        "--model_name_or_path Qwen/Qwen3.5-2B --train_file_dir ./data/pretrain --validation_file_dir ./data/pretrain "
        "--per_device_train_batch_size 4 --per_device_eval_batch_size 4 --do_train --do_eval --use_peft True "
        "--seed 42 --max_train_samples 10000 --max_eval_samples 10 --num_train_epochs 0.5 --learning_rate 2e-4 "
        "--warmup_steps 5 --weight_decay 0.01 --logging_strategy steps --logging_steps 10 --eval_steps 50 "
        "--eval_strategy steps --save_steps 500 --save_strategy steps --save_total_limit 13 "
        "--gradient_accumulation_steps 8 --preprocessing_num_workers 10 --block_size 512 --packing True "
        "--output_dir outputs-pt-qwen-v1 --ddp_timeout 30000 --logging_first_step True --target_modules all "
        "--lora_rank 8 --lora_alpha 16 --lora_dropout 0.05 --torch_dtype bfloat16 --bf16 --report_to tensorboard "
        "--ddp_find_unused_parameters False --gradient_checkpointing True --cache_dir ./cache"),
    "supervised_finetuning.py": (
        "--model_name_or_path Qwen/Qwen3.5-2B --train_file_dir ./data/finetune --validation_file_dir ./data/finetune "
        "--per_device_train_batch_size 4 --per_device_eval_batch_size 4 --do_train --do_eval --template_name qwen3_5 "
        "--use_peft True --max_train_samples 1000 --max_eval_samples 10 --model_max_length 4096 "
        "--num_train_epochs 1 --learning_rate 2e-5 --warmup_steps 5 --weight_decay 0.05 --logging_strategy steps "
        "--logging_steps 10 --eval_steps 50 --eval_strategy steps --save_steps 500 --save_strategy steps "
        "--save_total_limit 13 --gradient_accumulation_steps 8 --preprocessing_num_workers 4 "
        "--output_dir outputs-sft-qwen-v1 --ddp_timeout 30000 --logging_first_step True --target_modules all "
        "--lora_rank 8 --lora_alpha 16 --lora_dropout 0.05 --torch_dtype bfloat16 --bf16 --report_to tensorboard "
        "--ddp_find_unused_parameters False --gradient_checkpointing True --cache_dir ./cache --flash_attn True"),
    "reward_modeling.py": (
        "--model_name_or_path Qwen/Qwen3.5-2B --train_file_dir ./data/reward --validation_file_dir ./data/reward "
        "--per_device_train_batch_size 4 --gradient_accumulation_steps 8 --per_device_eval_batch_size 4 --do_train "
        "--use_peft True --seed 42 --max_train_samples 1000 --max_eval_samples 10 --num_train_epochs 1 "
        "--learning_rate 2e-5 --warmup_steps 5 --weight_decay 0.001 --logging_strategy steps --logging_steps 10 "
        "--eval_steps 50 --eval_strategy steps --save_steps 500 --save_strategy steps --save_total_limit 3 "
        "--max_source_length 1024 --max_target_length 256 --output_dir outputs-rm-qwen-v1 --overwrite_output_dir "
        "--ddp_timeout 30000 --logging_first_step True --target_modules all --lora_rank 8 --lora_alpha 16 "
        "--lora_dropout 0.05 --bf16 --torch_dtype bfloat16 --report_to tensorboard --ddp_find_unused_parameters False "
        "--remove_unused_columns False --gradient_checkpointing True"),
    "dpo_training.py": (
        "--model_name_or_path Qwen/Qwen3.5-2B --template_name qwen3_5 --train_file_dir ./data/reward "
        "--validation_file_dir ./data/reward --per_device_train_batch_size 4 --gradient_accumulation_steps 8 "
        "--per_device_eval_batch_size 1 --do_train --do_eval --use_peft True --max_train_samples 1000 "
        "--max_eval_samples 10 --max_steps 100 --eval_steps 20 --save_steps 50 --max_source_length 1024 "
        "--max_target_length 512 --output_dir outputs-dpo-qwen-v1 --target_modules all --lora_rank 8 "
        "--lora_alpha 16 --lora_dropout 0.05 --torch_dtype bfloat16 --bf16 True --fp16 False --report_to tensorboard "
        "--remove_unused_columns False --gradient_checkpointing True --cache_dir ./cache"),
    "orpo_training.py": (
        "--model_name_or_path Qwen/Qwen3.5-2B --template_name qwen3_5 --train_file_dir ./data/reward "
        "--per_device_train_batch_size 2 --per_device_eval_batch_size 2 --gradient_accumulation_steps 8 --do_train "
        "--do_eval --use_peft True --max_train_samples 1000 --max_eval_samples 50 --max_steps 100 --eval_steps 20 "
        "--save_steps 50 --max_source_length 1024 --max_target_length 512 --output_dir outputs-orpo-qwen-v1 "
        "--target_modules all --lora_rank 8 --lora_alpha 16 --lora_dropout 0.05 --torch_dtype bfloat16 --bf16 True "
        "--report_to tensorboard --remove_unused_columns False --gradient_checkpointing True --orpo_beta 0.1 "
        "--cache_dir ./cache"),
    "grpo_training.py": (
        "--model_name_or_path Qwen/Qwen3.5-2B --train_file_dir data/grpo --train_samples -1 --max_steps -1 "
        "--num_train_epochs 1 --save_steps 50 --save_strategy steps --save_total_limit 13 "
        "--output_dir outputs-grpo-qwen-v1 --dtype bfloat16 --bf16 True --report_to tensorboard "
        "--remove_unused_columns False --gradient_checkpointing False --beta 0.001 --learning_rate 5.0e-7 "
        "--lr_scheduler_type cosine --warmup_ratio 0.03 --use_vllm False --logging_steps 10 --use_peft True "
        "--qlora False --load_in_4bit False --lora_target_modules q_proj k_proj v_proj o_proj gate_proj up_proj "
        "down_proj --lora_r 16 --lora_alpha 32 --lora_dropout 0.1 --per_device_train_batch_size 4 "
        "--per_device_eval_batch_size 1 --num_generations 4 --gradient_accumulation_steps 1 "
        "--max_completion_length 512"),
    "ppo_training.py": (
        "--sft_model_path Qwen/Qwen3.5-2B --reward_model_path Qwen/Qwen3.5-2B --model_name_or_path Qwen/Qwen3.5-2B "
        "--template_name qwen3_5 --dtype bfloat16 --train_file_dir ./data/finetune --validation_file_dir "
        "./data/finetune --max_source_length 1024 --max_completion_length 1000 --per_device_train_batch_size 1 "
        "--gradient_accumulation_steps 4 --gradient_checkpointing True --do_train --max_steps 3000 "
        "--output_dir outputs-ppo-qwen-v1 --eval_strategy steps --eval_steps 100 --num_train_epochs 3 "
        "--report_to tensorboard"),
}

_FLAG = re.compile(r"--[A-Za-z_][\w-]*")


def _split(argv: list[str]) -> list[tuple[str, list[str]]]:
    """argv as (flag, values) pairs; a flag's values run to the next --flag (flag=value is one value)."""
    items: list[tuple[str, list[str]]] = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        if _FLAG.fullmatch(flag):
            items.append((flag, [value] if eq else []))
        elif items:
            items[-1][1].append(arg)
        else:
            items.append(("", [arg]))  # a leading positional: left to the parser
    return items


def translate_aliases(argv: list[str], known_flags: set[str]) -> list[str]:
    """argv with MedicalGPT's flags that this script does not know rewritten to ours (see the module doc)."""
    items = _split(argv)
    given = {flag: values for flag, values in items}
    out: list[str] = []
    for flag, values in items:
        alias = ALIASES.get(flag)
        if flag in known_flags or alias is None:  # ours, or unknown to both: the parser judges it
            out += ([flag] if flag else []) + values
            continue
        target = next((t for t in alias.targets if t in known_flags), None)
        if target is None:
            if alias.refused or not alias.ignored:
                ours = alias.refused or f"this script has no {' / '.join(alias.targets)}"
                raise UsageError(f"{flag} (MedicalGPT's flag): {ours}")
            logger.warning("%s (MedicalGPT's flag) ignored: %s", flag, alias.ignored)
            continue
        converted = alias.convert(values)
        if converted is None:
            continue
        if target in given:
            if given[target] != converted:
                raise UsageError(f"{flag} {' '.join(values)} and {target} {' '.join(given[target])} disagree: "
                                 f"{flag} is MedicalGPT's spelling of {target}, give one")
            continue
        out += [target, *converted]
    return out


def command_flags(command: str) -> list[str]:
    """The flags of a MEDICALGPT_COMMANDS entry, in order."""
    return [flag for flag, _ in _split(command.split())]


def migration_table() -> str:
    """docs/migration.md's tables: every flag of MedicalGPT's scripts, every alias, the renamed scripts."""
    scripts: dict[str, list[str]] = {}
    for script, command in MEDICALGPT_COMMANDS.items():
        for flag in command_flags(command):
            scripts.setdefault(flag, []).append(script.removesuffix(".py"))
    rows = ["| MedicalGPT's flag | in their run_*.sh for | here |", "|---|---|---|"]
    for flag, users in sorted(scripts.items()):
        alias = ALIASES.get(flag)
        here = "same" if alias is None else (
            f"where the script lacks `{flag}`: " + (" or ".join(f"`{t}`" for t in alias.targets) or
                                                    ("ignored" if alias.ignored else "refused")))
        rows.append(f"| `{flag}` | {', '.join(users)} | {here} |")
    rows += ["", "| MedicalGPT | here | notes |", "|---|---|---|"]
    for alias in ALIASES.values():
        if alias.targets:
            ours = " or ".join(f"`{t}`" for t in alias.targets)
            notes = "; ".join(filter(None, [alias.note, alias.refused and f"otherwise refused: {alias.refused}"]))
        else:
            ours = "ignored" if alias.ignored else "refused"
            notes = alias.ignored or alias.refused
        rows.append(f"| `{alias.flag}` | {ours} | {notes} |")
    rows += ["", "| MedicalGPT script | here |", "|---|---|"]
    rows += [f"| `{theirs}` | `{ours}` |" for theirs, ours in RENAMED_SCRIPTS.items()]
    return "\n".join(rows)


if __name__ == "__main__":
    print(migration_table())

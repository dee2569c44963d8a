"""A MedicalGPT user's commands run unchanged: every stage for one step with the full flag set of MedicalGPT's
run_*.sh (paths replaced by our data and the tiny model, --bf16/--fp16 dropped, sizes cut to one short step)."""

import importlib
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

from medicalgpt.aliases import ALIASES, MEDICALGPT_COMMANDS, _split, migration_table, translate_aliases
from medicalgpt.args import LoraArguments, ModelArguments, SFTDataArguments, parse_args
from medicalgpt.errors import UsageError
from medicalgpt.training import STAGE_DEFAULTS

DATA = {"pretraining.py": "data/pretrain/validation", "grpo_training.py": "data/grpo/validation",
        "reward_modeling.py": "data/preference/validation", "dpo_training.py": "data/preference/validation",
        "orpo_training.py": "data/preference/validation"}
# Values replaced to make one step cheap; their meaning is untouched.
SMALL = {"--max_train_samples": ["16"], "--max_eval_samples": ["4"], "--max_steps": ["1"], "--block_size": ["64"],
         "--model_max_length": ["256"], "--max_source_length": ["128"], "--max_target_length": ["64"],
         "--max_completion_length": ["8"], "--gradient_accumulation_steps": ["1"], "--report_to": ["none"],
         "--preprocessing_num_workers": ["1"], "--per_device_eval_batch_size": ["4"], "--save_steps": ["500"],
         "--eval_steps": ["1"], "--flash_attn": ["False"],  # flash-attn needs a CUDA GPU: its alias is tested below
         "--bf16": None, "--fp16": None}


def their_command(script: str, model: str, output_dir: Path) -> list[str]:
    data = DATA.get(script, "data/sft/validation")
    replaced = {"--model_name_or_path": [model], "--sft_model_path": [model], "--reward_model_path": [model],
                "--train_file_dir": [data], "--validation_file_dir": [data], "--output_dir": [str(output_dir)],
                "--cache_dir": [str(output_dir / "cache")], **SMALL}
    argv = []
    for flag, values in _split(MEDICALGPT_COMMANDS[script].split()):
        new = replaced.get(flag, values)
        argv += [] if new is None else [flag, *new]
    return argv + (["--max_new_tokens", "8", "--batch_size", "4"] if script == "ppo_training.py" else [])


@pytest.mark.parametrize("script", MEDICALGPT_COMMANDS)
def test_each_stage_runs_one_step_with_medicalgpts_flags(script, tiny_model_dir, tmp_path):
    stage = importlib.import_module(script.removesuffix(".py"))
    result = stage.main(their_command(script, tiny_model_dir, tmp_path))
    assert result, script
    assert (tmp_path / "adapter_config.json").exists() or (tmp_path / "model.safetensors").exists()


def test_aliases_carry_the_meaning():
    (model_args, lora_args, data_args, training_args) = parse_args(
        (ModelArguments, LoraArguments, SFTDataArguments, SFTConfig),
        ["--torch_dtype", "float32", "--qlora", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj",
         "--model_max_length", "300", "--train_samples", "-1", "--evaluation_strategy", "no", "--warmup_ratio",
         "0.1", "--train_file", "data/sft/validation/x.jsonl", "--flash_attn", "True", "--report_to", "none"],
        defaults=STAGE_DEFAULTS)
    assert (model_args.dtype, model_args.load_in_4bit, model_args.attn_implementation) == (
        "float32", True, "flash_attention_2")
    assert (lora_args.lora_rank, lora_args.target_modules) == (4, "q_proj,v_proj")
    assert (training_args.max_length, training_args.eval_strategy, training_args.warmup_steps) == (300, "no", 0.1)
    assert (data_args.max_train_samples, data_args.train_file_dir) == (None, "data/sft/validation/x.jsonl")


def test_an_alias_only_applies_where_the_script_lacks_the_flag():
    assert translate_aliases(["--max_completion_length", "8"], {"--max_completion_length", "--max_new_tokens"}) == [
        "--max_completion_length", "8"]
    assert translate_aliases(["--max_completion_length", "8"], {"--max_new_tokens"}) == ["--max_new_tokens", "8"]


def test_flags_without_an_equivalent_are_refused_in_one_line_naming_ours():
    with pytest.raises(UsageError, match="--max_target_length .*use --max_length"):
        translate_aliases(["--max_target_length", "256"], {"--max_length"})
    with pytest.raises(UsageError, match="HF_TOKEN"):
        translate_aliases(["--hf_hub_token", "hf_x"], set())
    with pytest.raises(UsageError, match="disagree"):  # an alias and our flag with different values
        translate_aliases(["--sft_model_path", "a", "--model_name_or_path", "b"], {"--model_name_or_path"})
    assert translate_aliases(["--sft_model_path", "a", "--model_name_or_path", "a"], {"--model_name_or_path"}) == [
        "--model_name_or_path", "a"]


def test_migration_page_is_generated_from_the_alias_table():
    page = Path("docs/migration.md").read_text(encoding="utf-8")
    assert migration_table() in page, "regenerate: python -m medicalgpt.aliases (see docs/migration.md)"
    every_flag = {flag for command in MEDICALGPT_COMMANDS.values() for flag, _ in _split(command.split())}
    assert all(f"| `{flag}` |" in page for flag in every_flag | set(ALIASES))


@pytest.fixture(scope="module")
def medicalgpt_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter saved as MedicalGPT's stages save one: PEFT's save_pretrained plus the tokenizer, its config
    recording the hub base it was trained on (not reachable here, so --base_model names ours)."""
    out = tmp_path_factory.mktemp("medicalgpt-adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    targets = sorted({name.split(".")[-1] for name, module in base.named_modules()
                      if isinstance(module, torch.nn.Linear) and "lm_head" not in name})  # their find_all_linear_names
    config = LoraConfig(task_type="CAUSAL_LM", target_modules=targets, r=8, lora_alpha=16, lora_dropout=0.05,
                        init_lora_weights=False)  # random B: an adapter that changes the answers
    model = get_peft_model(base, config)
    model.peft_config["default"].base_model_name_or_path = "Qwen/Qwen3.5-2B"
    with warnings.catch_warnings():  # PEFT looks the unreachable hub base up to see whether its vocabulary changed
        warnings.simplefilter("ignore", UserWarning)
        model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_a_medicalgpt_adapter_and_its_merge_load_for_inference_serving_and_training(
        medicalgpt_adapter, tiny_model_dir, tmp_path, capsys):
    import inference
    import supervised_finetuning
    from medicalgpt.serving import BaseModelArguments, ServeArguments, load_chat_model

    # Their merge_peft_adapter.py: PeftModel.from_pretrained(base, adapter).merge_and_unload(), plus the tokenizer.
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), medicalgpt_adapter)
    merged.merge_and_unload().save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(medicalgpt_adapter).save_pretrained(tmp_path / "merged")
    greedy = ["--prompt", "头痛怎么办？", "--max_new_tokens", "8", "--temperature", "0"]
    for model_flags in (["--base_model", tiny_model_dir, "--lora_model", str(medicalgpt_adapter)],
                        ["--base_model", str(tmp_path / "merged")], ["--base_model", tiny_model_dir]):
        inference.main([*model_flags, *greedy])
    with_adapter, merged_answer, base_answer = capsys.readouterr().out.split("\n")[:3]  # one line each
    assert with_adapter == merged_answer != base_answer

    served = load_chat_model(BaseModelArguments(model_name_or_path=str(tmp_path / "merged")), ServeArguments())
    assert served.template.name == "chatml"

    argv = their_command("supervised_finetuning.py", tiny_model_dir, tmp_path / "sft")
    supervised_finetuning.main([*argv, "--peft_path", str(medicalgpt_adapter)])
    continued, theirs = (load_file(Path(path) / "adapter_model.safetensors")
                         for path in (tmp_path / "sft", medicalgpt_adapter))
    assert continued.keys() == theirs.keys()
    # A fresh adapter starts with B = 0; one step at their learning rate (2e-5) leaves theirs almost where it was.
    assert all((continued[k] - theirs[k]).abs().max() < 1e-3 for k in theirs)
    assert max(theirs[k].abs().max() for k in theirs if "lora_B" in k) > 0.1


def test_medicalgpts_inference_command_parses_to_ours():
    from inference import parse_inference_args

    model_args, args, gen_args = parse_inference_args(
        ["--base_model", "m", "--lora_model", "a", "--tokenizer_path", "t", "--eval_batch_size", "2",
         "--load_in_8bit", "--data_file", "q.txt", "--output_file", "o.jsonl", "--stop_str", "</s>"])
    assert (model_args.model_name_or_path, model_args.tokenizer_name_or_path, model_args.load_in_8bit) == (
        "m", "t", True)
    assert (args.lora_model, args.batch_size, args.data_file) == ("a", 2, "q.txt")

"""configs/<stage>.yaml is each stage's home of defaults; a leading config file and flags override it."""

import re
from pathlib import Path

import pytest
import yaml
from transformers import TrainingArguments

from medicalgpt.args import DataArguments, ModelArguments, parse_args
from medicalgpt.data import to_text
from medicalgpt.training import STAGE_DEFAULTS, load_records
from tools.scripts import script_main

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"pt": "pretraining", "sft": "supervised_finetuning", "rm": "reward_modeling", "dpo": "dpo_training",
          "orpo": "orpo_training", "kto": "kto_training", "cpo": "cpo_training", "grpo": "grpo_training",
          "distill": "distillation_training", "ppo": "ppo_training"}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_reads_its_own_config(stage, capsys):
    """Every key of the file is a flag of its stage (else --help would stop on it), and its values are the
    defaults --help shows."""
    script = STAGES[stage]
    values = yaml.safe_load((ROOT / "configs" / f"{stage}.yaml").read_text())
    assert f'with_name("configs") / "{stage}.yaml"' in (ROOT / f"{script}.py").read_text()
    with pytest.raises(SystemExit) as exit_info:
        script_main(script)(["--help"])
    assert exit_info.value.code == 0
    help_text = re.sub(r"\s+", " ", capsys.readouterr().out)
    assert "--output_dir OUTPUT_DIR" in help_text and values["output_dir"] == f"outputs-{stage}"
    assert re.search(rf"--logging_steps .*?\(default: {values['logging_steps']}\)", help_text)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_flags_override_a_leading_config_which_overrides_the_stage_config(tmp_path):
    stage = write(tmp_path / "stage.yaml", "output_dir: out-stage\nlearning_rate: 1.0e-3\nlogging_steps: 7\n"
                                           "save_steps: 9\n")
    mine = write(tmp_path / "mine.yaml", "learning_rate: 2.0e-4\nlogging_steps: 3\n")
    _, args = parse_args((ModelArguments, TrainingArguments), [mine, "--logging_steps", "5"],
                         defaults={**STAGE_DEFAULTS, "save_steps": 1}, config=stage)
    assert (args.output_dir, args.save_steps) == ("out-stage", 9)  # the stage's config over `defaults`
    assert args.learning_rate == 2e-4 and args.logging_steps == 5  # the leading config, then the flag


@pytest.mark.parametrize("leading", [True, False])
def test_an_unknown_key_names_its_file_and_the_closest_key(tmp_path, capsys, leading):
    bad = write(tmp_path / "bad.yaml", "learning_rat: 1.0e-4\n")
    with pytest.raises(SystemExit):
        parse_args((ModelArguments, TrainingArguments), [bad] if leading else [], config=None if leading else bad)
    assert f"{bad}: unknown arguments: learning_rat (did you mean learning_rate?)" in capsys.readouterr().err


def test_a_configs_eval_strategy_is_off_without_validation_data(tmp_path, caplog):
    """The stage configs evaluate every few steps; a run without validation data trains instead of stopping."""
    args = TrainingArguments(output_dir=str(tmp_path), eval_strategy="steps", eval_steps=5, use_cpu=True)
    records = load_records(DataArguments(train_file_dir=str(ROOT / "data/pretrain/validation"),
                                         validation_split_percentage=0), to_text, args)
    assert "validation" not in records and args.eval_strategy == "no"
    assert "No validation data: --eval_strategy steps is off" in caplog.text
    args = TrainingArguments(output_dir=str(tmp_path), eval_strategy="steps", eval_steps=5, use_cpu=True)
    load_records(DataArguments(train_file_dir=str(ROOT / "data/pretrain/validation")), to_text, args)
    assert args.eval_strategy == "steps"  # the default 1% held out

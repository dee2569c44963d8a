"""The run_*.sh wrappers: what they pass to the stages, recorded by a `python` (and `torchrun`) on PATH that logs
its arguments. Settings have one home, configs/<stage>.yaml: a wrapper names its config and passes only paths."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import medicalgpt.args
from tools.scripts import script_main

ROOT = Path(__file__).resolve().parents[1]
WRAPPERS = {  # wrapper: (stage script, sample data, config)
    "run_pt.sh": ("pretraining.py", "pretrain", "pt"), "run_sft.sh": ("supervised_finetuning.py", "sft", "sft"),
    "run_rm.sh": ("reward_modeling.py", "preference", "rm"), "run_dpo.sh": ("dpo_training.py", "preference", "dpo"),
    "run_orpo.sh": ("orpo_training.py", "preference", "orpo"), "run_kto.sh": ("kto_training.py", "preference", "kto"),
    "run_grpo.sh": ("grpo_training.py", "grpo", "grpo"),
    "run_distill.sh": ("distillation_training.py", "sft", "distill")}
# What a wrapper may pass besides its config: where the model, data and outputs are, and how to resume.
PATH_FLAGS = {"--model_name_or_path", "--teacher_model_name_or_path", "--reward_model", "--template_name",
              "--train_file_dir", "--validation_file_dir", "--output_dir", "--resume_from_checkpoint"}


def run_wrapper(tmp_path, wrapper: str, *args: str, **variables: str) -> list[dict]:
    """Run a wrapper from the user's own directory (tmp_path/work); each call as {program, cwd, script, args}."""
    calls, shims, work = tmp_path / "calls.jsonl", tmp_path / "bin", tmp_path / "work"
    calls.unlink(missing_ok=True)
    shims.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    recorder = ("import json, os, sys; open(os.environ['CALLS'], 'a').write(json.dumps([sys.argv[1], os.getcwd(), "
                "*sys.argv[2:]]) + '\\n')")
    for program in ("python", "torchrun"):
        (shims / program).write_text(f'#!/bin/sh\nexec {sys.executable} -c "{recorder}" {program} "$@"\n')
        (shims / program).chmod(0o755)
    env = {key: value for key, value in os.environ.items()
           if key not in ("CONFIG", "TRAIN", "VALID", "OUTPUT", "LAUNCH", "MODEL", "TEMPLATE")}
    env.update(PATH=f"{shims}:{env['PATH']}", CALLS=str(calls), **variables)
    subprocess.run(["bash", str(ROOT / wrapper), *args], cwd=work, env=env, check=True, timeout=60)
    return [{"program": program, "cwd": cwd, "script": script, "args": args}
            for program, cwd, script, *args in map(json.loads, calls.read_text().splitlines())]


def config_of(stage: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / f"{stage}.yaml").read_text())


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_paths_resolve_against_the_callers_directory(wrapper, tmp_path):
    script, data, _ = WRAPPERS[wrapper]
    (call,) = run_wrapper(tmp_path, wrapper, TRAIN="mine/train.jsonl")
    assert call["script"] == str(ROOT / script) and call["cwd"] == str(tmp_path / "work")
    assert call["args"][call["args"].index("--train_file_dir") + 1] == "mine/train.jsonl"
    # your own TRAIN is not validated on the sample validation set: 1% of it is held out instead
    assert "--validation_file_dir" not in call["args"]
    (default,) = run_wrapper(tmp_path, wrapper)
    assert default["args"][default["args"].index("--validation_file_dir") + 1] == str(ROOT / "data" / data /
                                                                                     "validation")


def test_valid_is_what_you_give_and_can_be_emptied(tmp_path):
    (own,) = run_wrapper(tmp_path, "run_sft.sh", TRAIN="mine/train", VALID="mine/valid")
    assert own["args"][own["args"].index("--validation_file_dir") + 1] == "mine/valid"
    (emptied,) = run_wrapper(tmp_path, "run_sft.sh", VALID="")
    assert "--validation_file_dir" not in emptied["args"]
    assert emptied["args"][emptied["args"].index("--train_file_dir") + 1] == str(ROOT / "data/sft/train")


@pytest.mark.parametrize("wrapper", [*sorted(WRAPPERS), "run_ppo.sh"])
def test_a_wrapper_names_its_config_and_repeats_none_of_its_keys(wrapper, tmp_path):
    stage = WRAPPERS[wrapper][2] if wrapper in WRAPPERS else "ppo"
    call = run_wrapper(tmp_path, wrapper)[-1]
    assert call["args"][0] == str(ROOT / "configs" / f"{stage}.yaml")
    flags = {arg for arg in call["args"] if arg.startswith("--")}
    assert flags <= PATH_FLAGS, f"{wrapper} sets {sorted(flags - PATH_FLAGS)}: they belong in configs/{stage}.yaml"
    assert not {flag.removeprefix("--") for flag in flags} & set(config_of(stage)) - {"output_dir"}
    assert "--output_dir" not in flags or wrapper == "run_ppo.sh"  # the config's, unless OUTPUT is set
    (own,) = run_wrapper(tmp_path, wrapper, OUTPUT="mine") if wrapper != "run_ppo.sh" else [None]
    assert own is None or own["args"][own["args"].index("--output_dir") + 1] == "mine"


class Parsed(Exception):
    """Raised by the spy in place of parse_args' return, so a stage stops before loading anything."""


def effective_settings(call: dict, monkeypatch) -> dict:
    """Every setting the stage would run with, parsed from the wrapper's arguments by the stage's own parse_args."""
    def spy(*args, **kwargs):
        raise Parsed(real(*args, **kwargs))

    real = medicalgpt.args.parse_args
    monkeypatch.setattr(medicalgpt.args, "parse_args", spy)  # the script binds it when script_main loads it
    with pytest.raises(Parsed) as parsed:
        script_main(Path(call["script"]).stem)(call["args"])
    return {name: value for group in parsed.value.args[0] for name, value in vars(group).items()}


def same(actual, expected) -> bool:
    """A config value against the parsed one, which a trainer config may have turned into an enum or a list."""
    return actual == expected or actual == [expected] or getattr(actual, "value", None) == expected


@pytest.mark.parametrize("wrapper", [*sorted(WRAPPERS), "run_ppo.sh"])
def test_a_wrappers_settings_are_its_configs_and_flags_override_them(wrapper, tmp_path, monkeypatch):
    stage = WRAPPERS[wrapper][2] if wrapper in WRAPPERS else "ppo"
    settings = effective_settings(run_wrapper(tmp_path, wrapper)[-1], monkeypatch)
    differ = {key: (value, settings[key]) for key, value in config_of(stage).items()
              if value is not None and key != "output_dir" and not same(settings[key], value)}
    assert not differ, f"{wrapper}: config value vs what the stage runs with: {differ}"
    overridden = effective_settings(run_wrapper(tmp_path, wrapper, "--learning_rate", "0.25")[-1], monkeypatch)
    assert overridden["learning_rate"] == 0.25


def test_config_names_a_copy_of_your_own(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    (tmp_path / "work/mine.yaml").write_text("learning_rate: 3.0e-4\nnum_train_epochs: 5\n")
    call = run_wrapper(tmp_path, "run_sft.sh", "--num_train_epochs", "2", CONFIG="mine.yaml")[-1]
    monkeypatch.chdir(tmp_path / "work")
    settings = effective_settings(call, monkeypatch)
    assert (settings["learning_rate"], settings["num_train_epochs"]) == (3e-4, 2)  # the copy, then the flag
    assert settings["per_device_train_batch_size"] == config_of("sft")["per_device_train_batch_size"]


def test_launch_starts_the_stage_with_your_launcher(tmp_path):
    (call,) = run_wrapper(tmp_path, "run_sft.sh", LAUNCH="torchrun --nproc_per_node 2")
    assert call["program"] == "torchrun" and call["script"] == "--nproc_per_node"
    assert call["args"][:2] == ["2", str(ROOT / "supervised_finetuning.py")]


def test_ppo_wrapper_flags_reach_only_ppo(tmp_path):
    calls = run_wrapper(tmp_path, "run_ppo.sh", "--learning_rate", "0.5", CONFIG="mine.yaml")
    by_script = {Path(call["script"]).name: call["args"] for call in calls}
    assert list(by_script) == ["supervised_finetuning.py", "merge_peft_adapter.py", "reward_modeling.py",
                               "ppo_training.py"]
    for stage, config in (("supervised_finetuning.py", "sft"), ("reward_modeling.py", "rm")):  # their own configs
        assert "--learning_rate" not in by_script[stage]
        assert by_script[stage][0] == str(ROOT / "configs" / f"{config}.yaml")
    ppo = by_script["ppo_training.py"]
    assert ppo[0] == "mine.yaml" and ppo[ppo.index("--learning_rate") + 1] == "0.5"
    assert ppo[ppo.index("--train_file_dir") + 1] == str(ROOT / "data/sft/train")
    assert by_script["reward_modeling.py"][by_script["reward_modeling.py"].index("--output_dir") + 1] == \
        "outputs-rlhf/rm"

"""The run_*.sh wrappers: what they pass to the stages, recorded by a `python` on PATH that logs its arguments."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WRAPPERS = {"run_pt.sh": ("pretraining.py", "pretrain"), "run_sft.sh": ("supervised_finetuning.py", "sft"),
            "run_rm.sh": ("reward_modeling.py", "preference"), "run_dpo.sh": ("dpo_training.py", "preference"),
            "run_orpo.sh": ("orpo_training.py", "preference"), "run_kto.sh": ("kto_training.py", "preference"),
            "run_grpo.sh": ("grpo_training.py", "grpo")}


def run_wrapper(tmp_path, wrapper: str, **variables: str) -> list[dict]:
    """Run a wrapper from the user's own directory (tmp_path/work); each python call as {cwd, script, args}."""
    calls, shims, work = tmp_path / "calls.jsonl", tmp_path / "bin", tmp_path / "work"
    calls.unlink(missing_ok=True)
    shims.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    recorder = ("import json, os, sys; open(os.environ['CALLS'], 'a').write(json.dumps([os.getcwd(), *sys.argv[1:]]) "
                "+ '\\n')")
    (shims / "python").write_text(f'#!/bin/sh\nexec {sys.executable} -c "{recorder}" "$@"\n')
    (shims / "python").chmod(0o755)
    env = {key: value for key, value in os.environ.items()
           if key not in ("TRAIN", "VALID", "OUTPUT", "LR", "BATCH", "EPOCHS")}
    env.update(PATH=f"{shims}:{env['PATH']}", CALLS=str(calls), **variables)
    subprocess.run(["bash", str(ROOT / wrapper)], cwd=work, env=env, check=True, timeout=60)
    return [{"cwd": cwd, "script": script, "args": args}
            for cwd, script, *args in map(json.loads, calls.read_text().splitlines())]


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_paths_resolve_against_the_callers_directory(wrapper, tmp_path):
    script, data = WRAPPERS[wrapper]
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


def test_ppo_wrapper_settings_reach_only_ppo(tmp_path):
    calls = run_wrapper(tmp_path, "run_ppo.sh", LR="0.5", BATCH="3", EPOCHS="9")
    by_script = {Path(call["script"]).name: call["args"] for call in calls}
    assert list(by_script) == ["supervised_finetuning.py", "merge_peft_adapter.py", "reward_modeling.py",
                               "ppo_training.py"]
    for stage in ("supervised_finetuning.py", "reward_modeling.py"):  # their own wrappers' defaults
        args = by_script[stage]
        values = [args[args.index(flag) + 1] for flag in ("--learning_rate", "--per_device_train_batch_size",
                                                          "--num_train_epochs")]
        assert values[0] != "0.5" and values[1] != "3" and values[2] != "9"
    ppo = by_script["ppo_training.py"]
    assert ppo[ppo.index("--learning_rate") + 1] == "0.5" and ppo[ppo.index("--batch_size") + 1] == "3"
    assert ppo[ppo.index("--train_file_dir") + 1] == str(ROOT / "data/sft/train")
    assert by_script["reward_modeling.py"][by_script["reward_modeling.py"].index("--output_dir") + 1] == \
        "outputs-rlhf/rm"

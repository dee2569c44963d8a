"""A first run prints no message that is not news: the known library lines are filtered where they arise."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# bitsandbytes' kernel fallback (on CPUs with AVX512-BF16), transformers' deprecation read by peft and TRL, TRL's
# notice on importing ORPO/CPO from trl.experimental, and the load report of a reward model's score head, which is
# new by design.
NOISE = ("kernels-community", "is_gradient_checkpointing", "trl.experimental", "LOAD REPORT")
NOISY_IMPORTS = ("trl", "peft", "bitsandbytes")  # they print on import (the others only once a run is under way)
RUN = ["--max_steps", "1", "--report_to", "none", "--disable_tqdm", "True", "--validation_split_percentage", "0"]


def output_of(*args: str) -> str:
    """stdout + stderr of one of the scripts, run as a user runs it (without the tests' TRL_EXPERIMENTAL_SILENCE)."""
    env = {key: value for key, value in os.environ.items() if key != "TRL_EXPERIMENTAL_SILENCE"}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.mark.parametrize("script", ["supervised_finetuning.py", "orpo_training.py"])
def test_help_prints_nothing_but_help(script):
    out = output_of(script, "--help")
    assert not [noise for noise in NOISE if noise in out]


def imported_modules(script: Path) -> list[str]:
    """The modules a script imports at its top level, in order."""
    names = []
    for node in ast.parse(script.read_text()).body:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module)
    return names


def test_scripts_import_the_filters_before_a_noisy_library():
    for script in sorted(ROOT.glob("*.py")):
        modules = imported_modules(script)
        noisy = next((i for i, name in enumerate(modules) if name.split(".")[0] in NOISY_IMPORTS), None)
        if noisy is not None:
            assert "medicalgpt.quiet" in modules[:noisy], script.name


def test_a_reward_model_and_a_grpo_run_with_it_print_no_known_noise(tiny_model_dir, tmp_path):
    reward = output_of("reward_modeling.py", "--model_name_or_path", tiny_model_dir, "--output_dir",
                       str(tmp_path / "rm"), "--train_file_dir", "data/preference/train", "--max_train_samples", "16",
                       "--per_device_train_batch_size", "8", *RUN)
    grpo = output_of("grpo_training.py", "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "grpo"),
                     "--train_file_dir", "data/grpo/train", "--max_train_samples", "8", "--reward_model",
                     str(tmp_path / "rm"), "--per_device_train_batch_size", "4", "--num_generations", "4",
                     "--max_completion_length", "8", *RUN)
    assert "train_loss" in reward and "train_loss" in grpo
    assert not [noise for noise in NOISE if noise in reward + grpo]


def test_a_score_head_missing_from_a_reward_model_is_still_reported(tiny_model_dir, caplog, capfd):
    from medicalgpt.args import ModelArguments
    from medicalgpt.modeling import load_reward_model

    load_reward_model(tiny_model_dir, ModelArguments())  # a plain causal LM passed as a reward model: news
    assert "score.weight" in caplog.text + capfd.readouterr().err

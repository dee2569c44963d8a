"""Multi-process training on CPU (gloo): SFT under torchrun and DPO under accelerate launch, two processes each;
the DeepSpeed JSONs and accelerate YAMLs in configs/ checked against the libraries that read them (DeepSpeed itself
is not installed here); --deepspeed passed through by every Trainer stage and refused by PPO."""

import importlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import transformers.integrations.deepspeed as hf_deepspeed
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import launch_command_parser
from accelerate.utils.deepspeed import HfDeepSpeedConfig
from transformers import AutoModelForCausalLM
from trl import SFTConfig

import medicalgpt.args
import supervised_finetuning
from medicalgpt.errors import UsageError, run_cli
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# No --use_cpu here: the stages default to it on machines without GPUs, so launched processes train together.
TRAIN = ["--report_to", "none", "--save_strategy", "no",
         "--logging_steps", "1", "--disable_tqdm", "True", "--log_level", "info"]
GLOBAL_BATCH = "Total train batch size (w. parallel, distributed & accumulation) = "
TRAINER_STAGES = ["pretraining", "supervised_finetuning", "reward_modeling", "dpo_training", "orpo_training",
                  "cpo_training", "kto_training", "grpo_training"]


def launch(command: list[str]) -> str:
    """Run a launcher from the repository root, one thread per process, as on CI; its output."""
    # CI=true: transformers then propagates its log records too, which once printed every line twice.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "CI": "true",
           "PYTHONPATH": str(ROOT / "tests" / "probes")}
    run = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    output = run.stdout + run.stderr
    # Each rank ends its process group after the DDP wrapper is gone: a hang at exit otherwise (end_process_group).
    assert sorted(re.findall(r"rank (\d): (\d+) DDP wrappers alive at destroy_process_group", output)) == [
        ("0", "0"), ("1", "0")]
    return output


def check_one_trained_model(out: Path, output: str, steps: int, global_batch: int, weights: str) -> list[float]:
    """One model (or adapter) saved, by rank 0, after `steps` optimizer steps of `global_batch` samples; the logged
    losses."""
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == steps  # one process alone would take twice as many
    assert output.count(GLOBAL_BATCH) == 1 and f"{GLOBAL_BATCH}{global_batch}\n" in output  # rank 0 logs it
    assert [p.name for p in out.glob("*.safetensors")] == [weights]
    assert not list(out.glob("checkpoint-*")) and not list(out.glob("*.tmp*"))
    AutoModelForCausalLM.from_pretrained(out)  # complete and loadable (an adapter loads onto its base)
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == steps and all(math.isfinite(loss) for loss in losses)
    return losses


def test_sft_under_torchrun_shards_the_batches_over_two_processes(tiny_model_dir, tmp_path):
    out = tmp_path / "sft"
    output = launch(["torch.distributed.run", "--standalone", "--nproc_per_node", "2", "supervised_finetuning.py",
                     "--model_name_or_path", tiny_model_dir, "--output_dir", str(out), *TRAIN,
                     "--train_file_dir", "data/sft/train", "--max_train_samples", "64", "--num_train_epochs", "1",
                     "--max_length", "128", "--packing", "False",  # a sample a row: the step count below
                     "--validation_file_dir", "data/sft/validation", "--max_eval_samples", "16",
                     "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
                     "--use_peft", "False"])  # LoRA on a random model barely moves the SFT loss
    losses = check_one_trained_model(out, output, steps=8, global_batch=8,  # 64 samples / (2 x 4)
                                     weights="model.safetensors")
    assert losses[-1] < losses[0]
    assert math.isfinite(json.loads((out / "eval_results.json").read_text())["eval_loss"])


def test_dpo_under_accelerate_launch_shards_the_batches_over_two_processes(tiny_model_dir, tmp_path):
    out = tmp_path / "dpo"
    output = launch(["accelerate.commands.launch", "--config_file", str(CONFIGS / "accelerate_ddp.yaml"),
                     "--num_processes", "2", "--main_process_port", str(free_port()), "dpo_training.py",
                     "--model_name_or_path", tiny_model_dir, "--output_dir", str(out), *TRAIN,
                     "--train_file_dir", "data/preference/train", "--validation_split_percentage", "0",
                     "--max_train_samples", "32", "--num_train_epochs", "2", "--per_device_train_batch_size", "4",
                     "--learning_rate", "5e-3", "--beta", "0.5"])
    losses = check_one_trained_model(out, output, steps=8, global_batch=8,  # 2 epochs x 32 pairs / (2 x 4)
                                     weights="adapter_model.safetensors")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)  # the policy starts as the reference
    assert sum(losses[4:]) / 4 < 0.9 * math.log(2)  # the second pass over the pairs


# --- DeepSpeed and accelerate configs ------------------------------------------------------------------------------


class TrainerDeepSpeedConfig(HfDeepSpeedConfig):
    """transformers' HfTrainerDeepSpeedConfig (fills a DeepSpeed config's "auto" values from TrainingArguments and
    the model) on accelerate's base class, which needs no deepspeed package."""

    def __init__(self, config):
        super().__init__(config)
        self._dtype, self.mismatches = None, []

    trainer = hf_deepspeed.HfTrainerDeepSpeedConfig
    fill_match, fill_only, is_auto = trainer.fill_match, trainer.fill_only, trainer.is_auto
    trainer_config_process, trainer_config_finalize = trainer.trainer_config_process, trainer.trainer_config_finalize


@pytest.fixture
def deepspeed_without_deepspeed(monkeypatch):
    """TrainingArguments(deepspeed=...) processes the config as it would with deepspeed installed."""
    monkeypatch.setattr(hf_deepspeed, "HfTrainerDeepSpeedConfig", TrainerDeepSpeedConfig)
    monkeypatch.setattr(medicalgpt.args, "check_deepspeed", lambda config: None)


def autos(node) -> list:
    if isinstance(node, dict):
        return [auto for value in node.values() for auto in autos(value)]
    return [node] if node == "auto" else []


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("ds_*.json")))
def test_deepspeed_configs_fill_every_auto_from_the_training_arguments(name, deepspeed_without_deepspeed,
                                                                       tiny_model_dir, tmp_path):
    args = SFTConfig(output_dir=str(tmp_path), deepspeed=str(CONFIGS / name), per_device_train_batch_size=4,
                     gradient_accumulation_steps=2, max_grad_norm=0.5, bf16=False, report_to="none")
    ds = args.hf_deepspeed_config
    ds.trainer_config_finalize(args, AutoModelForCausalLM.from_pretrained(tiny_model_dir), num_training_steps=10)
    assert autos(ds.config) == [] and ds.mismatches == []
    assert (ds.config["train_micro_batch_size_per_gpu"], ds.config["train_batch_size"]) == (4, 8)
    assert (ds.config["gradient_clipping"], ds.config["bf16"]["enabled"]) == (0.5, False)
    assert args.deepspeed_plugin.zero_stage == int(name[len("ds_zero")])


class Parsed(Exception):
    """Raised with a stage's parsed argument groups, to stop it before it loads anything."""


@pytest.mark.parametrize("stage", TRAINER_STAGES)
def test_every_trainer_stage_passes_deepspeed_to_its_trainer(stage, deepspeed_without_deepspeed, monkeypatch,
                                                             tmp_path):
    module = importlib.import_module(stage)
    parse_args = module.parse_args

    def parse_then_stop(*args, **kwargs):
        raise Parsed(parse_args(*args, **kwargs))

    monkeypatch.setattr(module, "parse_args", parse_then_stop)
    with pytest.raises(Parsed) as parsed:
        module.main(["--deepspeed", str(CONFIGS / "ds_zero2.json"), "--output_dir", str(tmp_path),
                     "--per_device_train_batch_size", "16"])  # GRPO: a multiple of 8 generations
    (training_args,) = [group for group in parsed.value.args[0] if hasattr(group, "deepspeed")]
    assert training_args.deepspeed_plugin.zero_stage == 2
    assert training_args.hf_deepspeed_config.config["train_micro_batch_size_per_gpu"] == 16


def test_ppo_refuses_deepspeed_rather_than_ignoring_it(capsys):
    import ppo_training

    with pytest.raises(SystemExit) as exit_info:
        ppo_training.main(["--deepspeed", str(CONFIGS / "ds_zero2.json")])
    assert exit_info.value.code == 2 and "unrecognized arguments: --deepspeed" in capsys.readouterr().err


def test_ppo_refuses_to_run_under_a_launcher(monkeypatch):
    import ppo_training

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="runs in one process"):
        ppo_training.main(["--reward_funcs", "answer_accuracy"])


def test_deepspeed_without_the_package_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: supervised_finetuning.main(["--deepspeed", str(CONFIGS / "ds_zero2.json")]))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --deepspeed needs the deepspeed package: pip install deepspeed (on a machine with CUDA GPUs), or "
        "drop --deepspeed (torchrun and accelerate launch then run plain DDP)"]


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("accelerate_*.yaml")))
def test_accelerate_configs_name_only_fields_accelerate_knows(name):
    config = ClusterConfig.from_yaml_file(CONFIGS / name)  # unknown top-level keys raise
    launch_flags = {action.dest for action in launch_command_parser()._actions}
    nested = {key for section in (config.deepspeed_config, config.fsdp_config) for key in (section or {})}
    assert nested <= launch_flags
    if ds_file := (config.deepspeed_config or {}).get("deepspeed_config_file"):
        assert (ROOT / ds_file).is_file()

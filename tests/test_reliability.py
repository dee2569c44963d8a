"""Crash safety: a run killed (SIGKILL) or stopped (SIGTERM, SIGINT) and continued with --resume_from_checkpoint auto
ends with the uninterrupted run's losses and weights; incomplete checkpoints are skipped; conflicting options fail
in one line before any loading."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers.trainer_utils import sort_checkpoints

import dpo_training
import grpo_training
import ppo_training
import supervised_finetuning
from medicalgpt import training
from medicalgpt.errors import UsageError, run_cli
from medicalgpt.training import missing_checkpoint_parts, resolve_resume_checkpoint
from tests.test_ppo import run_ppo

ROOT = Path(__file__).resolve().parents[1]
# Full fine-tuning (it learns), 2 epochs of 4 steps (the resumed sampler must reshuffle the same way), a checkpoint
# every 2 steps; a killed run is caught after checkpoint-2, with 6 steps (seconds) to go.
RUN = ["--use_peft", "False", "--max_steps", "8", "--save_steps", "2", "--logging_steps", "1",
       "--per_device_train_batch_size", "4", "--max_train_samples", "16", "--validation_split_percentage", "0",
       "--report_to", "none", "--disable_tqdm", "True"]
SFT = ["--train_file_dir", "data/sft/train", "--max_length", "128", "--learning_rate", "1e-3", *RUN]
DPO = ["--train_file_dir", "data/preference/train", "--max_source_length", "64", "--max_target_length", "64",
       "--learning_rate", "1e-4", *RUN]
PPO = ["--learning_rate", "1e-3", "--save_steps", "2", "--lora_rank", "4", "--max_steps", "5"]


def start(code: list[str]) -> subprocess.Popen:
    """A Python child in the repository root (the environment, OMP_NUM_THREADS=1 included, is inherited)."""
    return subprocess.Popen([sys.executable, *code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_for_checkpoint(process: subprocess.Popen, checkpoint: Path, timeout: float = 240) -> None:
    """Poll until the checkpoint is complete, while the run is still going."""
    deadline = time.monotonic() + timeout
    while not (checkpoint.is_dir() and not missing_checkpoint_parts(checkpoint)):
        assert process.poll() is None, f"the run ended before {checkpoint.name}:\n{process.stdout.read()}"
        assert time.monotonic() < deadline, f"no {checkpoint.name} after {timeout} s"
        time.sleep(0.02)


def kill_after_checkpoint(process: subprocess.Popen, output_dir: Path, signum: int) -> int:
    wait_for_checkpoint(process, output_dir / "checkpoint-2")
    process.send_signal(signum)
    return process.wait(timeout=240)


def assert_same_weights(resumed: Path, straight: Path) -> None:
    expected, actual = load_file(straight), load_file(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=0)


def assert_same_run(resumed: Path, straight: Path) -> None:
    """Every step's logged loss, and the final weights, equal the uninterrupted run's."""
    def losses(output_dir: Path) -> list[tuple[int, float]]:
        history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
        return [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]

    assert [step for step, _ in losses(resumed)] == [step for step, _ in losses(straight)] == list(range(1, 9))
    torch.testing.assert_close(losses(resumed), losses(straight), atol=1e-6, rtol=0)
    assert_same_weights(resumed / "model.safetensors", straight / "model.safetensors")


@pytest.fixture(scope="module")
def straight_sft(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight-sft")
    supervised_finetuning.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(out), *SFT])
    return out


def test_sft_killed_with_sigkill_resumes_exactly(tiny_model_dir, straight_sft, tmp_path):
    process = start(["supervised_finetuning.py", "--model_name_or_path", tiny_model_dir, "--output_dir",
                     str(tmp_path), *SFT])
    assert kill_after_checkpoint(process, tmp_path, signal.SIGKILL) == -signal.SIGKILL
    assert not (tmp_path / "train_results.json").exists()
    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2  # the data position; model, optimizer, scheduler and RNG: the poll checked
    supervised_finetuning.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path), *SFT,
                                "--resume_from_checkpoint", "auto"])
    assert_same_run(tmp_path, straight_sft)


def test_sft_sigterm_saves_a_checkpoint_and_exits_143(tiny_model_dir, straight_sft, tmp_path):
    process = start(["supervised_finetuning.py", "--model_name_or_path", tiny_model_dir, "--output_dir",
                     str(tmp_path), *SFT])
    assert kill_after_checkpoint(process, tmp_path, signal.SIGTERM) == 128 + signal.SIGTERM
    log = process.stdout.read()
    assert "Stopped by SIGTERM" in log and "Traceback" not in log
    last = training.last_complete_checkpoint(str(tmp_path))
    assert 2 < int(last.rsplit("-", 1)[1]) < 8 and not (tmp_path / "model.safetensors").exists()
    supervised_finetuning.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path), *SFT,
                                "--resume_from_checkpoint", "auto"])
    assert_same_run(tmp_path, straight_sft)


def test_sft_ctrl_c_saves_at_the_next_step(tiny_model_dir, straight_sft, tmp_path, monkeypatch, sigint_handled):
    plot = training.write_loss_plot

    def ctrl_c_after_checkpoint_2(args, state, metrics):  # runs on each save, in the training process
        plot(args, state, metrics)
        if state.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(training, "write_loss_plot", ctrl_c_after_checkpoint_2)
    argv = ["--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path), *SFT]
    with pytest.raises(SystemExit) as exit_info:
        supervised_finetuning.main(argv)
    assert exit_info.value.code == 128 + signal.SIGINT
    assert training.last_complete_checkpoint(str(tmp_path)).endswith("checkpoint-3")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored to the handler before the run
    monkeypatch.undo()
    supervised_finetuning.main([*argv, "--resume_from_checkpoint", "auto"])
    assert_same_run(tmp_path, straight_sft)


def test_an_inherited_ignored_sigint_stays_ignored():
    """A run started with SIGINT ignored (nohup, a shell's background job) must not start reacting to Ctrl-C."""
    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with training.StopOnSignal():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # SIGTERM still saves and stops
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_dpo_killed_with_sigkill_resumes_exactly(tiny_model_dir, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    dpo_training.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(straight), *DPO])
    process = start(["dpo_training.py", "--model_name_or_path", tiny_model_dir, "--output_dir", str(killed), *DPO])
    assert kill_after_checkpoint(process, killed, signal.SIGKILL) == -signal.SIGKILL
    dpo_training.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(killed), *DPO,
                       "--resume_from_checkpoint", "auto"])
    assert_same_run(killed, straight)


@pytest.fixture(scope="module")
def straight_ppo(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight-ppo")
    run_ppo(tiny_model_dir, out, *PPO)
    return out


def test_ppo_killed_with_sigkill_resumes_exactly(tiny_model_dir, straight_ppo, tmp_path):
    """tests/test_ppo.py resumes after a clean stop; this kills the process after its first checkpoint."""
    process = start(["-c", "import sys; from tests.test_ppo import run_ppo; run_ppo(*sys.argv[1:])", tiny_model_dir,
                     str(tmp_path), *PPO])
    deadline = time.monotonic() + 240
    while not (tmp_path / "checkpoint-2").is_dir():  # PPO renames a finished checkpoint into place
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
        time.sleep(0.02)
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL and not (tmp_path / "adapter_model.safetensors").exists()
    run_ppo(tiny_model_dir, tmp_path, *PPO, "--resume_from_checkpoint", "auto")
    assert_same_weights(tmp_path / "adapter_model.safetensors", straight_ppo / "adapter_model.safetensors")


def test_ppo_sigterm_saves_at_the_next_step(tiny_model_dir, straight_ppo, tmp_path, monkeypatch):
    save = ppo_training.save_checkpoint

    def sigterm_after_checkpoint_2(path, *args):
        save(path, *args)
        if path.name == "checkpoint-2":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ppo_training, "save_checkpoint", sigterm_after_checkpoint_2)
    with pytest.raises(SystemExit) as exit_info:
        run_ppo(tiny_model_dir, tmp_path, *PPO)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert sort_checkpoints(str(tmp_path))[-1].endswith("checkpoint-3")
    monkeypatch.undo()
    run_ppo(tiny_model_dir, tmp_path, *PPO, "--resume_from_checkpoint", "auto")
    assert_same_weights(tmp_path / "adapter_model.safetensors", straight_ppo / "adapter_model.safetensors")


# --- incomplete checkpoints ------------------------------------------------------------------------------------------

def fake_checkpoint(path: Path, skip: tuple[str, ...] = (), state: str = '{"global_step": 2}') -> None:
    path.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        if name not in skip:
            (path / name).write_bytes(b"x")
    if "trainer_state.json" not in skip:
        (path / "trainer_state.json").write_text(state)


def test_auto_skips_incomplete_checkpoints(tmp_path, caplog):
    fake_checkpoint(tmp_path / "checkpoint-2")
    fake_checkpoint(tmp_path / "checkpoint-4", skip=("trainer_state.json",))  # killed while saving
    fake_checkpoint(tmp_path / "checkpoint-6", state='{"global_step": 6, "log_hi')  # killed writing the state
    fake_checkpoint(tmp_path / "checkpoint-8", skip=("optimizer.pt", "rng_state.pth"))  # e.g. half deleted
    (tmp_path / "tmp-checkpoint-10").mkdir()  # a stray directory, not a checkpoint
    assert resolve_resume_checkpoint(str(tmp_path), "auto", overwrite=False) == str(tmp_path / "checkpoint-2")
    assert "checkpoint-8 (no optimizer, RNG state)" in caplog.text
    assert all(f"checkpoint-{step} (no trainer_state.json)" in caplog.text for step in (4, 6))
    with pytest.raises(UsageError, match="incomplete checkpoint \\(no trainer_state.json\\)"):
        resolve_resume_checkpoint(str(tmp_path), str(tmp_path / "checkpoint-4"), overwrite=False)


# --- conflicting options, refused before any loading (the model path does not exist) --------------------------------

def sft_main(output_dir: Path, *flags: str) -> dict:
    return supervised_finetuning.main(["--model_name_or_path", str(output_dir / "no-model"), "--output_dir",
                                       str(output_dir), *SFT, *flags])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU")
@pytest.mark.parametrize("flags, native_bf16, message", [
    (["--bf16", "True"], False, "this CPU has no native bfloat16"),  # --use_cpu is the default without a GPU
    (["--fp16", "True"], True, "--fp16 needs a GPU"),
])
def test_precision_the_device_lacks(flags, native_bf16, message, tmp_path, monkeypatch):
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: native_bf16)
    with pytest.raises(UsageError, match=message):
        sft_main(tmp_path, *flags)


def test_vllm_needs_a_gpu_and_the_package(monkeypatch):
    args = SimpleNamespace(use_vllm=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="needs a CUDA GPU"):
        grpo_training.check_vllm(args)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(grpo_training.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match="needs vLLM"):
        grpo_training.check_vllm(args)


def test_refuses_another_runs_checkpoints(tiny_model_dir, tmp_path, capsys):
    fake_checkpoint(tmp_path / "checkpoint-500")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: sft_main(tmp_path))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path} holds checkpoints of an earlier run (checkpoint-500): pass --resume_from_checkpoint auto "
        "to continue it, --overwrite_output_dir True to delete them, or another --output_dir")
    with pytest.raises(UsageError, match="pass one of them"):
        sft_main(tmp_path, "--overwrite_output_dir", "True", "--resume_from_checkpoint", "auto")
    supervised_finetuning.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path), *SFT,
                                "--max_steps", "1", "--save_strategy", "no", "--overwrite_output_dir", "True"])
    assert not (tmp_path / "checkpoint-500").exists() and (tmp_path / "model.safetensors").exists()


def test_hub_token_never_reaches_the_output_dir_or_the_log(tiny_model_dir, tmp_path, monkeypatch, capfd):
    secret = "hf_NotARealToken0123456789"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    supervised_finetuning.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path), *SFT,
                                "--max_steps", "2", "--hub_token", secret, "--log_level", "info"])
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.name == "training_args.bin" for path in written)  # the pickle that used to hold it
    assert not [path for path in written if secret.encode() in path.read_bytes()]
    assert secret not in "".join(capfd.readouterr())
    assert os.environ["HF_TOKEN"] == secret  # still there for huggingface_hub's uploads

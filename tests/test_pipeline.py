"""The main job: evaluate_model.py's metrics on hand-made cases, the report, and the fast pipeline end to end."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from medicalgpt.evaluation import (
    copy_accuracy,
    mcq_loglik_accuracy,
    perplexity,
    preference_accuracy,
    reward_model_accuracy,
)
from medicalgpt.report import write_report
from medicalgpt.templates import get_template

REPO = Path(__file__).resolve().parents[1]


class Forced(torch.nn.Module):
    """A 'model' whose next-token logits are fixed: zero everywhere, plus `boost` on the favoured tokens."""

    def __init__(self, vocab_size: int, favoured: list[int] = (), boost: float = 10.0):
        super().__init__()
        self.logits = torch.zeros(vocab_size)
        self.logits[list(favoured)] = boost
        self.device = torch.device("cpu")

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1).clone())


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    blocks = [[1, 2, 3, 4, 5], [6, 7, 8]]  # different lengths: padding must not count
    assert perplexity(Forced(50), blocks, batch_size=2) == pytest.approx(50, rel=1e-5)


class Copier(torch.nn.Module):
    """A 'model' that predicts, for a string shown twice, the token one string-length back; only for short strings."""

    def __init__(self, vocab_size: int, up_to: int):
        super().__init__()
        self.vocab_size, self.up_to, self.device = vocab_size, up_to, torch.device("cpu")

    def forward(self, input_ids, **kwargs):
        length = input_ids.shape[1] // 2
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        if length <= self.up_to:
            # Position t of the repeat predicts token t + 1, the one at t + 1 - length in the first copy.
            logits[:, length:-1].scatter_(-1, input_ids[:, 1:length].unsqueeze(-1), 1.0)
        return SimpleNamespace(logits=logits)


def test_copy_accuracy_counts_the_repeated_tokens_predicted():
    token_ids = list(range(10, 40))  # never 0, which an all-zero row of logits predicts
    assert copy_accuracy(Copier(50, up_to=48), token_ids) == 1.0
    assert copy_accuracy(Copier(50, up_to=8), token_ids) == 7 / (7 + 23 + 47)  # only the 8-token strings' repeats
    assert copy_accuracy(Forced(50), token_ids) == 0.0


def test_mcq_picks_the_option_the_model_prefers(tokenizer):
    options = {"A": "Metformin", "B": "阿莫西林", "C": "Insulin", "D": "布洛芬"}
    favoured = tokenizer("阿莫西林", add_special_tokens=False)["input_ids"]
    model = Forced(len(tokenizer), favoured)
    records = [{"question": "Which drug?", "options": options, "answer": "B"},
               {"question": "Which drug again?", "options": options, "answer": "C"}]
    assert mcq_loglik_accuracy(model, tokenizer, get_template("chatml"), records) == 0.5


def test_preference_and_reward_model_accuracy_follow_the_scores(tokenizer):
    good, bad = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("秋水仙碱", "阿莫西林"))
    pairs = Dataset.from_list([{"prompt_ids": [1, 2], "chosen_ids": good, "rejected_ids": bad},
                               {"prompt_ids": [1, 3], "chosen_ids": bad, "rejected_ids": good}])
    result = preference_accuracy(Forced(len(tokenizer), good), pairs)
    assert result["accuracy"] == 0.5 and result["margin"] == pytest.approx(0.0, abs=1e-4)

    class LengthReward(torch.nn.Module):  # rewards the longer sequence (ignoring padding)
        device = torch.device("cpu")

        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(logits=attention_mask.sum(1, keepdim=True).float())

    longer = Dataset.from_list([{"prompt_ids": [1], "chosen_ids": [4, 5, 6], "rejected_ids": [7]}])
    assert reward_model_accuracy(LengthReward(), longer, pad_token_id=0) == {"accuracy": 1.0, "margin": 2.0}


def test_per_token_preference_does_not_penalise_a_longer_answer():
    """Chosen: three likely tokens and one unlikely; rejected: the unlikely one alone. Per token the chosen answer
    is far more likely; summed, its extra tokens make it less likely."""
    pairs = Dataset.from_list([{"prompt_ids": [1, 2], "chosen_ids": [5, 6, 5, 9], "rejected_ids": [9]}])
    model = Forced(50, [5, 6])
    result = preference_accuracy(model, pairs)
    assert result["accuracy"] == 1.0
    assert result["summed_accuracy"] == 0.0


def test_implicit_reward_is_the_log_prob_gain_over_the_reference(tokenizer):
    good, bad = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("秋水仙碱", "阿莫西林"))
    pairs = Dataset.from_list([{"prompt_ids": [1, 2], "chosen_ids": good, "rejected_ids": bad}])
    policy = Forced(len(tokenizer), good)
    assert preference_accuracy(policy, pairs, reference=Forced(len(tokenizer)))["accuracy"] == 1.0
    unchanged = preference_accuracy(policy, pairs, reference=Forced(len(tokenizer), good))  # no gain: no preference
    assert unchanged["accuracy"] == 0.0 and unchanged["margin"] == pytest.approx(0.0, abs=1e-4)


def test_report_adds_reward_trends_and_draws_every_stage(tmp_path):
    rows = [{"name": "sft", "metrics": {"mcq_accuracy": 0.5}, "samples": []},
            {"name": "ppo", "metrics": {}, "samples": []}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "ppo").mkdir()
    (tmp_path / "ppo" / "ppo_log.jsonl").write_text(
        "".join(json.dumps({"step": s, "reward": float(s), "kl": s / 10}) + "\n" for s in range(1, 11)))
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "trainer_state.json").write_text(json.dumps({"log_history": [
        {"step": 5, "loss": 2.0}, {"step": 10, "loss": 1.0}, {"step": 10, "eval_loss": 1.5}]}))
    table = write_report(tmp_path)
    ppo = json.loads((tmp_path / "results.json").read_text())[1]["metrics"]
    assert (ppo["reward_start"], ppo["reward_end"]) == (3.0, 8.0)  # means of steps 1-5 and 6-10
    assert ppo["kl_end"] == pytest.approx(0.8)  # the KL to the reference over the last five
    assert "| ppo |" in table and (tmp_path / "results.md").read_text().strip() == table
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_fast_pipeline_runs_every_stage_end_to_end(tmp_path):
    # The script runs `python`: the interpreter running the tests (the venv's), whatever PATH says.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "OUT": str(tmp_path / "run"), "FAST": "1", "PIPELINE_THREADS": "1", "PATH": path}
    subprocess.run(["bash", str(REPO / "run_full_pipeline.sh")], check=True, env=env, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1200)
    out = tmp_path / "run"
    rows = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in rows] == ["base", "pt", "sft", "sft_no_pt", "student", "distill", "student_sft", "rm",
                                         "ppo", "dpo", "orpo", "grpo_warmup", "grpo", "rag", "tools_before", "tools"]
    metrics = {r["name"]: r["metrics"] for r in rows}
    assert {"perplexity", "mcq_accuracy"} <= set(metrics["pt"]) and "rm_accuracy" in metrics["rm"]
    assert {"reward_start", "reward_end", "kl_end"} <= set(metrics["ppo"]) and "answer_accuracy" in metrics["grpo"]
    held_out_reward = {"heldout_reward", "reference_reward", "answer_tokens"}  # PPO's start (SFT) and end
    assert held_out_reward <= set(metrics["rm"]) and held_out_reward | {"answer_accuracy"} <= set(metrics["ppo"])
    preference = {"preference_accuracy", "preference_accuracy_summed", "implicit_reward_accuracy"}
    assert preference <= set(metrics["dpo"]) & set(metrics["orpo"])
    students = ("student", "distill", "student_sft")
    assert all({"teacher_kl", "answer_accuracy"} <= set(metrics[name]) for name in students)
    assert metrics["rag"]["rag_recall@3"] == 1.0 and {"answer_accuracy_rag", "answer_accuracy_no_rag"} <= set(
        metrics["rag"])
    tool_metrics = {"tool_call_accuracy", "tool_choice_accuracy", "copy_accuracy"}
    assert all(tool_metrics <= set(metrics[name]) for name in ("tools_before", "tools"))
    assert all(not math.isnan(v) for m in metrics.values() for v in m.values())
    for artefact in ("pt/model.safetensors", "sft-merged/model.safetensors", "rm/adapter_model.safetensors",
                     "ppo/adapter_model.safetensors", "dpo-merged/model.safetensors", "orpo/adapter_model.safetensors",
                     "grpo/adapter_model.safetensors", "distill/model.safetensors", "curves.png", "results.md"):
        assert (out / artefact).exists(), artefact
    assert len((out / "answers.jsonl").read_text().splitlines()) == 150
    assert len((out / "tool_answers.jsonl").read_text().splitlines()) == 40

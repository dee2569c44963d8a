"""PPO: the math against hand-computed values, and short runs that learn, resume exactly and refuse mix-ups."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

import ppo_training
from medicalgpt import ppo
from medicalgpt.errors import UsageError
from medicalgpt.plotting import metric_series, plot_metrics

# --- math on fixed tensors -------------------------------------------------------------------------------------------


def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[0.0, 0.5, 1.0, 9.0]])
    values = torch.tensor([[0.2, 0.4, 0.6, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last position is past the response end
    gamma, lam = 0.9, 0.8
    # Backwards by hand: delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}; V after end = 0.
    delta2 = 1.0 + 0.9 * 0.0 - 0.6
    delta1 = 0.5 + 0.9 * 0.6 - 0.4
    delta0 = 0.0 + 0.9 * 0.4 - 0.2
    a2 = delta2
    a1 = delta1 + 0.72 * a2
    a0 = delta0 + 0.72 * a1
    advantages, returns = ppo.compute_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, torch.tensor([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[a0 + 0.2, a1 + 0.4, a2 + 0.6, 0.0]]))


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    advantages = torch.tensor([[1.0, 1.0, -2.0]])
    mask = torch.ones(1, 3)
    loss, clipfrac = ppo.policy_loss(new, old, advantages, mask, cliprange=0.2)
    # per token: max(-A*r, -A*clip(r)): A=1,r=1.5 -> max(-1.5,-1.2) = -1.2 (clipped); A=1,r=0.5 -> max(-0.5,-0.8)
    # = -0.5; A=-2,r=1.1 -> max(2.2, 2.2) = 2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)


def test_clipped_value_loss_by_hand():
    values, old_values = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]])
    returns, mask = torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    # token 0: unclipped (1-2)^2 = 1; clipped 0.5+0.2 = 0.7 -> (0.7-2)^2 = 1.69; max = 1.69; token 1 masked out
    assert ppo.value_loss(values, old_values, returns, mask, 0.2).item() == pytest.approx(0.5 * 1.69)


def test_rewards_put_the_score_on_the_last_response_token():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    logprobs, ref = torch.tensor([[-1.0, -1.0, -5.0], [-1.0] * 3]), torch.tensor([[-1.5, -1.0, 0.0], [-1.0] * 3])
    rewards, kl = ppo.per_token_rewards(torch.tensor([2.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 2.0, 0.0], [0.0, 0.0, -1.0]]))
    torch.testing.assert_close(kl.sum(1), torch.tensor([0.5, 0.0]))


def test_adaptive_kl_moves_towards_the_target():
    control = ppo.AdaptiveKLController(0.1, target=6.0, horizon=100)
    control.update(current_kl=12.0, n_rollouts=10)  # error clipped to +0.2
    assert control.value == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    control.update(current_kl=0.0, n_rollouts=10)
    assert control.value < 0.1 * 1.02


def test_logging_and_save_steps_read_as_the_trainers_read_them():
    """Declared by TrainingArguments, so a value below 1 is a share of the run, as in every other stage."""
    args = ppo.PPOArguments(output_dir="out", max_steps=40, logging_steps=0.1, save_steps=50)
    assert (args.every(args.logging_steps), args.every(args.save_steps)) == (4, 50)
    assert ppo.PPOArguments.__dataclass_fields__["learning_rate"].metadata == \
        TrainingArguments.__dataclass_fields__["learning_rate"].metadata


# --- runs on the tiny model ------------------------------------------------------------------------------------------

def han_share(completions, **kwargs) -> list[float]:
    """Toy reward the tiny model can learn fast: the share of Chinese characters in the answer."""
    texts = [c[0]["content"] for c in completions]
    return [sum("\u4e00" <= ch <= "\u9fff" for ch in t) / max(len(t), 1) for t in texts]


def run_ppo(model_dir: str, output_dir, *flags: str) -> dict:
    return ppo_training.main(["--model_name_or_path", model_dir, "--train_file_dir", "data/sft/validation",
                     "--output_dir", str(output_dir), "--reward_funcs", "tests.test_ppo:han_share",
                     "--batch_size", "8", "--mini_batch_size", "4", "--max_new_tokens", "8",
                     "--missing_eos_penalty", "0", "--report_to", "none", *flags])


def test_score_adds_every_reward_part_and_logs_each():
    batch = {"texts": ["你好", "hello"], "ended": torch.tensor([True, False])}
    references = [{"prompt": "p", "answer": "a"}] * 2
    scores, parts = ppo.score(batch, None, [han_share, han_share], references, ppo.PPOArguments(), pad_id=0)
    assert scores.tolist() == pytest.approx([2.0, -1.0])  # 2 x the Han share, minus the missing-EOS penalty
    assert parts == {"score/han_share": 0.5, "score/han_share_1": 0.5, "score/missing_eos_penalty": -0.5}


def test_ppo_raises_the_reward_on_a_learnable_task(tiny_model_dir, tmp_path, monkeypatch):
    plotted = []
    monkeypatch.setattr(ppo, "plot_metrics", lambda history, path, metrics, title: plotted.append(
        metric_series(history, metrics)) or plot_metrics(history, path, metrics, title))
    history = run_ppo(tiny_model_dir, tmp_path, "--use_peft", "False", "--learning_rate", "3e-3",
                      "--max_steps", "24", "--kl_coef", "0.01")["history"]
    rewards = [h["reward"] for h in history]
    assert sum(rewards[-4:]) / 4 > 1.3 * sum(rewards[:4]) / 4
    assert {"kl", "entropy", "clipfrac", "value_loss", "approx_kl", "score/han_share"} <= set(history[-1])
    assert (tmp_path / "loss.png").exists() and (tmp_path / "model.safetensors").exists()
    # loss.png shows PPO's own metrics under their names (not the reward as an "eval loss")
    assert list(plotted[-1]) == ["reward", "policy_loss", "value_loss", "kl"]
    assert [r for _, r in plotted[-1]["reward"]["train"]] == rewards and not plotted[-1]["reward"]["eval"]


def test_resumed_run_equals_an_uninterrupted_one(tiny_model_dir, tmp_path):
    flags = ["--learning_rate", "1e-3", "--save_steps", "2", "--lora_rank", "4"]
    run_ppo(tiny_model_dir, tmp_path / "straight", *flags, "--max_steps", "4")
    run_ppo(tiny_model_dir, tmp_path / "resumed", *flags, "--max_steps", "2")
    run_ppo(tiny_model_dir, tmp_path / "resumed", *flags, "--max_steps", "4", "--resume_from_checkpoint", "auto")
    straight = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=1e-6, rtol=0)
    logs = [json.loads(line) for line in (tmp_path / "resumed" / "ppo_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4]


def test_refuses_another_runs_checkpoints_and_needs_a_reward(tiny_model_dir, tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(UsageError, match="holds checkpoints of an earlier run"):
        run_ppo(tiny_model_dir, tmp_path, "--max_steps", "1")
    with pytest.raises(UsageError, match=r"incomplete checkpoint \(no policy, value_head.pt, optimizer.pt"):
        run_ppo(tiny_model_dir, tmp_path, "--max_steps", "1",
                "--resume_from_checkpoint", str(tmp_path / "checkpoint-3"))
    with pytest.raises(UsageError, match="no such checkpoint directory"):
        run_ppo(tiny_model_dir, tmp_path, "--max_steps", "1", "--resume_from_checkpoint", str(tmp_path / "nowhere"))
    with pytest.raises(UsageError, match="PPO needs a reward"):
        ppo_training.main(["--model_name_or_path", tiny_model_dir, "--train_file_dir", "data/sft/validation"])


def test_critic_from_the_reward_model(tiny_model_dir, tmp_path):
    import reward_modeling

    reward_modeling.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "rm"),
                          "--train_file_dir", "data/preference/validation", "--max_steps", "2", "--report_to", "none",
                          "--save_strategy", "no", "--disable_tqdm", "True", "--per_device_train_batch_size", "4"])
    history = ppo_training.main(["--model_name_or_path", tiny_model_dir, "--reward_model", str(tmp_path / "rm"),
                        "--value_model", "critic", "--train_file_dir", "data/sft/validation",
                        "--output_dir", str(tmp_path / "ppo"), "--batch_size", "4", "--mini_batch_size", "2",
                        "--max_new_tokens", "6", "--max_steps", "2", "--report_to", "none"])["history"]
    assert len(history) == 2 and all(abs(h["reward"]) < 10 for h in history)
    for entry in history:  # the logged parts of the reward add up to it (nothing clipped here)
        parts = [entry["score/reward_model"], entry["score/missing_eos_penalty"]]
        assert sum(parts) == pytest.approx(entry["reward"], abs=1e-5)
    assert (tmp_path / "ppo" / "checkpoint-2" / "critic" / "adapter_model.safetensors").exists()


def test_ppo_reads_the_reward_where_training_and_evaluation_read_it(tiny_model_dir, tokenizer):
    """The reward model learns and is evaluated on right-padded prompt + answer + end-of-turn token; PPO scores
    left-padded rollouts whose tokens after the stop are masked. All must read the score at the end-of-turn token."""
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from medicalgpt.evaluation import reward_scores
    from medicalgpt.generation import left_padded

    reward_model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=1, pad_token_id=tokenizer.pad_token_id).eval()
    end, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id
    prompts, answers = [[5, 6, 7], [8, 9]], [[10, 11, end], [12, end]]
    sampled_after_stop = [[], [13]]  # generation runs on in the batch after a row's stop token
    padded = left_padded(prompts, pad, "cpu")
    responses = torch.tensor([a + s for a, s in zip(answers, sampled_after_stop, strict=True)])
    response_mask = torch.tensor([[1.0] * len(a) + [0.0] * len(s) for a, s in zip(answers, sampled_after_stop,
                                                                                    strict=True)])
    attention_mask = torch.cat([padded["attention_mask"].float(), response_mask], dim=1)
    batch = {"input_ids": torch.cat([padded["input_ids"], responses], dim=1), "attention_mask": attention_mask,
             "position_ids": ppo.position_ids(attention_mask), "texts": ["", ""], "ended": torch.tensor([True, True])}
    references, args = [{"prompt": "", "answer": ""}] * 2, ppo.PPOArguments(missing_eos_penalty=0)
    sequences = [p + a for p, a in zip(prompts, answers, strict=True)]
    training_batch = DataCollatorForPreference(pad)([{"chosen_ids": sequences[0], "rejected_ids": sequences[1]}])
    with torch.no_grad():
        in_ppo, _ = ppo.score(batch, reward_model, [], references, args, pad)
        in_training = reward_model(**training_batch).logits[:, 0]
    as_evaluated = reward_scores(reward_model, sequences, pad)
    torch.testing.assert_close(in_ppo, as_evaluated, atol=1e-5, rtol=0)
    torch.testing.assert_close(in_training, as_evaluated, atol=1e-5, rtol=0)
    without_end = reward_scores(reward_model, [p + a[:-1] for p, a in zip(prompts, answers, strict=True)], pad)
    assert not torch.allclose(as_evaluated, without_end, atol=1e-3)  # the position matters: the test can fail

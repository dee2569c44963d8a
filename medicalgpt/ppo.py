"""The PPO loop's parts for ppo_training.py: its flags, the math on [batch, response_length] tensors, the
actor-critic, rollouts and scoring, checkpoints and the run log. TRL removed its PPOTrainer in 1.13, so this is
our own."""

import copy
import json
import logging
import math
import os
import random
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from medicalgpt.args import trainer_field
from medicalgpt.errors import UsageError
from medicalgpt.generation import left_padded
from medicalgpt.modeling import (
    apply_lora,
    load_model,
    set_stop_tokens,
)
from medicalgpt.plotting import plot_metrics
from medicalgpt.rewards import reward_funcs_field

logger = logging.getLogger("medicalgpt.ppo")


@dataclass
class PPOArguments:
    """PPO's own flags. What it shares with the trainer stages (--output_dir, --learning_rate, --seed, ...) is
    declared once, by TrainingArguments (trainer_field); the stage's values are in configs/ppo.yaml."""
    output_dir: str | None = trainer_field("output_dir")
    reward_model: str | None = field(default=None, metadata={
        "help": "Reward model from reward_modeling.py: a merged directory or a LoRA adapter directory."})
    reward_funcs: str | None = reward_funcs_field(None, "added to the reward model's score")
    value_model: str = field(default="head", metadata={
        "help": "head: a value head on the policy's backbone; critic: a separate model initialised from the "
                "reward model.", "choices": ["head", "critic"]})
    learning_rate: float = trainer_field("learning_rate")
    # Not the trainers' max_steps: PPO has no epochs, and a PPO step is a rollout batch with its updates.
    max_steps: int = field(default=100, metadata={"help": "PPO steps (each: one rollout batch, ppo_epochs updates)."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per rollout batch."})
    mini_batch_size: int = field(default=4, metadata={"help": "Rollouts per PPO gradient computation."})
    ppo_epochs: int = field(default=2, metadata={"help": "Passes over each rollout batch."})
    gradient_accumulation_steps: int = trainer_field("gradient_accumulation_steps")
    max_prompt_length: int = field(default=512, metadata={"help": "Prompts longer than this (tokens) are skipped."})
    max_new_tokens: int = field(default=64)
    temperature: float = field(default=1.0)
    top_p: float = field(default=1.0)
    kl_coef: float = field(default=0.05, metadata={"help": "Weight of the per-token KL penalty against the reference."})
    adaptive_kl: bool = field(default=False, metadata={"help": "Adapt kl_coef towards --target_kl."})
    target_kl: float = field(default=6.0, metadata={"help": "Target sequence KL for --adaptive_kl."})
    kl_horizon: int = field(default=10000, metadata={"help": "Horizon (in rollouts) of the adaptive KL controller."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip range."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value prediction clip range."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Normalise scores across the rollout batch."})
    reward_clip: float = field(default=10.0, metadata={"help": "Clip scores to [-reward_clip, reward_clip]."})
    missing_eos_penalty: float = field(default=1.0, metadata={
        "help": "Subtracted from the score of a response that ends without an end-of-turn token."})
    activation_checkpointing: bool | None = trainer_field("activation_checkpointing")
    seed: int = trainer_field("seed")
    logging_steps: float = trainer_field("logging_steps")
    save_steps: float = trainer_field("save_steps")
    resume_from_checkpoint: str | None = trainer_field("resume_from_checkpoint")
    # Narrower than the trainers' report_to: the loop writes TensorBoard itself.
    report_to: str = field(default="tensorboard", metadata={"choices": ["tensorboard", "none"]})

    def every(self, steps: float) -> int:
        """--logging_steps / --save_steps in PPO steps: as the trainers read them, a value below 1 is a share of
        --max_steps."""
        return max(1, math.ceil(steps * self.max_steps)) if steps < 1 else int(steps)


# --- PPO math: every function works on [batch, response_length] tensors with a 0/1 mask ----------------------------

def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to unit variance (and zero mean) over the masked entries."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation; positions past the response end (mask 0) bootstrap to zero."""
    advantages = torch.zeros_like(rewards)
    next_value, next_advantage = torch.zeros_like(rewards[:, 0]), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t] * mask[:, t]
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate objective (to minimise) and the fraction of clipped tokens."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    return masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> torch.Tensor:
    """Clipped value loss: a prediction may not move further than cliprange_value from the rollout's."""
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def per_token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                      mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-kl_coef·KL on every response token, plus the sequence score on its last token; and the per-token KL."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = mask.sum(1).long().clamp(min=1) - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


class AdaptiveKLController:
    """Proportional control of kl_coef towards a target KL (Ziegler et al., 2019)."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, n_rollouts: int) -> None:
        error = float(np.clip(current_kl / self.target - 1, -0.2, 0.2))
        self.value *= 1 + error * n_rollouts / self.horizon


# --- models ---------------------------------------------------------------------------------------------------------

class ValueHead(nn.Module):
    """A scalar value per token from the last hidden state."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)  # values start at 0: early advantages are the raw rewards
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden_states.float()).squeeze(-1)


class ActorCritic(nn.Module):
    """The policy, and a value model: a head on the policy's own backbone, or a separate critic backbone."""

    def __init__(self, policy: nn.Module, value_head: ValueHead, critic: nn.Module | None = None):
        super().__init__()
        self.policy, self.value_head, self.critic = policy, value_head, critic

    def forward(self, input_ids, attention_mask, position_ids) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        out = self.policy(**inputs, output_hidden_states=self.critic is None)
        hidden = out.hidden_states[-1] if self.critic is None else self.critic(**inputs).last_hidden_state
        return out.logits, self.value_head(hidden)


def build_actor_critic(model_args, lora_args, ppo_args, reward_model, tokenizer, stop_words,
                       resume: str | None) -> ActorCritic:
    """Policy (continuing the checkpoint's weights when resuming), value head and optional critic."""
    if resume:  # the policy continues from the checkpoint: its adapter, or its full weights
        lora_args = replace(lora_args, peft_path=f"{resume}/policy" if lora_args.use_peft else None)
        if not lora_args.use_peft:
            model_args = replace(model_args, model_name_or_path=f"{resume}/policy")
    policy = apply_lora(load_model(model_args), lora_args, ppo_args)
    if ppo_args.activation_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    set_stop_tokens(policy, tokenizer, stop_words)
    value_head = ValueHead(policy.config.hidden_size)
    critic = None
    if ppo_args.value_model == "critic":
        if reward_model is None:
            raise UsageError("--value_model critic is initialised from the reward model: pass --reward_model")
        critic_lora = replace(lora_args, peft_path=f"{resume}/critic" if resume and lora_args.use_peft else None)
        critic = copy.deepcopy(reward_model.base_model).requires_grad_(True)
        if resume and not lora_args.use_peft:
            critic.load_state_dict(load_file(f"{resume}/critic/model.safetensors"))
        critic = apply_lora(critic, critic_lora, ppo_args, task_type="FEATURE_EXTRACTION")
        value_head = ValueHead(critic.config.hidden_size)
        value_head.summary.weight.data.copy_(reward_model.score.weight.float())  # start from the RM's scores
    return ActorCritic(policy, value_head, critic)


# --- rollouts and scores ---------------------------------------------------------------------------------------------

def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, so left padding changes nothing."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def rollout(actor: ActorCritic, tokenizer, prompts: list[list[int]], args: PPOArguments) -> dict:
    """Sample one response per prompt; the response mask ends with (and includes) the first stop token."""
    padded = left_padded(prompts, tokenizer.pad_token_id, actor.policy.device)
    prompt_ids, prompt_mask = padded["input_ids"], padded["attention_mask"]
    output = actor.policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, top_k=0,
                                   temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                                   pad_token_id=tokenizer.pad_token_id)
    responses = output[:, prompt_ids.shape[1]:]
    stop_ids = torch.tensor(actor.policy.generation_config.eos_token_id)
    is_stop = torch.isin(responses, stop_ids)
    response_mask = ((is_stop.long().cumsum(1) - is_stop.long()) == 0).float()  # up to the first stop token
    attention_mask = torch.cat([prompt_mask.float(), response_mask], dim=1)
    return {"input_ids": output, "attention_mask": attention_mask, "position_ids": position_ids(attention_mask),
            "prompt_length": prompt_ids.shape[1], "responses": responses, "response_mask": response_mask,
            "ended": is_stop.any(1), "texts": [tokenizer.decode(r[m.bool()], skip_special_tokens=True)
                                               for r, m in zip(responses, response_mask, strict=True)]}


@torch.no_grad()
def score(batch: dict, reward_model, reward_fns: list, references: list[dict], args: PPOArguments,
          pad_id: int) -> tuple[torch.Tensor, dict]:
    """Reward model score + reward functions (given the prompts and reference answers, as in GRPO), minus the
    missing-EOS penalty, clipped; and each part's batch mean, for the log."""
    parts = {}
    if reward_model is not None:
        ids = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, pad_id)  # RM reads the last non-pad
        parts["reward_model"] = reward_model(input_ids=ids, attention_mask=batch["attention_mask"].long(),
                                             position_ids=batch["position_ids"]).logits[:, 0].float()
    completions = [[{"role": "assistant", "content": text}] for text in batch["texts"]]
    columns = {"prompts": [r["prompt"] for r in references], "answer": [r["answer"] for r in references]}
    for index, fn in enumerate(reward_fns):
        name = getattr(fn, "__name__", f"reward_function_{index}")
        name = f"{name}_{index}" if name in parts else name  # the same function twice counts twice
        parts[name] = torch.tensor([0.0 if r is None else r for r in fn(completions=completions, **columns)])
    parts["missing_eos_penalty"] = -args.missing_eos_penalty * (~batch["ended"]).float()
    scores = torch.stack(list(parts.values())).sum(0).clamp(-args.reward_clip, args.reward_clip)
    return scores, {f"score/{name}": part.mean().item() for name, part in parts.items()}


def response_logprobs(logits: torch.Tensor, batch: dict, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the sampled response tokens (at the sampling temperature), and the entropy."""
    start = batch["prompt_length"] - 1
    logits = logits[:, start:-1].float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    token_logp = logp.gather(-1, batch["responses"].unsqueeze(-1)).squeeze(-1)
    return token_logp, -(logp.exp() * logp).sum(-1)


def evaluate_rollout(actor: ActorCritic, ref_model, batch: dict, temperature: float) -> dict:
    """Rollout-time log-probs, reference log-probs and values (no gradients)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        logits, values = actor(**inputs)
        logprobs, _ = response_logprobs(logits, batch, temperature)
        if ref_model is None:  # LoRA: the reference is the policy without its adapter
            with actor.policy.disable_adapter():
                ref_logits = actor.policy(**inputs, use_cache=False).logits
        else:
            ref_logits = ref_model(**inputs, use_cache=False).logits
        ref_logprobs, _ = response_logprobs(ref_logits, batch, temperature)
    start = batch["prompt_length"] - 1
    return {"logprobs": logprobs, "ref_logprobs": ref_logprobs, "values": values[:, start:-1].float()}


# --- the PPO update -------------------------------------------------------------------------------------------------

def ppo_update(actor: ActorCritic, optimizer, batch: dict, old: dict, advantages: torch.Tensor,
               returns: torch.Tensor, args: PPOArguments) -> dict:
    """ppo_epochs passes of clipped policy + value updates over shuffled mini-batches."""
    mask, stats, micro = batch["response_mask"], [], 0
    for _ in range(args.ppo_epochs):
        for idx in torch.randperm(len(mask)).split(args.mini_batch_size):
            mini = {**{k: batch[k][idx] for k in ("input_ids", "attention_mask", "position_ids", "responses")},
                    "prompt_length": batch["prompt_length"]}
            logits, values = actor(mini["input_ids"], mini["attention_mask"], mini["position_ids"])
            logprobs, entropy = response_logprobs(logits, mini, args.temperature)
            values = values[:, batch["prompt_length"] - 1:-1]
            pg, clipfrac = policy_loss(logprobs, old["logprobs"][idx], advantages[idx], mask[idx], args.cliprange)
            vf = value_loss(values, old["values"][idx], returns[idx], mask[idx], args.cliprange_value)
            ((pg + args.vf_coef * vf) / args.gradient_accumulation_steps).backward()
            micro += 1
            if micro % args.gradient_accumulation_steps == 0:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
                optimizer.step()
                optimizer.zero_grad()
            approx_kl = 0.5 * masked_mean((logprobs - old["logprobs"][idx]) ** 2, mask[idx])
            stats.append([pg.item(), vf.item(), clipfrac.item(), approx_kl.item(), masked_mean(entropy, mask[idx])
                          .item()])
    if micro % args.gradient_accumulation_steps:  # a last, partial accumulation
        optimizer.step()
        optimizer.zero_grad()
    pg, vf, clipfrac, approx_kl, entropy = np.mean(stats, axis=0)
    return {"policy_loss": pg, "value_loss": vf, "clipfrac": clipfrac, "approx_kl": approx_kl, "entropy": entropy}


# --- data, checkpoints, logs ----------------------------------------------------------------------------------------

def encode_prompts(records, tokenizer, template, max_prompt_length: int) -> tuple[list[list[int]], list[dict]]:
    """Every prompt as token ids, with its messages and reference answer for reward functions.

    Over-long prompts are dropped.
    """
    ids, references = [], []
    for record in records:
        tools = json.loads(record["tools"]) if record["tools"] else None
        for prompt, answer in zip(record["prompts"], record["answers"], strict=True):
            encoded = template.encode_prompt(tokenizer, prompt, tools)
            if len(encoded) <= max_prompt_length:
                ids.append(encoded)
                references.append({"prompt": prompt, "answer": answer})
    dropped = sum(len(r["prompts"]) for r in records) - len(ids)
    if dropped:
        logger.warning("Dropped %d prompts longer than --max_prompt_length %d tokens", dropped, max_prompt_length)
    if not ids:
        raise UsageError(f"no prompt fits in --max_prompt_length {max_prompt_length} tokens")
    return ids, references


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The prompts of a step: a seeded shuffle per pass over the data, so a resumed run sees the same order."""
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n)
        indices.append(random.Random(seed + epoch).sample(range(n), n)[offset])
    return indices


CHECKPOINT_FILES = ("policy", "value_head.pt", "optimizer.pt", "rng.pt", "state.json")  # what a resume reads


def missing_checkpoint_files(path: str | Path) -> list[str]:
    return [name for name in CHECKPOINT_FILES if not (Path(path) / name).exists()]


def save_checkpoint(path: Path, actor: ActorCritic, optimizer, tokenizer, state: dict) -> None:
    """Everything a resumed run needs, written to a temporary directory first so a crash leaves no half checkpoint."""
    staging = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)  # left by a run that died while saving
    actor.policy.save_pretrained(staging / "policy")
    tokenizer.save_pretrained(staging / "policy")
    if actor.critic is not None:
        actor.critic.save_pretrained(staging / "critic")
    torch.save(actor.value_head.state_dict(), staging / "value_head.pt")
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
               staging / "rng.pt")
    (staging / "state.json").write_text(json.dumps(state))
    shutil.rmtree(path, ignore_errors=True)  # the same step again, after resuming from an earlier checkpoint
    os.replace(staging, path)


def restore_checkpoint(path: str, actor: ActorCritic, optimizer) -> dict:
    actor.value_head.load_state_dict(torch.load(Path(path) / "value_head.pt"))
    optimizer.load_state_dict(torch.load(Path(path) / "optimizer.pt"))
    rng = torch.load(Path(path) / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    return json.loads((Path(path) / "state.json").read_text())


class RunLog:
    """Per-step metrics to the console, ppo_log.jsonl, TensorBoard and the curves in loss.png."""

    def __init__(self, output_dir: str, report_to: str, history: list[dict]):
        self.output_dir, self.history = Path(output_dir), history
        self.writer = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.output_dir / "runs")

    def log(self, step: int, metrics: dict) -> None:
        self.history.append({"step": step, **metrics})
        with (self.output_dir / "ppo_log.jsonl").open("a") as f:
            f.write(json.dumps(self.history[-1]) + "\n")
        if self.writer:
            for key, value in metrics.items():
                self.writer.add_scalar(f"ppo/{key}", value, step)
        logger.info("step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def plot(self) -> None:
        plot_metrics(self.history, self.output_dir / "loss.png", ("reward", "policy_loss", "value_loss", "kl"),
                     title=self.output_dir.name)


# --- the loop -------------------------------------------------------------------------------------------------------

def ppo_step(actor, ref_model, optimizer, kl_control, batch: dict, scores: torch.Tensor, args: PPOArguments) -> dict:
    """One PPO step on a scored rollout batch: rewards -> advantages -> updates; returns the step's metrics."""
    old = evaluate_rollout(actor, ref_model, batch, args.temperature)
    mask = batch["response_mask"]
    shaped = whiten(scores, torch.ones_like(scores)) if args.whiten_rewards else scores
    rewards, kl = per_token_rewards(shaped, old["logprobs"], old["ref_logprobs"], mask, kl_control.value)
    advantages, returns = compute_gae(rewards, old["values"], mask, args.gamma, args.lam)
    advantages = whiten(advantages, mask) * mask
    stats = ppo_update(actor, optimizer, batch, old, advantages, returns, args)
    sequence_kl = kl.sum(1).mean().item()
    if args.adaptive_kl:
        kl_control.update(sequence_kl, len(scores))
    return {"reward": scores.mean().item(), "kl": sequence_kl, "kl_coef": kl_control.value,
            "response_length": mask.sum(1).mean().item(), **stats}

"""RLHF with PPO: our own loop, readable top to bottom (TRL removed its PPOTrainer in 1.13).

Each step: sample prompts -> generate responses with the policy -> score them (reward model and/or reward
functions) -> per-token rewards = -kl_coef·(log π - log π_ref) plus the score on the last token -> GAE
advantages and returns from the value model -> ppo_epochs of clipped policy and value updates over
mini-batches. The reference is the policy with its LoRA adapter disabled (or a frozen copy under full
fine-tuning); the value model is a value head on the policy's backbone (--value_model head) or a critic
initialised from the reward model (--value_model critic).

    python ppo_training.py --model_name_or_path outputs-sft-merged --reward_model outputs-rm-merged \
        --train_file_dir data/sft/train --output_dir outputs-ppo --max_steps 100
"""

import os
from pathlib import Path

import medicalgpt.quiet  # noqa: F401  (before the libraries: it filters what they print on import)

import torch
from tqdm.auto import tqdm
from transformers import set_seed

from medicalgpt.args import ChatDataArguments, LoraArguments, ModelArguments, parse_args
from medicalgpt.data import to_rl_prompts
from medicalgpt.errors import UsageError, run_cli
from medicalgpt.modeling import (
    check_model_args,
    load_model,
    load_reward_model,
)
from medicalgpt.ppo import (
    AdaptiveKLController,
    PPOArguments,
    RunLog,
    batch_indices,
    build_actor_critic,
    encode_prompts,
    missing_checkpoint_files,
    ppo_step,
    restore_checkpoint,
    rollout,
    save_checkpoint,
    score,
)
from medicalgpt.training import StopOnSignal, load_chat_inputs, resolve_resume_checkpoint, setup_logging


def main(argv: list[str] | None = None) -> dict:
    model_args, lora_args, data_args, args = parse_args(
        (ModelArguments, LoraArguments, ChatDataArguments, PPOArguments), argv,
        config=Path(__file__).with_name("configs") / "ppo.yaml")
    check_model_args(model_args, lora_args)
    if not (args.reward_model or args.reward_funcs):
        raise UsageError("PPO needs a reward: pass --reward_model (from reward_modeling.py) and/or --reward_funcs")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # our loop has no DDP: each rank would train alone on all data
        raise UsageError("ppo_training.py runs in one process: start it with python, not torchrun/accelerate launch")
    setup_logging()
    resume = resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir,
                                       missing_parts=missing_checkpoint_files)
    set_seed(args.seed)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)

    records, tokenizer, template = load_chat_inputs(model_args, data_args, args, to_rl_prompts)
    prompts, references = encode_prompts(records["train"], tokenizer, template, args.max_prompt_length)
    reward_model = load_reward_model(args.reward_model, model_args) if args.reward_model else None
    reward_fns = []
    if args.reward_funcs:
        from medicalgpt.rewards import load_reward_functions

        reward_fns = load_reward_functions(args.reward_funcs.split(","))
    actor = build_actor_critic(model_args, lora_args, args, reward_model, tokenizer, template.stop_words,
                               resume).eval()
    ref_model = None if lora_args.use_peft else load_model(model_args).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in actor.parameters() if p.requires_grad], lr=args.learning_rate)
    state = restore_checkpoint(resume, actor, optimizer) if resume else {"step": 0, "kl_coef": args.kl_coef,
                                                                         "history": []}
    kl_control = AdaptiveKLController(state["kl_coef"], args.target_kl, args.kl_horizon)
    run_log = RunLog(args.output_dir, args.report_to, state["history"])

    # Dropout stays off (eval mode) throughout, so rollout and update log-probs agree: the first ratio is exactly 1.
    with StopOnSignal() as stop:  # SIGINT/SIGTERM: save a checkpoint after this step and exit
        for step in tqdm(range(state["step"], args.max_steps), desc="PPO", initial=state["step"], total=args.max_steps):
            chosen = batch_indices(step, args.batch_size, len(prompts), args.seed)
            batch = rollout(actor, tokenizer, [prompts[i] for i in chosen], args)
            scores, score_parts = score(batch, reward_model, reward_fns, [references[i] for i in chosen], args,
                                        tokenizer.pad_token_id)
            metrics = {**ppo_step(actor, ref_model, optimizer, kl_control, batch, scores, args), **score_parts}
            if (step + 1) % args.every(args.logging_steps) == 0:
                run_log.log(step + 1, metrics)
            checkpoint = Path(args.output_dir) / f"checkpoint-{step + 1}"
            stopping = stop.requested() and step + 1 < args.max_steps
            if (step + 1) % args.every(args.save_steps) == 0 or step + 1 == args.max_steps or stopping:
                save_checkpoint(checkpoint, actor, optimizer, tokenizer,
                                {"step": step + 1, "kl_coef": kl_control.value, "history": run_log.history})
            if stopping:
                stop.exit(checkpoint)

    actor.policy.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    torch.save(actor.value_head.state_dict(), Path(args.output_dir) / "value_head.pt")
    run_log.plot()
    return {"history": run_log.history}


if __name__ == "__main__":
    run_cli(main)

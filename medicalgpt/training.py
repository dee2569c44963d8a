"""What every training stage does around its trainer: set-up, resume, train, evaluate, save, plot."""

import logging
import math
import os
import sys
from pathlib import Path

import torch
import transformers
from transformers import Trainer, TrainerCallback, set_seed
from transformers.trainer_utils import get_last_checkpoint

from medicalgpt.data import build_preference_splits, load_splits, to_preference
from medicalgpt.errors import UsageError
from medicalgpt.modeling import apply_lora, load_model, load_tokenizer, set_stop_tokens
from medicalgpt.plotting import plot_loss
from medicalgpt.templates import resolve_template

logger = logging.getLogger("medicalgpt")


def setup_logging(training_args) -> None:
    """One log format for our code and the libraries, at the trainer's log level."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], level=logging.INFO)
    logging.getLogger("medicalgpt").setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())


def resolve_resume_checkpoint(training_args) -> str | None:
    """--resume_from_checkpoint: a path, or 'auto' for the latest checkpoint in output_dir (None if there is none)."""
    resume = training_args.resume_from_checkpoint
    if resume is None:
        return None
    if resume == "auto":
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        logger.info("Resuming from %s", last or "scratch (no checkpoint in output_dir yet)")
        return last
    if not os.path.isdir(resume):
        raise UsageError(f"--resume_from_checkpoint {resume}: no such checkpoint directory")
    return resume


def prepare_run(training_args) -> str | None:
    """Logging and seeding; returns the checkpoint to resume from."""
    setup_logging(training_args)
    set_seed(training_args.seed)
    return resolve_resume_checkpoint(training_args)


def write_loss_plot(args, state) -> None:
    """loss.png in output_dir, from the trainer's log history (main process only)."""
    if state.is_world_process_zero:
        plot_loss(state.log_history, Path(args.output_dir) / "loss.png", title=Path(args.output_dir).name)


class LossPlotCallback(TrainerCallback):
    """Refreshes loss.png at every checkpoint, so a long run's curve can be watched."""

    def on_save(self, args, state, control, **kwargs):
        write_loss_plot(args, state)


def with_perplexity(metrics: dict, prefix: str) -> dict:
    """Add <prefix>_perplexity = exp(<prefix>_loss) (the loss is the mean token-level negative log-likelihood)."""
    loss = metrics.get(f"{prefix}_loss")
    if loss is not None:
        metrics[f"{prefix}_perplexity"] = math.exp(min(loss, 50.0))
    return metrics


def train_and_save(trainer: Trainer, resume_from_checkpoint: str | None, report_perplexity: bool = False) -> dict:
    """Train, save model/adapter + tokenizer, evaluate on validation, write metrics and loss.png.

    report_perplexity: the eval loss is a token-level NLL (PT, SFT), so exp(loss) is the perplexity.
    """
    trainer.add_callback(LossPlotCallback())
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model()
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    metrics = dict(result.metrics)
    if trainer.eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        if report_perplexity:
            eval_metrics = with_perplexity(eval_metrics, "eval")
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    write_loss_plot(trainer.args, trainer.state)
    return metrics


# Defaults every stage shares, over the trainers' own: fast on CPU, mixed precision on GPUs that have bf16,
# TensorBoard logs, and checkpoints that --resume_from_checkpoint auto can pick up.
STAGE_DEFAULTS = {
    "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    "gradient_checkpointing": None,  # TRL defaults it on; None leaves --activation_checkpointing (off) in charge
    "dataloader_pin_memory": torch.cuda.is_available(),
    "report_to": "tensorboard",
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 500,
    "save_total_limit": 3,
}


def load_chat_inputs(model_args, data_args, training_args, convert) -> tuple:
    """Records, tokenizer and chat template of a conversational stage.

    The records are read and validated first, so bad data fails before any model is loaded; the template is
    set on the tokenizer, so the saved tokenizer renders prompts exactly as training did.
    """
    records = load_splits(data_args, convert, training_args.seed)
    tokenizer = load_tokenizer(model_args)
    template = resolve_template(tokenizer, data_args.template_name)
    tokenizer.chat_template = template.jinja
    return records, tokenizer, template


def load_preference_inputs(model_args, lora_args, data_args, training_args, convert=to_preference,
                           build=build_preference_splits, model_class=None, task_type: str = "CAUSAL_LM") -> tuple:
    """Model (with LoRA), tokenizer and tokenised splits of a preference stage (RM, DPO, ORPO, CPO, KTO)."""
    records, tokenizer, template = load_chat_inputs(model_args, data_args, training_args, convert)
    with training_args.main_process_first(desc="dataset preparation"):
        splits = build(records, tokenizer, template, data_args.max_source_length, data_args.max_target_length,
                       data_args.preprocessing_num_workers)
    base = load_model(model_args, model_class, num_labels=1) if model_class else load_model(model_args)
    model = apply_lora(base, lora_args, training_args, task_type=task_type)
    if task_type == "CAUSAL_LM":
        set_stop_tokens(model, tokenizer, template.stop_words)
    return model, tokenizer, splits

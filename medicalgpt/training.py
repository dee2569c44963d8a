"""What every training stage does around its trainer: set-up, resume, train, evaluate, save, plot."""

import contextlib
import json
import logging
import math
import os
import platform
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import torch
import transformers
from datasets import DatasetDict, IterableDatasetDict
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, set_seed
from transformers.trainer_utils import IntervalStrategy, sort_checkpoints

from medicalgpt.data import LengthLimits, build_preference_splits, load_splits, to_preference
from medicalgpt.errors import UsageError
from medicalgpt.modeling import apply_lora, load_model, load_tokenizer, set_stop_tokens
from medicalgpt.plotting import plot_metrics
from medicalgpt.templates import resolve_template

logger = logging.getLogger("medicalgpt")


def setup_logging(main_process: bool = True, transformers_level: int = logging.WARNING) -> None:
    """One log format, on stdout, for our code and the libraries; replicas log only warnings."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], level=logging.INFO)
    logging.getLogger("medicalgpt").setLevel(logging.INFO if main_process else logging.WARNING)
    # transformers keeps its own stderr handler and propagates only when $CI is set, which printed every line twice.
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.set_verbosity(transformers_level)


# What Trainer._save_checkpoint writes, trainer_state.json last; LoRA, FSDP and DeepSpeed name the weights and the
# optimizer differently (adapter_model.*, pytorch_model_fsdp_*, optimizer_*, global_step*/).
CHECKPOINT_PARTS = {
    "weights": ("model*.safetensors", "adapter_model.*", "pytorch_model*", "global_step*"),
    "optimizer": ("optimizer*", "global_step*"),
    "scheduler": ("scheduler.pt", "global_step*"),
    "RNG state": ("rng_state*.pth",),
}


def missing_checkpoint_parts(path: str | Path) -> list[str]:
    """What a checkpoint directory lacks to resume from; [] when it is complete."""
    path = Path(path)
    missing = [part for part, patterns in CHECKPOINT_PARTS.items()
               if not any(next(path.glob(pattern), None) for pattern in patterns)]
    try:  # written last: if it parses, the process got past everything else
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        missing.append("trainer_state.json")
    return missing


MissingParts = Callable[[str | Path], list[str]]


def last_complete_checkpoint(output_dir: str, missing_parts: MissingParts = missing_checkpoint_parts) -> str | None:
    """The latest checkpoint-N that holds everything a resume needs.

    The Trainer writes checkpoints in place and get_last_checkpoint takes the highest step, so a run killed while
    saving would resume from a half-written checkpoint: skip those (and say so).
    """
    for checkpoint in reversed(sort_checkpoints(output_dir)):
        missing = missing_parts(checkpoint)
        if not missing:
            return checkpoint
        logger.warning("Skipping incomplete %s (no %s)", checkpoint, ", ".join(missing))
    return None


def claim_output_dir(output_dir: str, overwrite: bool, main_process: bool = True) -> None:
    """A fresh run must not share output_dir with another run's checkpoints: `auto` would later resume theirs.

    overwrite (--overwrite_output_dir) deletes them instead, on the main process.
    """
    found = sort_checkpoints(output_dir)
    if not found:
        return
    if not overwrite:
        raise UsageError(f"{output_dir} holds checkpoints of an earlier run ({Path(found[-1]).name}): pass "
                         "--resume_from_checkpoint auto to continue it, --overwrite_output_dir True to delete them, "
                         "or another --output_dir")
    if main_process:
        logger.warning("--overwrite_output_dir: deleting %s", ", ".join(Path(path).name for path in found))
        for path in found:
            shutil.rmtree(path)


def resolve_resume_checkpoint(output_dir: str, resume: str | None, overwrite: bool, main_process: bool = True,
                              missing_parts: MissingParts = missing_checkpoint_parts) -> str | None:
    """--resume_from_checkpoint: a path, or 'auto' for the latest complete checkpoint in output_dir (None if none).

    Without it, output_dir must hold no checkpoints of another run (see claim_output_dir). missing_parts names
    what a checkpoint lacks: the Trainer's layout by default (PPO's loop passes its own).
    """
    if resume is None:
        claim_output_dir(output_dir, overwrite, main_process)
        return None
    if overwrite:
        raise UsageError("--overwrite_output_dir deletes the checkpoints --resume_from_checkpoint continues from: "
                         "pass one of them")
    if resume == "auto":
        last = last_complete_checkpoint(output_dir, missing_parts)
        logger.info("Resuming from %s", last or "scratch (no checkpoint in output_dir yet)")
        return last
    if not os.path.isdir(resume):
        raise UsageError(f"--resume_from_checkpoint {resume}: no such checkpoint directory")
    missing = missing_parts(resume)
    if missing:
        raise UsageError(f"--resume_from_checkpoint {resume}: incomplete checkpoint (no {', '.join(missing)})")
    return resume


def cpu_has_native_bf16() -> bool:
    """x86 CPUs compute bfloat16 natively only with AVX512-BF16 or AMX; other CPUs (ARM) are not second-guessed."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def check_precision(training_args) -> None:
    """Mixed precision the device cannot do, refused before any loading instead of failing or crawling later."""
    if training_args.device.type != "cpu":
        return
    if training_args.fp16:
        raise UsageError("--fp16 needs a GPU; on CPU train in float32 (the default), or --bf16 on a CPU with "
                         "native bfloat16")
    if training_args.bf16 and not cpu_has_native_bf16():
        raise UsageError("--bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX), and emulated bfloat16 is "
                         "several times slower than float32: drop --bf16")


def keep_token_out_of_outputs(training_args) -> None:
    """--hub_token moves to $HF_TOKEN (where huggingface_hub reads it), because the Trainer pickles its arguments
    into every checkpoint's training_args.bin."""
    if training_args.hub_token:
        os.environ.setdefault("HF_TOKEN", training_args.hub_token)
        training_args.hub_token = None


def check_streaming(data_args, training_args) -> None:
    """--streaming reads data of unknown length: the run's length must come from --max_steps."""
    if data_args.streaming and training_args.max_steps <= 0:
        raise UsageError("--streaming reads data of unknown length: pass --max_steps (optimizer steps to train)")


def prepare_run(training_args) -> str | None:
    """Logging, argument checks and seeding; returns the checkpoint to resume from."""
    keep_token_out_of_outputs(training_args)
    setup_logging(training_args.should_log, training_args.get_process_log_level())
    check_precision(training_args)
    resume = resolve_resume_checkpoint(training_args.output_dir, training_args.resume_from_checkpoint,
                                       training_args.overwrite_output_dir, training_args.should_save)
    set_seed(training_args.seed)
    return resume


def write_loss_plot(args, state, metrics: tuple[str, ...] = ("loss",)) -> None:
    """loss.png in output_dir: the stage's metrics from the trainer's log history (main process only)."""
    if state.is_world_process_zero:
        plot_metrics(state.log_history, Path(args.output_dir) / "loss.png", metrics, title=Path(args.output_dir).name)


class LossPlotCallback(TrainerCallback):
    """Refreshes loss.png at every checkpoint, so a long run's curves can be watched."""

    def __init__(self, metrics: tuple[str, ...]):
        self.metrics = metrics

    def on_save(self, args, state, control, **kwargs):
        write_loss_plot(args, state, self.metrics)


class StopOnSignal(TrainerCallback):
    """SIGINT (Ctrl-C) or SIGTERM: finish the current optimizer step, save a checkpoint and stop.

    Use as a context manager around the training loop (main thread only: Python delivers signals there). The first
    signal only sets a flag; a second one acts as before (Ctrl-C twice aborts at once). A signal the process
    inherited as ignored (nohup, a shell's background job) stays ignored.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received = 0  # the signal number, 0 = none
        self.stopped_at: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS
                              if signal.getsignal(signum) is not signal.SIG_IGN}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _handle(self, signum, frame) -> None:
        self.received = signum
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def requested(self, device: torch.device | str = "cpu") -> bool:
        """Whether any process got a signal; every process must call this at the same step, so all stop together."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            received = torch.tensor(self.received, device=device)
            torch.distributed.all_reduce(received, op=torch.distributed.ReduceOp.MAX)
            self.received = int(received.item())
        return self.received != 0

    def exit(self, checkpoint: str | Path) -> NoReturn:
        """Exit with 128 + the signal number, the shell's code for "killed by it", so that scripts stop here."""
        logger.warning("Stopped by %s; saved %s. Continue with --resume_from_checkpoint auto",
                       signal.Signals(self.received).name, checkpoint)
        raise SystemExit(128 + self.received)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested(args.device) and state.global_step < state.max_steps:  # on the last step: just finish
            control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step


def early_stopping(patience: int | None, training_args) -> list[TrainerCallback]:
    """The callbacks for --early_stopping_patience: none without it. Stopping early only pays with the best
    checkpoint restored at the end, so the flag requires --load_best_model_at_end."""
    if patience is None:
        return []
    if patience < 1:
        raise UsageError(f"--early_stopping_patience {patience}: expected a number of evaluations, 1 or more")
    if not training_args.load_best_model_at_end:
        raise UsageError("--early_stopping_patience needs --load_best_model_at_end True (and --save_strategy equal "
                         "to --eval_strategy), so that the best checkpoint, not the last, is saved")
    return [EarlyStoppingCallback(patience)]


def with_perplexity(metrics: dict, prefix: str) -> dict:
    """Add <prefix>_perplexity = exp(<prefix>_loss) (the loss is the mean token-level negative log-likelihood)."""
    loss = metrics.get(f"{prefix}_loss")
    if loss is not None:
        metrics[f"{prefix}_perplexity"] = math.exp(min(loss, 50.0))
    return metrics


def train_and_save(trainer: Trainer, resume_from_checkpoint: str | None, report_perplexity: bool = False,
                   plotted: tuple[str, ...] = ("loss",)) -> dict:
    """Train, save model/adapter + tokenizer, evaluate on validation, write metrics and loss.png.

    report_perplexity: the eval loss is a token-level NLL (PT, SFT), so exp(loss) is the perplexity.
    plotted: the logged metrics loss.png shows, one panel each (training and eval_ values).
    SIGINT/SIGTERM save a checkpoint at the next step boundary and exit (see StopOnSignal).
    """
    stop = StopOnSignal()
    trainer.add_callback(LossPlotCallback(plotted))
    trainer.add_callback(stop)
    with stop:
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    if stop.stopped_at is not None:
        stop.exit(Path(trainer.args.output_dir) / f"checkpoint-{stop.stopped_at}")
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
    write_loss_plot(trainer.args, trainer.state, plotted)
    end_process_group(trainer)
    return metrics


def end_process_group(trainer: Trainer) -> None:
    """Free the DDP wrapper, then end the process group, so a launched process exits cleanly after saving.

    A gloo worker thread still destroying its last collective's tensors needs the GIL. A process group freed along
    with DDP's reducer (which holds the GIL) waits for that thread forever; one freed at interpreter exit aborts
    ("terminate called without an active exception"): pytorch/pytorch#56297 and #179291, both seen here under
    accelerate launch. Freed by destroy_process_group, its last reference, the group releases the GIL first.
    """
    trainer.model_wrapped = trainer.model
    trainer.accelerator.free_memory()  # drops its own references to the DDP wrapper and collects cycles
    trainer.accelerator.end_training()


# Defaults that depend on the machine, so no config file can hold them: mixed precision on GPUs that have bf16.
# What the stages set besides lives in configs/<stage>.yaml.
STAGE_DEFAULTS = {
    "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    "dataloader_pin_memory": torch.cuda.is_available(),
    # Without it, processes launched by torchrun/accelerate on a CPU-only machine each train alone on all the data.
    "use_cpu": not torch.accelerator.is_available(),
}


def load_records(data_args, convert, training_args) -> DatasetDict | IterableDatasetDict:
    """The stage's normalised splits. Without a validation split, a configured --eval_strategy is turned off (with a
    warning) instead of stopping the trainer: the stage configs evaluate every few steps whenever they can."""
    # The main process reads first and the others read the cache it writes; PPO's own arguments have no such switch.
    first = getattr(training_args, "main_process_first", None)
    with first(desc="reading the data") if first else contextlib.nullcontext():
        records = load_splits(data_args, convert, training_args.seed)
    if "validation" not in records and getattr(training_args, "eval_strategy", "no") != "no":
        logger.warning("No validation data: --eval_strategy %s is off",
                       IntervalStrategy(training_args.eval_strategy).value)
        training_args.eval_strategy = IntervalStrategy.NO
    return records


def load_chat_inputs(model_args, data_args, training_args, convert) -> tuple:
    """Records, tokenizer and chat template of a conversational stage.

    The records are read and validated first, so bad data fails before any model is loaded; the template is
    set on the tokenizer, so the saved tokenizer renders prompts exactly as training did.
    """
    records = load_records(data_args, convert, training_args)
    tokenizer = load_tokenizer(model_args)
    template = resolve_template(tokenizer, data_args.template_name, data_args.allow_special_tokens_in_content,
                                data_args.tool_format)
    tokenizer.chat_template = template.jinja
    return records, tokenizer, template


def preference_limits(data_args, max_length: int | None) -> LengthLimits:
    """The token caps a preference stage fits its rows to (max_length: the trainer's --max_length)."""
    return LengthLimits(max_length, data_args.max_source_length, data_args.max_target_length,
                        drop=data_args.long_pairs == "drop")


def load_preference_inputs(model_args, lora_args, data_args, training_args, convert=to_preference,
                           build=build_preference_splits, model_class=None, task_type: str = "CAUSAL_LM") -> tuple:
    """Model (with LoRA), tokenizer and tokenised splits of a preference stage (RM, DPO, ORPO, CPO, KTO)."""
    records, tokenizer, template = load_chat_inputs(model_args, data_args, training_args, convert)
    with training_args.main_process_first(desc="dataset preparation"):
        splits = build(records, tokenizer, template, preference_limits(data_args, training_args.max_length),
                       data_args.preprocessing_num_workers)
    base = load_model(model_args, model_class, new_head=True, num_labels=1) if model_class else load_model(model_args)
    model = apply_lora(base, lora_args, training_args, task_type=task_type)
    if task_type == "CAUSAL_LM":
        set_stop_tokens(model, tokenizer, template.stop_words)
    return model, tokenizer, splits

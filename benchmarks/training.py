"""Train one stage for a few steps through its own script's main(), in a fresh process, and measure it.

The stage runs exactly as from the command line (our processors, collators and the TRL trainer); the only
additions are a callback that times every optimizer step and a forward pre-hook that counts the tokens of each
batch the model is actually fed: total (the padded batch), real (not padding) and useful (carrying loss).
Each run is its own process, so its peak memory (resident set on a CPU, allocated CUDA memory on a GPU) is its own.

    python -m benchmarks.training supervised_finetuning OUT.json -- --max_steps 8 --packing True ...
"""

import json
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import medicalgpt.quiet  # noqa: F401  (before the libraries: it filters what they print on import)

import torch
from transformers import TrainerCallback

from medicalgpt.memory import PeakMemory  # torch only: also imported by the LLaMA-Factory driver, in its own venv

IGNORE_INDEX = -100  # the label of positions without loss, in transformers, TRL and LLaMA-Factory alike

REPO = Path(__file__).resolve().parents[1]
# Flags every benchmark run shares: no logging integrations, checkpoints, progress bars or evaluation.
QUIET = ["--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True", "--logging_steps", "1000",
         "--validation_split_percentage", "0", "--dataloader_num_workers", "0", "--seed", "42"]


def matmul_peak_flops(n: int, repeats: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of the fastest of `repeats` n×n matrix products on `device` (this process's threads on a CPU): the
    MFU denominator. A GPU is synchronised around each product, which it otherwise only queues."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b  # warm-up (cuBLAS picks its kernel)
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def batch_tokens(inputs: dict) -> tuple[int, int, int]:
    """(total, real, useful) tokens of one causal-LM batch: padded size, non-padding, loss-bearing."""
    if inputs.get("input_ids") is None and inputs.get("completion_ids") is not None:
        # An on-policy batch (TRL's distillation): its prompts, then the answers generated in the step, which train.
        inputs = {"input_ids": torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
                  "attention_mask": torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
                  "completion_mask": torch.cat([torch.zeros_like(inputs["prompt_mask"]), inputs["completion_mask"]],
                                               dim=1)}
    input_ids = inputs.get("input_ids")
    if input_ids is None:  # TRL's reward trainer names its inputs per side
        return 0, 0, 0
    total = input_ids.numel()
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 4:  # LLaMA-Factory's neat packing: a (batch, 1, query, key) mask
        allowed = mask == 0 if mask.is_floating_point() else mask  # additive float, or boolean
        real = int(allowed.diagonal(dim1=-2, dim2=-1).any(1).sum())  # padding may not even attend to itself
    elif mask is not None:
        real = int(mask.count_nonzero())  # 0/1, or LLaMA-Factory's packed-sample numbers (1, 1, 2, 2, 2, 0)
    elif inputs.get("position_ids") is not None:
        # Packed rows, right-padded with position 0: a row's real tokens end at its last non-zero position.
        nonzero = inputs["position_ids"] != 0
        last = nonzero.shape[-1] - 1 - nonzero.flip(-1).int().argmax(-1)
        real = int((last + 1).sum())
    else:
        real = total
    labels = inputs.get("labels")
    if labels is None and inputs.get("completion_mask") is not None:  # TRL's DPO batch: its labels come later
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
    # The loss shifts labels by one: position t's label is predicted from position t - 1, so column 0 never counts.
    useful = int((labels[..., 1:] != IGNORE_INDEX).sum()) if labels is not None and labels.dim() == 2 else 0
    return total, real, useful


def op_category(name: str) -> str:
    if "scaled_dot_product" in name or "attention" in name:
        return "attention"
    if name.split("::")[-1] in {"mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul", "linear"}:
        return "matmul"
    return "optimizer" if "adam" in name else "elementwise and other"


def profile_summary(profiler) -> dict:
    """Share of CPU time by kind of operation, and the ten most expensive operations."""
    events = [e for e in profiler.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    shares = Counter()
    for event in events:
        shares[op_category(event.key)] += event.self_cpu_time_total / total
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]
    return {"seconds": total / 1e6, "share": {k: round(v, 3) for k, v in shares.most_common()},
            "top_ops": [{"op": e.key, "calls": e.count, "share": round(e.self_cpu_time_total / total, 3)}
                        for e in top]}


class Meter(TrainerCallback):
    """Per-step wall time and tokens, and the peak memory of training alone; optionally a profile of steps 2-3.

    Tokens are counted from what the model's forward receives, or with count_batches from each training batch as
    transformers' Trainer.training_step receives it: for preference trainers that keep the labels out of the model
    call (LLaMA-Factory's DPO), so that both tools' DPO steps are counted from the same place.
    """

    def __init__(self, profile: bool = False, count_batches: bool = False):
        self.tokens = [0, 0, 0]
        self.steps: list[tuple[float, list[int]]] = []  # (time at the end of the step, cumulative tokens)
        self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else None
        self.profile = None
        self.count_batches = count_batches
        if count_batches:
            import transformers

            training_step = transformers.Trainer.training_step

            def counted_training_step(trainer, model, inputs, *args, **kwargs):
                self.add(batch_tokens(inputs))
                return training_step(trainer, model, inputs, *args, **kwargs)

            transformers.Trainer.training_step = counted_training_step  # this process measures one run only

    def add(self, tokens: tuple[int, int, int]) -> None:
        self.tokens = [a + b for a, b in zip(self.tokens, tokens, strict=True)]

    def count(self, module, args, kwargs) -> None:
        # Not the reference model's or evaluation's forwards (no gradients), nor a checkpointed forward re-run
        # inside backward (graph task id -1: not inside backward).
        if module.training and torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
            # TRL's DistillationTrainer passes its batch positionally (trl.models.utils._ForwardRedirection).
            batch = kwargs or next((arg for arg in args if isinstance(arg, dict)), {})
            self.add(batch_tokens(batch))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.count_batches:
            model.register_forward_pre_hook(self.count, with_kwargs=True)
        self.peak = PeakMemory().__enter__()
        self.start = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        if self.profiler and state.global_step == 1:
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append((time.perf_counter(), list(self.tokens)))
        if self.profiler and state.global_step == 3:
            self.profiler.__exit__(None, None, None)
            self.profile = profile_summary(self.profiler)

    def on_train_end(self, args, state, control, **kwargs):
        self.peak.__exit__(None, None, None)

    def result(self) -> dict:
        """Throughput over every step but the first, which pays one-off costs (kernel selection, allocations)."""
        first_time, first_tokens = self.steps[0] if len(self.steps) > 1 else (self.start, [0, 0, 0])
        last_time, last_tokens = self.steps[-1]
        seconds = last_time - first_time
        total, real, useful = (last - first for last, first in zip(last_tokens, first_tokens, strict=True))
        times = [self.start] + [t for t, _ in self.steps]
        durations = [b - a for a, b in zip(times, times[1:])]
        return {"steps": len(self.steps), "seconds": seconds, "tokens": total, "real_tokens": real,
                "useful_tokens": useful, "step_seconds": statistics.median(durations[1:] or durations),
                "tokens_per_s": total / seconds, "useful_tokens_per_s": useful / seconds,
                "packing_efficiency": real / total if total else None,
                "train_peak_mb": self.peak.bytes / 2**20 if self.peak.bytes is not None else None,
                **({"profile": self.profile} if self.profile else {})}


def peak_process_mb() -> float:
    """Peak allocated CUDA memory on a GPU; the process's peak resident set on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


def train_in_process(stage: str, flags: list[str], profile: bool = False, count_batches: bool = False) -> dict:
    """Run `stage`'s main(flags) with the meter attached; its measurements and parameter counts."""
    from medicalgpt import training  # the stages' stack: imported only where a stage runs
    from tools.scripts import script_main

    meter, trained = Meter(profile, count_batches), {}
    original = training.train_and_save

    def measured(trainer, resume, **kwargs):
        trainer.add_callback(meter)
        model = trainer.model
        trained["parameters"] = model.num_parameters()
        trained["trainable_parameters"] = model.num_parameters(only_trainable=True)
        return original(trainer, resume, **kwargs)

    training.train_and_save = measured  # the script binds it when script_main loads the script
    try:
        script_main(stage)(flags)
    finally:
        training.train_and_save = original
    return {**meter.result(), **trained, "peak_mb": peak_process_mb()}


def run_stage(stage: str, flags: list[str], output_dir: Path, isolate: bool = True, profile: bool = False,
              count_batches: bool = False) -> dict:
    """Train `stage` with `flags` and measure it: in a fresh Python process when isolate (so the peak memory is this
    run's own), else in this one (a smoke run: no start-up cost, but the peak is the whole process's)."""
    flags = ["--output_dir", str(output_dir), *QUIET, *flags]
    if not isolate:
        return {**train_in_process(stage, flags, profile, count_batches), "isolated": False}
    out = Path(output_dir) / "measurement.json"
    options = [option for option, on in (("--profile", profile), ("--count_batches", count_batches)) if on]
    command = [sys.executable, "-m", "benchmarks.training", stage, str(out), *options, "--", *flags]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{stage} {' '.join(flags)} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
    return {**json.loads(out.read_text()), "isolated": True}


def main() -> None:
    stage, out, *options = sys.argv[1:sys.argv.index("--")]
    flags = sys.argv[sys.argv.index("--") + 1:]
    Path(out).write_text(json.dumps(train_in_process(stage, flags, profile="--profile" in options,
                                                     count_batches="--count_batches" in options)))


if __name__ == "__main__":
    main()

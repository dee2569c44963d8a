"""DPO against SFT on the same model and data: time per optimizer step and peak memory.

Each configuration runs in its own process, so its peak memory (resident set on CPU, allocated CUDA
memory on a GPU) is its own. Prints a table and writes benchmarks/results/preference.json.

    python benchmarks/preference.py                  # 'large' CPU model (27M), 12 steps per configuration
    python benchmarks/preference.py --quick          # tiny model, 2 steps: checks the script runs
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> (stage module, extra flags); every configuration uses LoRA rank 8 on all linear layers.
CONFIGS = {
    "sft": ("supervised_finetuning", []),
    "dpo": ("dpo_training", []),
    "dpo_precomputed_ref": ("dpo_training", ["--precompute_ref_log_probs", "True"]),
}


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


def sft_data_flags(tmp: Path) -> list[str]:
    """The preference pairs' chosen answers as SFT conversations: the same prompts and answers DPO sees."""
    rows = [json.loads(line) for line in (REPO / "data/preference/train/preference_medical.jsonl").open()]
    path = tmp / "sft.jsonl"
    path.write_text("".join(json.dumps({"conversations": r["conversations"] + [{"from": "gpt", "value": r["chosen"]}]},
                                       ensure_ascii=False) + "\n" for r in rows))
    return ["--train_file_dir", str(path), "--max_length", "512"]


def run_config(name: str, model: str, steps: int, batch: int) -> dict:
    """Train one configuration for `steps` steps in this process; its median step time and peak memory."""
    import importlib

    module_name, flags = CONFIGS[name]
    stage = importlib.import_module(module_name)
    timer = StepTimer()
    original = stage.train_and_save

    def timed(trainer, resume, **kwargs):
        trainer.add_callback(timer)
        return original(trainer, resume, **kwargs)

    stage.train_and_save = timed
    with tempfile.TemporaryDirectory() as tmp:
        data = sft_data_flags(Path(tmp)) if name == "sft" else ["--train_file_dir", "data/preference/train"]
        stage.main(["--model_name_or_path", model, "--output_dir", tmp, *data, *flags,
                    "--max_steps", str(steps), "--per_device_train_batch_size", str(batch), "--lora_rank", "8",
                    "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True",
                    "--logging_steps", "1000"])
    measured = timer.times[1:] or timer.times  # the first step pays one-off costs
    return {"config": name, "step_seconds": statistics.median(measured), "peak_memory_mb": peak_memory_mb()}


def measure_in_subprocess(name: str, model: str, steps: int, batch: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, __file__, "--worker", name, "--model", model, "--steps", str(steps),
                        "--batch", str(batch), "--worker_output", out.name], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL)
        return json.loads(Path(out.name).read_text())


def report(rows: list[dict], setup: dict) -> str:
    sft = next(r for r in rows if r["config"] == "sft")
    lines = ["| configuration | step time (s) | × SFT | peak memory (MB) | × SFT |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['step_seconds']:.3f} | {r['step_seconds'] / sft['step_seconds']:.2f} | "
                     f"{r['peak_memory_mb']:.0f} | {r['peak_memory_mb'] / sft['peak_memory_mb']:.2f} |")
    return f"{json.dumps(setup)}\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--size", choices=["tiny", "default", "large"], default="large")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 steps")
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--worker_output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        Path(args.worker_output).write_text(json.dumps(run_config(args.worker, args.model, args.steps, args.batch)))
        return
    from medicalgpt.default_model import build_default_model

    size, steps = ("tiny", 2) if args.quick else (args.size, args.steps)
    model = str(build_default_model(REPO / "models" / f"benchmark-{size}", size=size))
    rows = [measure_in_subprocess(name, model, steps, args.batch) for name in CONFIGS]
    setup = {"model_size": size, "steps": steps, "batch": args.batch, "lora_rank": 8,
             "device": "cuda" if torch.cuda.is_available() else "cpu", "threads": torch.get_num_threads()}
    print(report(rows, setup))
    results = REPO / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    (results / "preference.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

r"""All benchmarks in one run: a table per section, and JSON in benchmarks/results/<suite>.json.

    OMP_NUM_THREADS=1 python benchmarks/run.py --suite cpu                # ~15 min on 2 cores, one thread
    python -m benchmarks.run --suite cpu --quick                          # everything on the tiny model, seconds
    python -m benchmarks.run --suite cpu --compare llamafactory           # adds the LLaMA-Factory comparison
    python -m benchmarks.run --suite cpu --sections sft --compare llamafactory \
        --sft_data data/sft/train medical_sft_1K_format.jsonl --dpo_data data/preference/train dpo_zh_500.jsonl
    python -m benchmarks.run --suite gpu                                  # CUDA only: Qwen2.5 shapes, LoRA/QLoRA

Sections (CPU suite): sft (useful and total tokens/s, packing efficiency, peak memory; LoRA and full, with and
without --packing), mfu (6·N·tokens/s over the measured fp32 matmul peak, with a profile), stages (PT, DPO, RM vs
SFT), preprocessing (records/s, peak memory and cache reuse at 10k-1M records; evaluation tokens/s), generation (one
by one vs batched). benchmarks/README.md describes each.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/run.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# The sections' modules (transformers, TRL, datasets: seconds to import) are imported where used, so that
# --suite gpu stops at once on a machine without CUDA.
REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("sft", "mfu", "stages", "preprocessing", "generation")
NO_CUDA = "--suite gpu needs a CUDA GPU, and torch.cuda.is_available() is False here; run --suite cpu on this machine"


@dataclass
class Plan:
    """What a run covers: full (the numbers to report) or quick (the tiny model, a few steps, in this process)."""
    quick: bool

    @property
    def sizes(self) -> list[str]:
        return ["tiny"] if self.quick else ["default", "large"]

    @property
    def mfu_size(self) -> str:
        return self.sizes[-1]  # the hidden-512 model in a full run

    def model(self, size: str) -> str:
        from medicalgpt.default_model import ensure_default_model

        return ensure_default_model(REPO / "models" / f"benchmark-{size}", size)

    def steps(self, packing: bool) -> int:
        return 3 if self.quick else (6 if packing else 12)

    def sft_flags(self) -> list[str]:
        """Batch 8, rows of 512 (in a quick run, batch 4, rows of 256 from 96 samples)."""
        if self.quick:
            return ["--per_device_train_batch_size", "4", "--max_length", "256", "--max_train_samples", "96"]
        return ["--per_device_train_batch_size", "8", "--max_length", "512"]


def target(value: float, goal: float, at_least: bool = True) -> dict:
    return {"value": round(value, 3), "target": goal, "met": value >= goal if at_least else value <= goal}


def run_sft(plan: Plan, workdir: Path, size: str, method: str, packing: bool, profile: bool = False) -> dict:
    from benchmarks.training import run_stage

    flags = ["--model_name_or_path", plan.model(size), "--train_file_dir", str(REPO / "data/sft/train"),
             "--use_peft", str(method == "lora"), "--packing", str(packing), "--max_steps", str(plan.steps(packing)),
             *plan.sft_flags()]
    name = f"{size}-{method}-{packing}{'-profile' if profile else ''}"
    run = run_stage("supervised_finetuning", flags, workdir / name, isolate=not plan.quick, profile=profile)
    return {"size": size, "method": method, "packing": packing, **run}


def sft_section(plan: Plan, workdir: Path) -> dict:
    rows = [run_sft(plan, workdir, size, method, packing)
            for size in plan.sizes for method in ("lora", "full") for packing in (False, True)]
    speedups = {f"{r['size']}-{r['method']}": r["useful_tokens_per_s"] / u["useful_tokens_per_s"]
                for r, u in zip(rows[1::2], rows[::2], strict=True)}
    packed_efficiency = min(r["packing_efficiency"] for r in rows if r["packing"])
    return {"rows": rows, "useful_speedup_from_packing": speedups,
            "targets": {"packing_efficiency": target(packed_efficiency, 0.97),
                        "useful_speedup_from_packing": target(min(speedups.values()), 1.5)}}


def sft_table(section: dict) -> str:
    lines = ["| model | method | packing | useful tok/s | total tok/s | packing efficiency | step (s) | peak (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['size']} | {r['method']} | {r['packing']} | {r['useful_tokens_per_s']:.0f} | "
              f"{r['tokens_per_s']:.0f} | {r['packing_efficiency']:.3f} | {r['step_seconds']:.2f} | "
              f"{r['peak_mb']:.0f} |" for r in section["rows"]]
    return "\n".join(lines)


def mfu_section(plan: Plan, workdir: Path, sft: dict) -> dict:
    """Model FLOPs utilisation of full fine-tuning: 6·N·(non-padding tokens/s) over the measured matmul peak."""
    from benchmarks.training import matmul_peak_flops

    peak = matmul_peak_flops(512 if plan.quick else 2048, repeats=5)
    rows = [{"size": r["size"], "packing": r["packing"], "parameters": r["parameters"],
             "real_tokens_per_s": r["real_tokens"] / r["seconds"],
             "mfu": 6 * r["parameters"] * r["real_tokens"] / r["seconds"] / peak}
            for r in sft["rows"] if r["method"] == "full"]
    profiled = run_sft(plan, workdir, plan.mfu_size, "full", packing=True, profile=True)
    best = max(r["mfu"] for r in rows if r["size"] == plan.mfu_size)
    return {"matmul_peak_gflops": peak / 1e9, "threads": torch.get_num_threads(), "rows": rows,
            "profile": profiled["profile"], "targets": {"mfu": target(best, 0.5)}}


def mfu_table(section: dict) -> str:
    lines = [f"fp32 matmul peak: {section['matmul_peak_gflops']:.1f} GFLOP/s on {section['threads']} thread(s)",
             "| model | packing | parameters | tokens/s | MFU |", "|---|---|---|---|---|"]
    lines += [f"| {r['size']} | {r['packing']} | {r['parameters'] / 1e6:.1f}M | {r['real_tokens_per_s']:.0f} | "
              f"{r['mfu']:.1%} |" for r in section["rows"]]
    share = ", ".join(f"{k} {v:.0%}" for k, v in section["profile"]["share"].items())
    return "\n".join(lines + [f"profile (steps 2-3, full, packed): {share}"])


def stages_section(plan: Plan, workdir: Path) -> dict:
    from benchmarks import preference

    rows = preference.compare_stages(plan.model(plan.mfu_size), 3 if plan.quick else 8, 8, isolate=not plan.quick)
    half = next(r for r in rows if r["config"] == "dpo_half_batches")  # the memory-saving mode the target is for
    return {"model_size": plan.mfu_size, "rows": rows, "targets": {"dpo_half_batches_peak_vs_sft": target(
        half["peak_vs_sft"], 1.15, at_least=False)}}


def generation_section(plan: Plan, workdir: Path) -> dict:
    from benchmarks import generation
    from medicalgpt.args import ModelArguments

    args = generation.BenchmarkArguments(quick=plan.quick, output_file=str(workdir / "generation.json"))
    result = generation.run_benchmark(ModelArguments(model_name_or_path=plan.model(plan.sizes[0])), args)
    return {**result, "targets": {"batch_8_speedup": target(result["rows"][1]["speedup"], 4.0)}}


def compare_section(plan: Plan, workdir: Path, sft_data: list[Path], dpo_data: list[Path]) -> dict:
    from benchmarks import llamafactory

    steps = dict.fromkeys(("sft", "sft_packed", "dpo"), 3) if plan.quick else {"sft": 24, "sft_packed": 12, "dpo": 16}
    rows = llamafactory.compare(plan.model(plan.sizes[0]), steps, sft_data, dpo_data)
    sft_packed = [r for r in rows if r["stage"] == "sft" and r["packing"]]
    dpo = [r for r in rows if r["stage"] == "dpo"]
    return {"rows": rows, "targets": {
        "sft_packed_useful_vs_their_best_packed": target(min(r["speedup"] for r in sft_packed), 1.5),
        "dpo_step_speed": target(min(r["step_speedup"] for r in dpo), 1.0),
        "dpo_total_tokens_per_s": target(min(r["total_speedup"] for r in dpo), 1.0),
        "dpo_useful_tokens_per_s": target(min(r["speedup"] for r in dpo), 1.5)}}


def machine() -> dict:
    return {"date": datetime.date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average_at_start": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--suite", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="the tiny model, a few steps: a smoke run in seconds")
    parser.add_argument("--compare", choices=["llamafactory"], help="also run LLaMA-Factory's SFT and DPO side by side")
    parser.add_argument("--sft_data", nargs="+", type=Path, default=[REPO / "data/sft/train"],
                        help="--compare: SFT data, one run each (default: data/sft/train)")
    parser.add_argument("--dpo_data", nargs="+", type=Path, default=[REPO / "data/preference/train"],
                        help="--compare: DPO pairs, one per --sft_data (default: data/preference/train)")
    parser.add_argument("--sections", help=f"comma-separated subset of: {','.join(SECTIONS)}")
    parser.add_argument("--output_file", help="default: benchmarks/results/<suite>.json")
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS) if args.sections else set()
    if unknown:
        parser.error(f"--sections: unknown {', '.join(sorted(unknown))} (choose from {', '.join(SECTIONS)})")
    if len(args.sft_data) != len(args.dpo_data):
        parser.error(f"--sft_data and --dpo_data: one DPO set per SFT set ({len(args.sft_data)} and "
                     f"{len(args.dpo_data)} given)")
    if args.suite == "gpu" and not torch.cuda.is_available():
        raise SystemExit(NO_CUDA)
    plan = Plan(args.quick)
    result = {"suite": args.suite, "quick": args.quick, "machine": machine()}
    output = Path(args.output_file or REPO / "benchmarks" / "results" / f"{args.suite}.json")
    output.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section: a failure later keeps what was measured
        result["machine"]["load_average_at_end"] = os.getloadavg()[0]
        output.write_text(json.dumps(result, indent=2) + "\n")

    if args.suite == "gpu":
        from benchmarks import gpu

        def save_rows(rows: list[dict]) -> None:
            result["rows"] = rows
            save()

        gpu.run_gpu_suite(args.quick, save_rows)
        print(gpu.table(result["rows"]))
    else:
        run_cpu_suite(plan, result, args, save)
    return result


def preprocessing_section(plan: Plan) -> dict:
    """10k, 100k and 1M records (1,000 in this process in a quick run); evaluation on the default model."""
    from benchmarks import preprocessing

    if plan.quick:
        return preprocessing.measure_preprocessing((1_000,), 1_000, eval_model=plan.model("tiny"), eval_samples=16,
                                                   isolated=False)
    return preprocessing.measure_preprocessing(eval_model=plan.model("default"))


def run_cpu_suite(plan: Plan, result: dict, args: argparse.Namespace, save) -> None:
    import datasets

    from benchmarks import generation, llamafactory, preference, preprocessing

    datasets.disable_progress_bars()
    chosen = set(args.sections.split(",") if args.sections else SECTIONS)
    if "mfu" in chosen:
        chosen.add("sft")  # MFU is computed from the SFT runs
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        sections = {
            "sft": (lambda: sft_section(plan, workdir), sft_table),
            "mfu": (lambda: mfu_section(plan, workdir, result["sft"]), mfu_table),
            "stages": (lambda: stages_section(plan, workdir), lambda s: preference.table(s["rows"])),
            "preprocessing": (lambda: preprocessing_section(plan), preprocessing.table),
            "generation": (lambda: generation_section(plan, workdir), lambda s: generation.table(s["rows"])),
            "compare_llamafactory": (lambda: compare_section(plan, workdir, args.sft_data, args.dpo_data),
                                     lambda s: llamafactory.table(s["rows"])),
        }
        if args.compare:
            chosen.add("compare_llamafactory")
        for name, (measure, table) in sections.items():
            if name in chosen:
                result[name] = measure()
                save()
                print(f"\n## {name}\n{table(result[name])}", flush=True)


if __name__ == "__main__":
    main()

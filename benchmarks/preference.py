"""PT, DPO (with and without precomputed reference log-probs), RM and on-policy distillation against SFT on the
same model and data: time per optimizer step, tokens per step and peak memory.

The data are the preference pairs of data/preference/train: DPO and RM train on them; SFT on each prompt with its
chosen answer; PT on the same conversations as plain text; distillation on the same prompts, with the model as its
own teacher (64-token answers; the cost is a teacher of the student's size). Every configuration uses LoRA rank 8
on all linear layers and runs in its own process (benchmarks.training), so its peak memory is its own.

    python -m benchmarks.preference                  # 'large' CPU model (25M), 12 steps per configuration
    python -m benchmarks.preference --quick          # tiny model, 3 steps, in this process: checks the script runs
"""

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.training import REPO, run_stage
from medicalgpt.default_model import ensure_default_model

PAIRS = REPO / "data/preference/train/preference_medical.jsonl"
# name -> (stage module, its flags); "{dir}" is the folder of the data written by write_same_data, "{model}" the
# model measured.
CONFIGS = {
    "sft": ("supervised_finetuning", ["--train_file_dir", "{dir}/sft.jsonl", "--max_length", "512",
                                      "--packing", "False"]),
    "pt": ("pretraining", ["--train_file_dir", "{dir}/pt.txt", "--block_size", "128"]),
    "dpo": ("dpo_training", ["--train_file_dir", str(PAIRS)]),
    "dpo_half_batches": ("dpo_training", ["--train_file_dir", str(PAIRS), "--half_batches", "True"]),
    "dpo_precomputed_ref": ("dpo_training", ["--train_file_dir", str(PAIRS), "--precompute_ref_log_probs", "True"]),
    "rm": ("reward_modeling", ["--train_file_dir", str(PAIRS)]),
    "distill": ("distillation_training", ["--train_file_dir", "{dir}/sft.jsonl", "--teacher_model_name_or_path",
                                          "{model}", "--max_completion_length", "64"]),
}


def write_same_data(folder: Path) -> None:
    """The pairs' prompts with their chosen answers, as SFT conversations (sft.jsonl) and plain text (pt.txt)."""
    rows = [json.loads(line) for line in PAIRS.open(encoding="utf-8")]
    chats = [r["conversations"] + [{"from": "gpt", "value": r["chosen"]}] for r in rows]
    (folder / "sft.jsonl").write_text("".join(json.dumps({"conversations": c}, ensure_ascii=False) + "\n"
                                              for c in chats), encoding="utf-8")
    (folder / "pt.txt").write_text("".join(" ".join(turn["value"] for turn in c).replace("\n", " ") + "\n"
                                           for c in chats), encoding="utf-8")


def compare_stages(model: str, steps: int, batch: int, isolate: bool = True) -> list[dict]:
    """One row per configuration: step time and peak memory, also as multiples of SFT's."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_same_data(Path(tmp))
        for name, (stage, flags) in CONFIGS.items():
            flags = [flag.replace("{dir}", tmp).replace("{model}", model) for flag in flags]
            run = run_stage(stage, ["--model_name_or_path", model, "--max_steps", str(steps), "--lora_rank", "8",
                                    "--per_device_train_batch_size", str(batch), *flags],
                            Path(tmp) / name, isolate)
            rows.append({"config": name, "step_seconds": run["step_seconds"],
                         "tokens_per_step": run["tokens"] / max(run["steps"] - 1, 1),
                         "peak_mb": run["peak_mb"], "train_peak_mb": run["train_peak_mb"]})
    sft = rows[0]
    for row in rows:
        row["step_vs_sft"] = row["step_seconds"] / sft["step_seconds"]
        row["peak_vs_sft"] = row["peak_mb"] / sft["peak_mb"]
        row["train_peak_vs_sft"] = row["train_peak_mb"] / sft["train_peak_mb"] if sft["train_peak_mb"] else None
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| configuration | step (s) | × SFT | tokens/step | peak RSS (MB) | × SFT | training peak (MB) | × SFT |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        train_ratio = f"{r['train_peak_vs_sft']:.2f}" if r["train_peak_vs_sft"] is not None else "-"
        lines.append(f"| {r['config']} | {r['step_seconds']:.3f} | {r['step_vs_sft']:.2f} | {r['tokens_per_step']:.0f} "
                     f"| {r['peak_mb']:.0f} | {r['peak_vs_sft']:.2f} | {r['train_peak_mb'] or 0:.0f} | {train_ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--size", choices=["tiny", "default", "large"], default="large")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 steps, in this process")
    parser.add_argument("--output_file", default=str(REPO / "benchmarks/results/preference.json"))
    args = parser.parse_args(argv)
    size, steps = ("tiny", 3) if args.quick else (args.size, args.steps)
    model = ensure_default_model(REPO / "models" / f"benchmark-{size}", size)
    rows = compare_stages(model, steps, args.batch, isolate=not args.quick)
    print(table(rows))
    result = {"setup": {"model_size": size, "steps": steps, "batch": args.batch, "lora_rank": 8}, "rows": rows}
    Path(args.output_file).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

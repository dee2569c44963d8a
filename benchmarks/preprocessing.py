"""SFT data preparation at scale, through medicalgpt.data as supervised_finetuning.py runs it: records/s for reading
with format detection and conversion (load_splits, which also holds out the capped validation split), then chat
templating, tokenisation and loss masking (build_sft_splits); the peak resident memory of a fresh process doing it;
and a second run on the same files, which reuses the Arrow cache. Then evaluation tokens/s against a training step's.

The synthetic set is the shipped data/sft/train files (Alpaca, OpenAI-messages and ShareGPT), each repeated to a
third of the records with a numbered question so no two records are equal, written to a temporary folder.

    python -m benchmarks.preprocessing                                    # 10k, 100k, 1M records; ~15 min on 1 core
    python -m benchmarks.preprocessing --records 100000 --template_up_to 100000 --num_proc 2
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.training import REPO

SHIPPED = REPO / "data/sft/train"


def numbered(record: dict, index: int) -> dict:
    """The record with ' (#index)' after its first user text, in whichever format it is."""
    record = json.loads(json.dumps(record))
    if "instruction" in record:
        record["instruction"] += f" (#{index})"
    else:
        turns = record.get("conversations") or record["messages"]
        turn = next(t for t in turns if t.get("from", t.get("role")) in ("human", "user"))
        turn["value" if "value" in turn else "content"] += f" (#{index})"
    return record


def write_synthetic(folder: Path, count: int) -> None:
    files = sorted(SHIPPED.glob("*.jsonl"))
    for path in files:
        records = [json.loads(line) for line in path.open(encoding="utf-8")]
        with (folder / path.name).open("w", encoding="utf-8") as out:
            for i in range(count // len(files)):
                out.write(json.dumps(numbered(records[i % len(records)], i), ensure_ascii=False) + "\n")


def prepare(folder: str, template_records: bool, num_proc: int | None = None, max_length: int = 512) -> dict:
    """Read (and template) the folder's records as the SFT stage does; seconds per phase and this process's peak."""
    from transformers import AutoTokenizer

    from medicalgpt.args import SFTDataArguments
    from medicalgpt.data import build_sft_splits, load_splits, to_conversation
    from medicalgpt.default_model import ensure_default_model
    from medicalgpt.templates import resolve_template

    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    template = resolve_template(tokenizer, None)
    start = time.perf_counter()
    splits = load_splits(SFTDataArguments(train_file_dir=folder), to_conversation)
    read = time.perf_counter() - start
    result = {"records": sum(map(len, splits.values())), "validation": len(splits["validation"]), "read_s": read}
    if template_records:
        start = time.perf_counter()
        encoded = build_sft_splits(splits, tokenizer, template, max_length, num_proc=num_proc)
        result.update(template_s=time.perf_counter() - start,
                      tokens=sum(len(ids) for batch in encoded["train"].iter(10_000) for ids in batch["input_ids"]))
    return {**result, **resident_memory()}


def resident_memory() -> dict:
    """Peak resident memory of this process and its finished workers (--num_proc), and how much of the resident
    memory at the end is file pages: the memory-mapped Arrow data, which the kernel drops when memory is short."""
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    status = Path("/proc/self/status")
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines()) if status.exists() else {}
    return {"peak_mb": peak / 1024, "file_mb": int(fields.get("RssFile", "0 kB").split()[0]) / 1024}


def prepare_in_child(folder: Path, cache: Path, template_records: bool, num_proc: int | None) -> dict:
    """prepare() in a fresh process with its own datasets cache, so the peak memory is that run's own."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    command = [sys.executable, "-m", "benchmarks.preprocessing", "--child", str(folder), "--num_proc",
               str(num_proc or 0), *(["--child_templates"] if template_records else [])]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_size(count: int, template_records: bool, num_proc: int | None = None, isolated: bool = True) -> dict:
    """One row: the first run's records/s and peak memory, and a second run's time as a share of the first's."""
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = Path(tmp) / "data", Path(tmp) / "cache"
        folder.mkdir()
        write_synthetic(folder, count)
        if isolated:
            first, second = (prepare_in_child(folder, cache, template_records, num_proc) for _ in range(2))
        else:  # --quick: in this process, with a cache of its own (set where datasets reads it)
            import datasets

            datasets.config.HF_DATASETS_CACHE = cache
            first, second = (prepare(str(folder), template_records, num_proc) for _ in range(2))
    first_s, second_s = (run["read_s"] + run.get("template_s", 0) for run in (first, second))
    row = {"records": first["records"], "validation": first["validation"],
           "read_records_per_s": first["records"] / first["read_s"], "peak_mb": first["peak_mb"],
           "file_mb": first["file_mb"],
           "first_s": first_s, "second_s": second_s, "second_share": second_s / first_s}
    if template_records:
        row.update(tokens=first["tokens"], template_records_per_s=first["records"] / first["template_s"])
    return row


def measure_evaluation(model_dir: str, samples: int, max_length: int = 512) -> dict:
    """Tokens/s (not counting padding) of evaluation over `samples` SFT samples in batches of 8: in file order (as
    before) and shortest first (as supervised_finetuning.py now orders an unpacked validation split), against a
    training step's forward, and its forward + backward, on the same sorted batches (no optimizer step)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from medicalgpt.args import SFTDataArguments
    from medicalgpt.data import build_sft_splits, load_splits, sorted_by_length, to_conversation
    from medicalgpt.templates import resolve_template
    from medicalgpt.trainers import CPUFriendlySFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = resolve_template(tokenizer, None)
    splits = load_splits(SFTDataArguments(train_file_dir=str(SHIPPED), validation_split_percentage=0), to_conversation)
    split = build_sft_splits(splits, tokenizer, template, max_length)["train"].shuffle(seed=0).select(range(samples))
    tokens = sum(map(len, split["input_ids"]))
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, report_to="none", use_cpu=True, bf16=False, per_device_eval_batch_size=8,
                         per_device_train_batch_size=8, activation_checkpointing=False, gradient_checkpointing=False,
                         disable_tqdm=True, dataloader_num_workers=0)
        trainer = CPUFriendlySFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                                        processing_class=tokenizer, train_dataset=split)
        result = {"samples": samples, "tokens": tokens}
        for name, dataset in (("unsorted", split), ("sorted", sorted_by_length(split))):
            trainer.evaluate(dataset.select(range(8)))  # warm-up
            start = time.perf_counter()
            trainer.evaluate(dataset)
            result[f"eval_{name}_tokens_per_s"] = tokens / (time.perf_counter() - start)
        trainer.model.train()
        batches = list(trainer.get_eval_dataloader(sorted_by_length(split)))
        for name, backward in (("train_forward", False), ("train_step", True)):
            start = time.perf_counter()
            for batch in batches:  # a training step's forward (with the graph kept for backward), then + backward
                loss = trainer.compute_loss(trainer.model, batch)
                if backward:
                    loss.backward()
            result[f"{name}_tokens_per_s"] = tokens / (time.perf_counter() - start)
    return result


def measure_preprocessing(sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000), template_up_to: int = 100_000,
                          num_proc: int | None = None, eval_model: str | None = None, eval_samples: int = 512,
                          isolated: bool = True) -> dict:
    """Rows per size (templated up to template_up_to records), and the evaluation comparison."""
    from medicalgpt.default_model import ensure_default_model

    rows = [measure_size(count, count <= template_up_to, num_proc, isolated) for count in sizes]
    return {"rows": rows, "evaluation": measure_evaluation(eval_model or str(ensure_default_model()), eval_samples)}


def table(result: dict) -> str:
    lines = ["| records | read (records/s) | template (records/s) | tokens | peak RSS (MB) | of it mapped data at the "
             "end (MB) | first run (s) | second run (s) | second ÷ first |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        template = f"{r['template_records_per_s']:.0f}" if "template_records_per_s" in r else "-"
        lines.append(f"| {r['records']} | {r['read_records_per_s']:.0f} | {template} | {r.get('tokens', '-')} | "
                     f"{r['peak_mb']:.0f} | {r['file_mb']:.0f} | {r['first_s']:.1f} | {r['second_s']:.1f} | "
                     f"{r['second_share']:.1%} |")
    e = result["evaluation"]
    lines += ["", "| evaluation, file order (tok/s) | evaluation, shortest first (tok/s) | training forward (tok/s) | "
              "training forward + backward (tok/s) |", "|---|---|---|---|",
              f"| {e['eval_unsorted_tokens_per_s']:.0f} | {e['eval_sorted_tokens_per_s']:.0f} | "
              f"{e['train_forward_tokens_per_s']:.0f} | {e['train_step_tokens_per_s']:.0f} |"]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--template_up_to", type=int, default=100_000, help="Template sizes up to this many records.")
    parser.add_argument("--num_proc", type=int, default=0, help="--preprocessing_num_workers for templating.")
    parser.add_argument("--eval_samples", type=int, default=512)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # prepare() this folder in this process, print JSON
    parser.add_argument("--child_templates", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(prepare(args.child, args.child_templates, args.num_proc or None)))
    else:
        print(table(measure_preprocessing(tuple(args.records), args.template_up_to, args.num_proc or None,
                                          eval_samples=args.eval_samples)))

"""Generation throughput: one prompt at a time vs left-padded batches, through medicalgpt.generation.generate
(the path inference.py, evaluate_model.py and the servers use), with greedy decoding.

EOS is switched off here, so every prompt generates exactly --max_new_tokens tokens and the rows compare
equal work. Prints a table and writes JSON (default benchmarks/results/generation.json).

    OMP_NUM_THREADS=1 python -m benchmarks.generation                  # the default model
    python -m benchmarks.generation --quick --model_name_or_path DIR   # a smoke run in seconds
"""

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from medicalgpt.answering import read_requests
from medicalgpt.args import ModelArguments, parse_args
from medicalgpt.errors import run_cli
from medicalgpt.generation import generate
from medicalgpt.modeling import load_for_inference, load_tokenizer, model_path
from medicalgpt.templates import resolve_template


@dataclass
class BenchmarkArguments:
    questions_file: str = field(default="data/sft/validation", metadata={"help": "Prompts: their questions."})
    num_prompts: int = field(default=32, metadata={"help": "Prompts per run (questions repeat if too few)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per prompt, exactly."})
    batch_sizes: str = field(default="1,8,32", metadata={"help": "Comma-separated; the first is the baseline."})
    repeats: int = field(default=3, metadata={"help": "Timed runs per batch size; the fastest counts (the least "
                                                      "disturbed by other processes)."})
    output_file: str = field(default="benchmarks/results/generation.json")
    quick: bool = field(default=False, metadata={
        "help": "Smoke run: 4 prompts, 4 tokens, batch sizes 1 and 4, one timed run."})


def tokenized_prompts(tokenizer, template, args: BenchmarkArguments) -> list[list[int]]:
    requests = read_requests(args.questions_file)
    requests = (requests * -(-args.num_prompts // len(requests)))[: args.num_prompts]
    return [template.encode_prompt(tokenizer, request["messages"]) for request in requests]


def seconds_to_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> float:
    start = time.perf_counter()
    generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=0)
    return time.perf_counter() - start


def time_generation(model, tokenizer, prompts: list[list[int]], args: BenchmarkArguments, batch_size: int) -> dict:
    """Generated tokens per second at one batch size: the fastest of the repeats, after a warm-up batch."""
    seconds_to_generate(model, tokenizer, prompts[:batch_size], 2, batch_size)
    seconds = min(seconds_to_generate(model, tokenizer, prompts, args.max_new_tokens, batch_size)
                  for _ in range(args.repeats))
    tokens = len(prompts) * args.max_new_tokens  # exact: EOS is off
    return {"batch_size": batch_size, "seconds": round(seconds, 3), "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1)}


def table(rows: list[dict]) -> str:
    lines = ["| batch size | seconds | tokens | tokens/s | speed-up |", "|---|---|---|---|---|"]
    lines += [f"| {row['batch_size']} | {row['seconds']:.2f} | {row['tokens']} | {row['tokens_per_s']:.0f} | "
              f"{row['speedup']:.1f}x |" for row in rows]
    return "\n".join(lines)


def run_benchmark(model_args: ModelArguments, args: BenchmarkArguments) -> dict:
    """Time generation at each batch size; the result without writing it."""
    if args.quick:
        args.num_prompts, args.max_new_tokens, args.batch_sizes, args.repeats = 4, 4, "1,4", 1
    tokenizer = load_tokenizer(model_args)
    model = load_for_inference(model_args)
    model.generation_config.eos_token_id = None  # every row generates max_new_tokens tokens
    prompts = tokenized_prompts(tokenizer, resolve_template(tokenizer, None), args)
    rows = [time_generation(model, tokenizer, prompts, args, int(size))
            for size in args.batch_sizes.split(",")]
    for row in rows:
        row["speedup"] = round(row["tokens_per_s"] / rows[0]["tokens_per_s"], 2)
    return {"model": model_path(model_args), "parameters": model.num_parameters(), "device": str(model.device),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "settings": asdict(args), "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    model_args, args = parse_args((ModelArguments, BenchmarkArguments), argv)
    result = run_benchmark(model_args, args)
    print(table(result["rows"]))
    Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output_file).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    run_cli(main)

"""Evaluate a model on held-out data: perplexity on text, and answers to held-out questions.

Each run appends one row to --results_file (JSON lines) and prints the table of every row so far,
so a pipeline can compare stages:

    python evaluate.py --name base --perplexity_files data/pretrain/validation --results_file results.jsonl
    python evaluate.py --name sft --model_name_or_path outputs-pt --lora_model outputs-sft \
        --questions_file data/sft/validation --results_file results.jsonl
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from medicalgpt.args import DataArguments, ModelArguments, parse_args
from medicalgpt.data import build_pretraining_splits, load_splits, to_conversation, to_text
from medicalgpt.errors import run_cli
from medicalgpt.evaluation import perplexity
from medicalgpt.generation import generate
from medicalgpt.modeling import load_for_inference, load_tokenizer
from medicalgpt.templates import resolve_template


@dataclass
class EvalArguments:
    name: str = field(default="model", metadata={"help": "Row label in the results table."})
    lora_model: str | None = field(default=None, metadata={"help": "A LoRA adapter to apply to the model."})
    template_name: str | None = field(default=None, metadata={"help": "Chat template; default: the tokenizer's."})
    perplexity_files: str | None = field(default=None, metadata={"help": "Text files/dirs for perplexity."})
    block_size: int = field(default=256, metadata={"help": "Tokens per perplexity window."})
    questions_file: str | None = field(default=None, metadata={
        "help": "Conversation files/dirs: the model answers each last user turn; the reference is printed beside."})
    num_questions: int = field(default=5)
    max_new_tokens: int = field(default=64)
    batch_size: int = field(default=8)
    results_file: str | None = field(default=None, metadata={"help": "Append the metrics row here (JSON lines)."})


def _data(files: str) -> DataArguments:
    return DataArguments(train_file_dir=files, validation_split_percentage=0)


def text_perplexity(model, tokenizer, files: str, block_size: int, batch_size: int) -> float:
    splits = build_pretraining_splits(load_splits(_data(files), to_text), tokenizer, block_size)
    return perplexity(model, splits["train"]["input_ids"], batch_size)


def answer_questions(model, tokenizer, template, files: str, args: EvalArguments) -> list[dict]:
    conversations = load_splits(_data(files), to_conversation)["train"].select(range(args.num_questions))
    prompts = [template.encode_prompt(tokenizer, c["messages"][:-1]) for c in conversations]
    answers = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    return [{"question": c["messages"][-2]["content"], "reference": c["messages"][-1]["content"], "answer": a}
            for c, a in zip(conversations, answers, strict=True)]


def print_table(rows: list[dict]) -> None:
    columns = sorted({key for row in rows for key in row["metrics"]})
    print("| model | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for row in rows:
        cells = [f"{row['metrics'][c]:.3f}" if c in row["metrics"] else "" for c in columns]
        print(f"| {row['name']} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> dict:
    model_args, args = parse_args((ModelArguments, EvalArguments), argv)
    tokenizer = load_tokenizer(model_args)
    model = load_for_inference(model_args, args.lora_model)
    row = {"name": args.name, "metrics": {}, "samples": []}
    if args.perplexity_files:
        row["metrics"]["perplexity"] = text_perplexity(model, tokenizer, args.perplexity_files, args.block_size,
                                                       args.batch_size)
    if args.questions_file:
        template = resolve_template(tokenizer, args.template_name)
        row["samples"] = answer_questions(model, tokenizer, template, args.questions_file, args)
        for sample in row["samples"]:
            print(f"Q: {sample['question']}\n   reference: {sample['reference']}\n   {args.name}: {sample['answer']}")
    rows = [row]
    if args.results_file:
        path = Path(args.results_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    print_table(rows)
    return row


if __name__ == "__main__":
    run_cli(main)

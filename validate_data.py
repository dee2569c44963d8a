"""Check a dataset before training: read it exactly as a stage would and report, per file, the records, the
detected format, every problem by file:line and field, token-length percentiles with the stage's tokenizer and
chat template, how many samples --max_length would truncate and how many assistant turns would carry no loss.
Exits with status 1 when any record is bad.

    python validate_data.py data/sft/train --stage sft --max_length 512
    python validate_data.py data/preference/train --stage dpo --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct
"""

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

from medicalgpt.args import ModelArguments
from medicalgpt.data import find_data_files, iter_records, to_conversation, to_grpo, to_preference, to_text, to_unpaired
from medicalgpt.data.loading import LoadReport, iter_converted
from medicalgpt.data.processors import prompt_and_response
from medicalgpt.errors import run_cli
from medicalgpt.modeling import load_tokenizer
from medicalgpt.templates import ASSISTANT_SIDE, IGNORE_INDEX, resolve_template


def _tools(record: dict) -> list | None:
    return json.loads(record["tools"]) if record.get("tools") else None


def measure_text(record: dict, tokenizer, template, max_length: int) -> tuple[int, int]:
    """(tokens with the EOS that separates documents, 0): pretraining has no assistant turns."""
    return len(tokenizer.encode(record["text"], add_special_tokens=False)) + 1, 0


def trained_spans(labels: list[int]) -> list[int]:
    """Start positions of the runs of loss-carrying tokens (one per trained assistant turn)."""
    return [i for i, label in enumerate(labels) if label != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)]


def measure_conversation(record: dict, tokenizer, template, max_length: int) -> tuple[int, int]:
    """(tokens, assistant turns without a loss-carrying token once cut at max_length)."""
    ids, labels = template.encode(tokenizer, record["messages"], _tools(record))
    turns = sum(message["role"] in ASSISTANT_SIDE for message in record["messages"])
    return len(ids), turns - sum(start < max_length for start in trained_spans(labels))


def measure_answers(record: dict, answers: list[str], tokenizer, template) -> tuple[int, int]:
    """(prompt + the longest answer in tokens, 0)."""
    encoded = [prompt_and_response(tokenizer, template, record["messages"], _tools(record), a) for a in answers]
    return max(len(prompt) + len(answer) for prompt, answer in encoded), 0


def measure_pair(record: dict, tokenizer, template, max_length: int) -> tuple[int, int]:
    return measure_answers(record, [record["chosen"], record["rejected"]], tokenizer, template)


def measure_unpaired(record: dict, tokenizer, template, max_length: int) -> tuple[int, int]:
    return measure_answers(record, record["completions"], tokenizer, template)


def measure_prompt(record: dict, tokenizer, template, max_length: int) -> tuple[int, int]:
    """(prompt tokens with the generation prompt, 0)."""
    return len(template.encode_prompt(tokenizer, record["prompt"])), 0


# stage -> (the converter the stage reads with, how a record is measured)
STAGES: dict[str, tuple[Callable, Callable]] = {
    "pt": (to_text, measure_text), "sft": (to_conversation, measure_conversation),
    "rm": (to_preference, measure_pair), "dpo": (to_preference, measure_pair), "orpo": (to_preference, measure_pair),
    "kto": (to_unpaired, measure_unpaired), "grpo": (to_grpo, measure_prompt),
}


class AllProblems(LoadReport):
    """Counts every bad record and keeps the first `keep` problems (LoadReport keeps five)."""

    def __init__(self, keep: int):
        super().__init__()
        self.keep = keep

    def skip(self, problem: str) -> None:
        self.skipped += 1
        if len(self.problems) < self.keep:
            self.problems.append(problem)


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of a non-empty sorted list."""
    return sorted_values[max(0, math.ceil(q / 100 * len(sorted_values)) - 1)]


def validate_file(path: Path, args: argparse.Namespace, tokenizer, template) -> dict:
    """One file's report: records, format, problems, token lengths, truncation and loss-free assistant turns."""
    convert, measure = STAGES[args.stage]
    report, formats, lengths, no_loss = AllProblems(args.max_problems), set(), [], 0
    for _, kind, record in iter_converted(iter_records(path), convert, report, skip_bad_records=True):
        formats.add(kind)
        length, lost_turns = measure(record, tokenizer, template, args.max_length)
        lengths.append(length)
        no_loss += lost_turns
    lengths.sort()
    stats = {f"p{q}": percentile(lengths, q) for q in (50, 90, 99)} | {"max": lengths[-1]} if lengths else {}
    return {"file": str(path), "records": report.read, "bad": report.skipped, "format": ",".join(sorted(formats)),
            "problems": report.problems, "tokens": stats, "over_max_length": sum(n > args.max_length for n in lengths),
            "assistant_turns_without_loss": no_loss}


def print_report(result: dict, args: argparse.Namespace) -> None:
    tokens = ", ".join(f"{k} {v}" for k, v in result["tokens"].items()) or "none"
    turns = f"; {result['assistant_turns_without_loss']} assistant turns without loss" if args.stage == "sft" else ""
    print(f"{result['file']}: {result['records']} records ({result['format'] or 'no format'}), {result['bad']} bad; "
          f"tokens {tokens}; {result['over_max_length']} over --max_length {args.max_length}{turns}")
    for problem in result["problems"]:
        print(f"  {problem}")
    if result["bad"] > len(result["problems"]):
        print(f"  ... and {result['bad'] - len(result['problems'])} more")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("data", help="files or directories (searched recursively), comma-separated")
    parser.add_argument("--stage", choices=sorted(STAGES), required=True, help="the stage the data is for")
    parser.add_argument("--model_name_or_path", default=None, help="whose tokenizer counts tokens (default: the "
                        "embedded default model)")
    parser.add_argument("--template_name", default=None, help="chat template (default: the tokenizer's own)")
    parser.add_argument("--max_length", type=int, default=512, help="the training --max_length (PT: --block_size)")
    parser.add_argument("--max_problems", type=int, default=20, help="problems listed per file (all are counted)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_arguments(argv)
    files = find_data_files(args.data)
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=args.model_name_or_path))
    template = resolve_template(tokenizer, args.template_name) if args.stage != "pt" else None
    results = [validate_file(path, args, tokenizer, template) for path in files]
    for result in results:
        print_report(result, args)
    bad = sum(r["bad"] for r in results)
    print(f"{len(files)} files, {sum(r['records'] for r in results)} good records, {bad} bad")
    if bad:
        sys.exit(1)
    return results


if __name__ == "__main__":
    run_cli(main)

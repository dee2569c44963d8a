r"""Check a dataset before training: read it exactly as a stage would and report, per file, the records, the
detected format, every problem by file:line and field (tool calls too: invalid JSON, a tool not in `tools`, a
required argument missing), token-length percentiles with the stage's tokenizer and
chat template, how many samples --max_length would truncate and how many assistant turns would carry no loss, and
for the preference stages what --long_pairs truncate would cut and --long_pairs drop would drop. Exits with
status 1 when any record is bad.

    python validate_data.py data/sft/train --stage sft --max_length 512
    python validate_data.py data/preference/train --stage dpo --max_length 1024 \
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct
"""

import argparse
import json
import math
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from medicalgpt.args import ModelArguments
from medicalgpt.data import (
    LengthLimits,
    find_data_files,
    iter_records,
    to_conversation,
    to_grpo,
    to_preference,
    to_text,
    to_unpaired,
)
from medicalgpt.data.loading import LoadReport, iter_converted
from medicalgpt.data.processors import encode_responses, fit_lengths, shorter_prompts
from medicalgpt.errors import DataError, run_cli
from medicalgpt.modeling import load_tokenizer
from medicalgpt.templates import ASSISTANT_SIDE, IGNORE_INDEX, resolve_template
from medicalgpt.tool_calls import schema_problems


def _tools(record: dict) -> list | None:
    return json.loads(record["tools"]) if record.get("tools") else None


def with_tool_checks(convert: Callable) -> Callable:
    """convert, and then the record's tool calls checked against its tools (a call of a tool not in tools, or one
    missing a required argument, is a problem of that record)."""
    def checked(raw: object) -> dict:
        record = convert(raw)
        answers = {f"completions[{i}]": c for i, c in enumerate(record.get("completions") or [])}
        answers |= {key: record[key] for key in ("chosen", "rejected") if key in record}
        if problems := schema_problems(record.get("messages") or [], _tools(record) or [], answers):
            raise DataError("; ".join(problems))
        return record

    return checked


def measure_text(record: dict, tokenizer, template, args: argparse.Namespace) -> tuple[int, dict]:
    """Tokens with the EOS that separates documents; pretraining has no assistant turns."""
    return len(tokenizer.encode(record["text"], add_special_tokens=False)) + 1, {}


def trained_spans(labels: list[int]) -> list[int]:
    """Start positions of the runs of loss-carrying tokens (one per trained assistant turn)."""
    return [i for i, label in enumerate(labels) if label != IGNORE_INDEX and (i == 0 or labels[i - 1] == IGNORE_INDEX)]


def measure_conversation(record: dict, tokenizer, template, args: argparse.Namespace) -> tuple[int, dict]:
    """Tokens, and the assistant turns without a loss-carrying token once cut at --max_length."""
    ids, labels = template.encode(tokenizer, record["messages"], _tools(record))
    turns = sum(message["role"] in ASSISTANT_SIDE for message in record["messages"])
    return len(ids), {"assistant_turns_without_loss": turns - sum(start < args.max_length
                                                                  for start in trained_spans(labels))}


def measure_answers(record: dict, answers: list[str], tokenizer, template,
                    args: argparse.Namespace) -> tuple[int, dict]:
    """Prompt + the longest answer in tokens, and what the stage would do to the record (a KTO record: to each of
    its rows) with --long_pairs truncate (prompts_cut, answers_cut, answer_tokens_cut) or drop (dropped_by_drop)."""
    limits = LengthLimits(args.max_length, args.max_source_length, args.max_target_length)
    rows = [[answer] for answer in answers] if args.stage == "kto" else [answers]
    counts = dict.fromkeys(("prompts_cut", "answers_cut", "answer_tokens_cut", "dropped_by_drop"), 0)
    length = 0
    for responses in rows:
        prompt, response_ids = encode_responses(record, tokenizer, template, responses)
        length = max(length, len(prompt) + max(map(len, response_ids)))
        fitted = fit_lengths(prompt, response_ids, shorter_prompts(record, tokenizer, template, responses[0]), limits)
        counts["prompts_cut"] += fitted.prompt_cut
        counts["answers_cut"] += fitted.answers_cut
        counts["answer_tokens_cut"] += sum(map(len, response_ids)) - sum(map(len, fitted.responses))
        counts["dropped_by_drop"] += limits.over(prompt, response_ids)
    return length, counts


def measure_pair(record: dict, tokenizer, template, args: argparse.Namespace) -> tuple[int, dict]:
    return measure_answers(record, [record["chosen"], record["rejected"]], tokenizer, template, args)


def measure_unpaired(record: dict, tokenizer, template, args: argparse.Namespace) -> tuple[int, dict]:
    return measure_answers(record, record["completions"], tokenizer, template, args)


def measure_prompt(record: dict, tokenizer, template, args: argparse.Namespace) -> tuple[int, dict]:
    """Prompt tokens with the generation prompt."""
    return len(template.encode_prompt(tokenizer, record["prompt"])), {}


# stage -> (the converter the stage reads with, how a record is measured)
STAGES: dict[str, tuple[Callable, Callable]] = {
    "pt": (to_text, measure_text), "sft": (to_conversation, measure_conversation),
    "rm": (to_preference, measure_pair), "dpo": (to_preference, measure_pair), "orpo": (to_preference, measure_pair),
    "cpo": (to_preference, measure_pair), "kto": (to_unpaired, measure_unpaired), "grpo": (to_grpo, measure_prompt),
}
PREFERENCE_STAGES = ("rm", "dpo", "orpo", "cpo", "kto")
# The stages' own defaults (PT: --block_size; the preference stages: TRL's --max_length), so that a check without
# --max_length predicts a training run without it.
DEFAULT_MAX_LENGTH = {"pt": 512, "sft": 512, "grpo": 512} | dict.fromkeys(PREFERENCE_STAGES, 1024)


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
    report, formats, lengths, counts = AllProblems(args.max_problems), set(), [], Counter()
    for _, kind, record in iter_converted(iter_records(path), with_tool_checks(convert), report,
                                          skip_bad_records=True):
        formats.add(kind)
        length, record_counts = measure(record, tokenizer, template, args)
        lengths.append(length)
        counts.update(record_counts)
    lengths.sort()
    stats = {f"p{q}": percentile(lengths, q) for q in (50, 90, 99)} | {"max": lengths[-1]} if lengths else {}
    return {"file": str(path), "records": report.read, "bad": report.skipped, "format": ",".join(sorted(formats)),
            "problems": report.problems, "tokens": stats, "over_max_length": sum(n > args.max_length for n in lengths),
            **counts}


def print_report(result: dict, args: argparse.Namespace) -> None:
    tokens = ", ".join(f"{k} {v}" for k, v in result["tokens"].items()) or "none"
    details = ""
    if args.stage == "sft":
        details = f"; {result.get('assistant_turns_without_loss', 0)} assistant turns without loss"
    elif args.stage in PREFERENCE_STAGES:
        unit = "rows" if args.stage == "kto" else "pairs"
        details = (f"; --long_pairs truncate cuts the prompt of {result.get('prompts_cut', 0)} {unit} and the answers "
                   f"of {result.get('answers_cut', 0)} ({result.get('answer_tokens_cut', 0)} answer tokens), "
                   f"--long_pairs drop drops {result.get('dropped_by_drop', 0)} {unit}")
    print(f"{result['file']}: {result['records']} records ({result['format'] or 'no format'}), {result['bad']} bad; "
          f"tokens {tokens}; {result['over_max_length']} over --max_length {args.max_length}{details}")
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
    parser.add_argument("--max_length", type=int, default=None, help="the training --max_length (PT: --block_size); "
                        "default: the stage's default, 512 for pt/sft/grpo, 1024 for the preference stages")
    parser.add_argument("--max_source_length", type=int, default=None, help="preference stages: the training "
                        "--max_source_length")
    parser.add_argument("--max_target_length", type=int, default=None, help="preference stages: the training "
                        "--max_target_length")
    parser.add_argument("--max_problems", type=int, default=20, help="problems listed per file (all are counted)")
    args = parser.parse_args(argv)
    args.max_length = args.max_length or DEFAULT_MAX_LENGTH[args.stage]
    return args


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

"""Convert datasets between formats, streaming: a multi-GB file converts in constant memory.

Conversations: Alpaca <-> ShareGPT <-> OpenAI messages. Preference pairs: between the same three shapes
(MedicalGPT's reward files are the ShareGPT shape). CSV/TSV with named question/answer columns become SFT
conversations. The container follows OUTPUT's suffix: .jsonl (one record per line), .json (one array) or .txt
(pretraining text only). Every record is read and checked by the stages' own data layer, so errors name file,
line and field, and the output reads back to the same records.

    python convert_dataset.py data/sft/train/alpaca_medical.jsonl sft_sharegpt.jsonl --to sharegpt
    python convert_dataset.py data/preference/train pairs.json --to openai
    python convert_dataset.py qa.csv sft.jsonl --to openai --question_column question --answer_column answer
    python convert_dataset.py corpus.json corpus.jsonl                   # json -> jsonl, records unchanged
"""

import argparse
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from medicalgpt.data import detect_format, find_data_files, iter_records, to_conversation, to_preference, to_text
from medicalgpt.data.loading import LoadReport, iter_converted
from medicalgpt.data.writers import STYLES, write_conversation, write_preference
from medicalgpt.errors import DataError, UsageError, run_cli
from medicalgpt.files import write_lines

TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t"}
OUTPUT_SUFFIXES = (".jsonl", ".json", ".txt")
WRITERS = {"conversation": write_conversation, "preference": write_preference}


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("input", help="files or directories (comma-separated): .json/.jsonl/.txt/.parquet/.csv/.tsv")
    parser.add_argument("output", help="the converted file: .jsonl, .json or .txt")
    parser.add_argument("--to", choices=("keep", *STYLES), default="keep",
                        help="record format to write; keep = as read (only the container changes)")
    parser.add_argument("--question_column", default="question", help="CSV/TSV column with the user's question")
    parser.add_argument("--answer_column", default="answer", help="CSV/TSV column with the answer")
    parser.add_argument("--system_column", default=None, help="CSV/TSV column with a system prompt (optional)")
    parser.add_argument("--skip_bad_records", action="store_true", help="skip and count bad records instead of "
                        "stopping at the first")
    return parser.parse_args(argv)


def table_records(path: Path, args: argparse.Namespace) -> Iterator[tuple[str, object]]:
    """CSV/TSV rows as Alpaca-shaped raw records (or a DataError naming the row), read row by row."""
    csv.field_size_limit(sys.maxsize)  # a long answer is data, not an error
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=TABLE_DELIMITERS[path.suffix])
        columns = [args.question_column, args.answer_column] + ([args.system_column] if args.system_column else [])
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise UsageError(f"{path}: no column {', '.join(missing)}; columns: {', '.join(reader.fieldnames or [])}")
        last_line = reader.line_num
        for row in reader:
            location, last_line = f"{path}:{last_line + 1}", reader.line_num  # the row's first line (it may span more)
            empty = [c for c in columns[:2] if not (row[c] or "").strip()]
            if empty:
                yield location, DataError(f"{empty[0]}: empty")
                continue
            system = {"system": row[args.system_column]} if args.system_column else {}
            yield location, {"instruction": row[args.question_column], "output": row[args.answer_column], **system}


def source_records(spec: str, args: argparse.Namespace) -> Iterator[tuple[Path, Iterator]]:
    """(path, located raw records) for every input file; tables by their suffix, the rest by the data layer."""
    parts = [Path(p.strip()) for p in spec.split(",") if p.strip()]
    for part in parts:
        if part.suffix in TABLE_DELIMITERS and part.is_file():
            yield part, table_records(part, args)
        else:
            yield from ((path, iter_records(path)) for path in find_data_files(str(part)))


def normalise(raw: object) -> dict:
    """A raw record as {"kind": text|conversation|preference, "record": normalised, "raw": as read}."""
    kind = detect_format(raw)
    if kind == "text":
        return {"kind": "text", "record": to_text(raw), "raw": raw}
    if kind == "question":
        raise DataError("question: GRPO question/answer records have no other format to convert to")
    if isinstance(raw, dict) and "chosen" in raw:
        return {"kind": "preference", "record": to_preference(raw), "raw": raw}
    return {"kind": "conversation", "record": to_conversation(raw), "raw": raw}


def render(item: dict, style: str) -> dict:
    """The record to write: as read (keep), or rewritten in style."""
    if style == "keep":
        return item["raw"]
    if item["kind"] == "text":
        raise DataError(f"text: pretraining text has no {style} form; use --to keep")
    return WRITERS[item["kind"]](item["record"], style)


def serialise(record: dict, suffix: str) -> str:
    """One record as its text in the output file."""
    if suffix != ".txt":
        return json.dumps(record, ensure_ascii=False)
    if detect_format(record) != "text":
        raise DataError(f"{detect_format(record)}: only pretraining text can be written to .txt; write .jsonl")
    if "\n" in record["text"] or "\r" in record["text"]:
        raise DataError("text: a document with line breaks cannot be one .txt line; write .jsonl")
    return record["text"]


def converted_lines(args: argparse.Namespace, suffix: str, report: LoadReport) -> Iterator[str]:
    """The output file's records as text, one at a time, all of one format (a file holds one format)."""
    def convert(raw: object) -> tuple[str, str]:
        item = normalise(raw)
        return item["kind"], serialise(render(item, args.to), suffix)

    output_format = None
    for path, located in source_records(args.input, args):
        for location, detected, (kind, line) in iter_converted(located, convert, report, args.skip_bad_records):
            this_format = detected if args.to == "keep" else kind
            if output_format not in (None, this_format):
                raise DataError(f"{location}: {this_format} records after {output_format} records: one output "
                                f"file holds one format (convert {path} separately)")
            output_format = this_format
            yield line


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(argv)
    output = Path(args.output)
    if output.suffix not in OUTPUT_SUFFIXES:
        raise UsageError(f"{output}: the output must end in {', '.join(OUTPUT_SUFFIXES)}")
    output.parent.mkdir(parents=True, exist_ok=True)
    report = LoadReport()
    written = write_lines(converted_lines(args, output.suffix, report), output)
    skipped = f"; skipped {report.skipped} bad records, first ones:\n  " + "\n  ".join(report.problems)
    print(f"Wrote {written} records to {output} ({args.to})" + (skipped if report.skipped else ""))
    return {"written": written, "skipped": report.skipped}


if __name__ == "__main__":
    run_cli(main)

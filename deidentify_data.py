"""De-identify training data: replace names, ID numbers, phones, emails, dates, addresses and record numbers.

Reads every format the stages read (pretraining text, ShareGPT / OpenAI / Alpaca conversations, preference pairs,
KTO and GRPO records; .txt/.json/.jsonl/.parquet) and writes the same records, in the same format and container, with
PHI replaced by typed placeholders ([NAME], [ID], [PHONE], [DATE], [ADDRESS], [MRN], [EMAIL]) or, with --surrogates,
by consistent fake values (one person keeps one fake name within a record). Drug names, doses, lab values, diagnoses
and departments stay. Prints file:line, field and character range of every replacement (never the PHI itself) and
the counts per type. A bad record stops the run with its file:line, or is skipped with --skip_bad_records.

    python deidentify_data.py notes.jsonl notes.deid.jsonl
    python deidentify_data.py data/sft/train deid/sft/train --surrogates     # a directory: the same tree
    python deidentify_data.py notes.jsonl out.jsonl --dry_run                # report only, write nothing
    python deidentify_data.py --evaluate data/privacy/phi_eval.jsonl         # precision / recall per type
"""

import argparse
import json
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path

from medicalgpt.data import (
    detect_format,
    find_data_files,
    iter_records,
    to_conversation,
    to_grpo,
    to_preference,
    to_rl_prompts,
    to_text,
    to_unpaired,
)
from medicalgpt.data.loading import LoadReport, iter_converted
from medicalgpt.errors import UsageError, run_cli
from medicalgpt.files import write_lines
from medicalgpt.privacy import PHI_TYPES, Deidentifier, evaluate_detection


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("input", nargs="?", help="a data file, or a directory (searched recursively)")
    parser.add_argument("output", nargs="?", help="the de-identified file (same suffix), or directory for a directory")
    parser.add_argument("--surrogates", action="store_true", help="consistent fake values instead of [TYPE] "
                        "placeholders")
    parser.add_argument("--dry_run", action="store_true", help="report what would be replaced; write nothing")
    parser.add_argument("--skip_bad_records", action="store_true", help="skip and count bad records instead of "
                        "stopping at the first")
    parser.add_argument("--keep_terms", help="a file of medical terms (one a line) never to mask, on top of the "
                        "knowledge table's")
    parser.add_argument("--ner_model", help="local path of a transformers token-classification model whose PER "
                        "entities add name detection (English names beyond the cue rules)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the surrogate values")
    parser.add_argument("--evaluate", metavar="LABELLED_JSONL", help="print precision/recall per type on a labelled "
                        "set (data/privacy/phi_eval.jsonl) instead of de-identifying")
    args = parser.parse_args(argv)
    if not args.evaluate and not (args.input and args.output):
        parser.error("give INPUT and OUTPUT, or --evaluate LABELLED_JSONL")
    return args


def check_record(raw: dict) -> dict:
    """The record as read, once the stage that would read it accepts it (its DataError names the field)."""
    kind = detect_format(raw)
    if "chosen" in raw:
        to_preference(raw)
    elif "label" in raw:
        to_unpaired(raw)
    elif "answer" in raw:
        to_grpo(raw)
    elif kind == "text":
        to_text(raw)
    elif kind == "prompt":
        to_rl_prompts(raw)
    else:
        to_conversation(raw)
    return raw


def output_paths(input_spec: str, output: str) -> list[tuple[Path, Path]]:
    """(input file, output file) pairs: a file maps to output, a directory's files to the same tree under output."""
    source = Path(input_spec)
    if source.is_file():
        if Path(output).suffix != source.suffix:
            raise UsageError(f"{output}: write {source.suffix} like the input (the container is kept)")
        return [(source, Path(output))]
    return [(path, Path(output) / path.relative_to(source)) for path in find_data_files(input_spec)]


def write_records(records: Iterator[dict], path: Path) -> None:
    """Text and JSON stream record by record into path.part, renamed when complete; Parquet is one table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(list(records)), path)
    elif path.suffix == ".txt":
        write_lines((record["text"] for record in records), path)
    else:
        write_lines((json.dumps(record, ensure_ascii=False) for record in records), path)


def deidentify_file(path: Path, deidentifier: Deidentifier, report: LoadReport, args: argparse.Namespace,
                    counts: Counter) -> Iterator[dict]:
    """The file's de-identified records; prints each replacement as '<file>:<line>: <field>[start:end] TYPE'."""
    for location, _, record in iter_converted(iter_records(path), check_record, report, args.skip_bad_records):
        clean, found = deidentifier.deidentify_record(record)
        for field_path, span in found:
            print(f"{location}: {field_path}[{span.start}:{span.end}] {span.kind}")
            counts[span.kind] += 1
        yield clean


def print_evaluation(deidentifier: Deidentifier, labelled: Path) -> dict:
    records = [json.loads(line) for line in labelled.read_text(encoding="utf-8").splitlines() if line.strip()]
    results = {lang: evaluate_detection(deidentifier, [r for r in records if lang in (r["lang"], "all")])
               for lang in ("zh", "en", "all")}
    print("| type | language | labelled | precision | recall | masked (any type) |\n|---|---|---|---|---|---|")
    for kind in PHI_TYPES:
        for lang, result in results.items():
            row = result["per_type"][kind]
            print(f"| {kind} | {lang} | {row['labelled']} | {row['precision']:.3f} | {row['recall']:.3f} | "
                  f"{row['masked']:.3f} |")
    for lang, result in results.items():
        print(f"{lang}: {result['records']} records, medical terms left intact: {result['medical_terms_intact']:.3f} "
              f"of {result['medical_terms']}")
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(argv)
    keep_terms = Path(args.keep_terms).read_text(encoding="utf-8").splitlines() if args.keep_terms else ()
    deidentifier = Deidentifier(args.surrogates, args.ner_model, keep_terms, args.seed)
    if args.evaluate:
        return print_evaluation(deidentifier, Path(args.evaluate))
    report, counts = LoadReport(), Counter()
    for source, target in output_paths(args.input, args.output):
        records = deidentify_file(source, deidentifier, report, args, counts)
        if args.dry_run:
            deque(records, maxlen=0)  # read and report only
        else:
            write_records(records, target)
    summary = ", ".join(f"{kind} {counts[kind]}" for kind in PHI_TYPES) + f" in {report.read} records"
    skipped = f"; skipped {report.skipped} bad records, first ones:\n  " + "\n  ".join(report.problems)
    action = "Would replace" if args.dry_run else f"Replaced ({args.output})"
    print(f"{action}: {summary}" + (skipped if report.skipped else ""))
    return {"counts": dict(counts), "records": report.read, "skipped": report.skipped}


if __name__ == "__main__":
    run_cli(main)

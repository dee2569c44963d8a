"""SFT data preprocessing throughput through medicalgpt.data: records/s for reading with format detection and
conversion (load_splits), then chat templating, tokenisation and loss masking (build_sft_splits).

The synthetic set is the shipped data/sft/train files (Alpaca, OpenAI-messages and ShareGPT), each repeated to a
third of --records with a numbered question so no two records are equal, written to a temporary folder.

    python -m benchmarks.preprocessing --records 100000
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from benchmarks.training import REPO
from medicalgpt.args import SFTDataArguments
from medicalgpt.data import build_sft_splits, load_splits, to_conversation
from medicalgpt.default_model import ensure_default_model
from medicalgpt.templates import resolve_template

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


def measure_preprocessing(count: int, max_length: int = 512) -> dict:
    """Records/s of each phase on `count` synthetic records, with the default model's tokenizer and template."""
    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    template = resolve_template(tokenizer, None)
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic(Path(tmp), count)
        start = time.perf_counter()
        splits = load_splits(SFTDataArguments(train_file_dir=tmp, validation_split_percentage=0), to_conversation)
        loaded = time.perf_counter()
        encoded = build_sft_splits(splits, tokenizer, template, max_length)
        done = time.perf_counter()
    records = len(splits["train"])
    return {"records": records, "tokens": sum(map(len, encoded["train"]["input_ids"])),
            "convert_records_per_s": records / (loaded - start),
            "template_records_per_s": records / (done - loaded), "records_per_s": records / (done - start)}


def table(row: dict) -> str:
    return ("| records | tokens | read + convert (records/s) | template + mask (records/s) | overall (records/s) |\n"
            "|---|---|---|---|---|\n"
            f"| {row['records']} | {row['tokens']} | {row['convert_records_per_s']:.0f} | "
            f"{row['template_records_per_s']:.0f} | {row['records_per_s']:.0f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    print(table(measure_preprocessing(parser.parse_args().records)))

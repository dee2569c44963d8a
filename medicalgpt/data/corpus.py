"""The plain text of any dataset the stages read, line by line: for tokenizer training and comparison."""

from collections.abc import Iterator

from medicalgpt.data.formats import to_conversation, to_preference, to_text
from medicalgpt.data.loading import LoadReport, iter_converted
from medicalgpt.data.readers import find_data_files, iter_records
from medicalgpt.errors import DataError


def record_texts(record: object) -> dict:
    """The text of a record of any stage: a document, a conversation's turns, or a pair's prompt and answers."""
    if isinstance(record, dict) and "chosen" in record:
        pair = to_preference(record)
        return {"texts": [m["content"] for m in pair["messages"]] + [pair["chosen"], pair["rejected"]]}
    if isinstance(record, dict) and "text" in record:
        return {"texts": [to_text(record)["text"]]}
    return {"texts": [m["content"] for m in to_conversation(record)["messages"]]}


def corpus_lines(spec: str, skip_bad_records: bool = False) -> Iterator[str]:
    """Every non-blank line of every record's text, streamed (both trainers treat a line as a sentence)."""
    report = LoadReport()
    for path in find_data_files(spec):
        for _, _, record in iter_converted(iter_records(path), record_texts, report, skip_bad_records):
            yield from (line for text in record["texts"] for line in text.splitlines() if line.strip())
    if report.read == 0:
        raise DataError(f"{spec}: no usable records")

"""Read raw records from local files, each tagged with where it came from (file and line).

Every reader streams: a multi-GB file is read record by record (convert_dataset.py relies on it).
"""

import codecs
import json
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from medicalgpt.errors import DataError

DATA_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet")


def find_data_files(spec: str) -> list[Path]:
    """Data files named by a comma-separated list of files and directories (searched recursively)."""
    files: list[Path] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        path = Path(part)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in DATA_SUFFIXES)
            if not found:
                raise DataError(f"{path}: no data files ({', '.join(DATA_SUFFIXES)}) in this directory")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in DATA_SUFFIXES:
                raise DataError(f"{path}: unsupported file type; expected one of {', '.join(DATA_SUFFIXES)}")
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or directory")
    return files


def _decoded_lines(path: Path) -> Iterator[tuple[int, str | DataError]]:
    """Non-blank lines with their 1-based numbers; a line that is not UTF-8 comes as a DataError."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield number, DataError(f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if line.strip():
                yield number, line


def _json_lines(path: Path) -> Iterator[tuple[str, object]]:
    for number, line in _decoded_lines(path):
        try:
            yield f"{path}:{number}", line if isinstance(line, DataError) else json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as e:
            yield f"{path}:{number}", DataError(f"invalid JSON: {e.msg} (column {e.colno})")


class _ArrayStream:
    """A JSON array's records decoded one at a time from 1 MiB chunks: memory for one record, not the file."""

    def __init__(self, path: Path, chunk_size: int = 1 << 20):
        self.path, self.chunk_size = path, chunk_size
        self.file = path.open("rb")
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.buffer, self.pos, self.bytes_read, self.eof = "", 0, 0, False
        # For error positions: chars dropped from the buffer, the current line and where it starts (in chars).
        self.dropped, self.line, self.line_start = 0, 1, 0

    def read_more(self) -> bool:
        """Append the next chunk, dropping what was consumed; False at the end of the file."""
        if self.eof:
            return False
        chunk = self.file.read(self.chunk_size)
        self.eof = not chunk
        try:
            text = self.utf8.decode(chunk, final=self.eof)
        except UnicodeDecodeError as e:
            raise DataError(f"{self.path}: not valid UTF-8 ({e.reason} at byte {self.bytes_read + e.start})") from None
        self.bytes_read += len(chunk)
        self.dropped += self.pos
        self.buffer, self.pos = self.buffer[self.pos:] + text, 0
        return True

    def advance(self, end: int) -> None:
        self.line, self.line_start = self.position(end)
        self.pos = end

    def position(self, pos: int) -> tuple[int, int]:
        """The line of buffer position pos, and where that line starts."""
        newline = self.buffer.rfind("\n", self.pos, pos)
        line_start = self.line_start if newline < 0 else self.dropped + newline + 1
        return self.line + self.buffer.count("\n", self.pos, pos), line_start

    def next_char(self) -> str:
        """The next non-whitespace character ('' at the end), left unconsumed."""
        while True:
            stripped = len(self.buffer) - len(self.buffer[self.pos:].lstrip())
            self.advance(stripped)
            if self.pos < len(self.buffer) or not self.read_more():
                return self.buffer[self.pos: self.pos + 1]

    def expect(self, chars: str) -> str:
        char = self.next_char()
        if char not in chars or not char:
            self.fail(f"expected {' or '.join(repr(c) for c in chars)}, got {char or 'the end of the file'!r}")
        self.advance(self.pos + 1)
        return char

    def fail(self, message: str, pos: int | None = None) -> NoReturn:
        pos = self.pos if pos is None else pos
        line, line_start = self.position(pos)
        column = self.dropped + pos - line_start + 1
        raise DataError(f"{self.path}:{line}: invalid JSON: {message} (column {column})")

    def value(self) -> object:
        """The next JSON value; a value that may continue in the next chunk is decoded again with it."""
        self.next_char()  # raw_decode does not skip leading whitespace
        while True:
            try:
                record, end = json.JSONDecoder().raw_decode(self.buffer, self.pos)
                if end < len(self.buffer) or self.eof:
                    self.advance(end)
                    return record
            except json.JSONDecodeError as e:
                if self.eof:
                    self.fail(e.msg, e.pos)
            self.read_more()

    def records(self) -> Iterator[object]:
        with self.file:
            self.expect("[")
            if self.next_char() == "]":
                self.advance(self.pos + 1)
            else:
                yield self.value()
                while self.expect(",]") == ",":
                    yield self.value()
            if self.next_char():
                self.fail("extra data after the array")


def _json_array(path: Path) -> Iterator[tuple[str, object]]:
    for index, record in enumerate(_ArrayStream(path).records()):
        yield f"{path}[record {index}]", record


def iter_records(path: Path) -> Iterator[tuple[str, object]]:
    """(location, record) pairs: a .txt line becomes {"text": line}; .json may be an array or JSON lines.

    A record that cannot be parsed comes as a DataError, so the caller can report or skip it.
    """
    if path.suffix == ".txt":
        for number, line in _decoded_lines(path):
            yield f"{path}:{number}", line if isinstance(line, DataError) else {"text": line.rstrip("\r\n")}
    elif path.suffix == ".jsonl":
        yield from _json_lines(path)
    elif path.suffix == ".json":
        with path.open("rb") as f:
            starts_array = f.read(4096).lstrip().startswith(b"[")
        yield from (_json_array(path) if starts_array else _json_lines(path))
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = (row for batch in pq.ParquetFile(path).iter_batches(batch_size=1024) for row in batch.to_pylist())
        for index, record in enumerate(rows):
            yield f"{path}[row {index}]", record
    else:
        raise DataError(f"{path}: unsupported file type")

"""Read raw records from local files, each tagged with where it came from (file and line)."""

import json
from collections.abc import Iterator
from pathlib import Path

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


def _json_array(path: Path) -> Iterator[tuple[str, object]]:
    try:
        records = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: a .json file must hold a list of records (or one JSON object per line)")
    for index, record in enumerate(records):
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

        for index, record in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}[row {index}]", record
    else:
        raise DataError(f"{path}: unsupported file type")

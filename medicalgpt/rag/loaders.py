"""Documents as text passages with where each came from (page or line): .txt/.md, .pdf (pypdf), .docx
(python-docx), .jsonl. A file that cannot be read raises SkippedFile with a reason for the one-line warning."""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DOCUMENT_SUFFIXES = (".txt", ".md", ".pdf", ".docx", ".jsonl")
JSONL_TEXT_FIELDS = ("text", "content", "body")  # the field a .jsonl record's text is read from, first found


@dataclass
class Passage:
    text: str
    page: int | None = None  # 1-based, for PDFs
    line: int | None = None  # 1-based: the line of a text or .jsonl file, the paragraph of a .docx


class SkippedFile(Exception):
    """A document that is left out of the index; the message says why."""


def find_documents(paths: list[Path]) -> list[Path]:
    """The documents named: files as given, directories searched recursively for the supported suffixes."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in DOCUMENT_SUFFIXES)
        elif path.is_file():
            found.append(path)
    return found


def _text(data: bytes) -> str:
    """UTF-8 text; a NUL byte or undecodable bytes mean a binary file with a text extension."""
    if b"\x00" in data:
        raise SkippedFile("binary content (NUL bytes) in a text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise SkippedFile(f"not UTF-8 text ({error.reason} at byte {error.start})") from None


def _text_passages(data: bytes) -> Iterator[Passage]:
    for number, line in enumerate(_text(data).splitlines(), start=1):
        yield Passage(line, line=number)


def _jsonl_passages(data: bytes) -> Iterator[Passage]:
    for number, line in enumerate(_text(data).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SkippedFile(f"line {number}: invalid JSON ({error.msg})") from None
        if isinstance(record, dict):
            text = next((record[k] for k in JSONL_TEXT_FIELDS if isinstance(record.get(k), str)), None)
            # Without a text field, every string value: a record of facts (a drug label) is its text.
            text = text if text is not None else " ".join(v for v in record.values() if isinstance(v, str))
        else:
            text = record if isinstance(record, str) else ""
        yield Passage(text, line=number)


def _pdf_passages(path: Path) -> Iterator[Passage]:
    from pypdf import PdfReader

    try:
        reader = PdfReader(path)
        # An encrypted PDF with an empty user password opens without one (common for "protected" PDFs).
        if reader.is_encrypted and not reader.decrypt(""):
            raise SkippedFile("encrypted PDF (needs a password): save a decrypted copy")
        pages = [page.extract_text() or "" for page in reader.pages]
    except SkippedFile:
        raise
    except Exception as error:  # a malformed file can fail anywhere in the parser; it must not stop the index
        raise SkippedFile(f"unreadable PDF ({type(error).__name__}: {error})") from None
    if not any(text.strip() for text in pages):
        raise SkippedFile("no text layer in this PDF (a scan?): OCR it first")
    for number, text in enumerate(pages, start=1):
        yield Passage(text, page=number)


def _docx_passages(path: Path) -> Iterator[Passage]:
    import docx

    try:
        document = docx.Document(str(path))
    except Exception as error:  # as for PDFs: whatever the parser raises, this file is skipped, not the index
        raise SkippedFile(f"unreadable .docx ({type(error).__name__}: {error})") from None
    paragraphs = [p.text for p in document.paragraphs]
    paragraphs += [cell.text for table in document.tables for row in table.rows for cell in row.cells]
    for number, text in enumerate(paragraphs, start=1):
        yield Passage(text, line=number)


def load_document(path: Path, max_bytes: int) -> list[Passage]:
    """The non-empty passages of one document; SkippedFile says why a file cannot be indexed."""
    suffix = path.suffix.lower()
    if suffix not in DOCUMENT_SUFFIXES:
        raise SkippedFile(f"unsupported file type; expected one of {', '.join(DOCUMENT_SUFFIXES)}")
    size = path.stat().st_size
    if size == 0:
        raise SkippedFile("empty file")
    if size > max_bytes:
        raise SkippedFile(f"{size / 2**20:.0f} MB is over --max_file_mb {max_bytes / 2**20:g}: split it or raise "
                          "the limit")
    if suffix == ".pdf":
        passages = _pdf_passages(path)
    elif suffix == ".docx":
        passages = _docx_passages(path)
    elif suffix == ".jsonl":
        passages = _jsonl_passages(path.read_bytes())
    else:
        passages = _text_passages(path.read_bytes())
    kept = [p for p in passages if p.text.strip()]
    if not kept:
        raise SkippedFile("no text in it")
    return kept

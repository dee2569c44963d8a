"""Sentence-aware chunks of Chinese and English text, sized in tokens.

A token here is a Han character, a word or number, or a punctuation mark: close to what a subword tokenizer makes
of Chinese, and within ~1.5x of it for English, without tying the index to one chat model's tokenizer.
"""

import re
from dataclasses import dataclass

from medicalgpt.rag.loaders import Passage

HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
TOKEN = re.compile(rf"[{HAN}]|[^\W_]+|[^\w\s]", re.UNICODE)
# A sentence ends at Chinese or English end punctuation (a full stop only before a space: "2.5 mg" stays whole).
SENTENCE = re.compile(r".+?(?:[。！？；!?;]+[”’\"')）]*|\.(?=\s)|$)\s*", re.DOTALL)


@dataclass
class Chunk:
    text: str
    page: int | None = None
    line: int | None = None


def count_tokens(text: str) -> int:
    return len(TOKEN.findall(text))


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE.findall(text) if s.strip()]


def _pieces(sentence: str, size: int) -> list[str]:
    """A sentence longer than a chunk, cut every `size` tokens."""
    starts = [m.start() for m in TOKEN.finditer(sentence)]
    return [sentence[starts[i]: starts[i + size] if i + size < len(starts) else None].strip()
            for i in range(0, len(starts), size)]


def _join(sentences: list[tuple[str, Passage]]) -> str:
    """Sentences of one passage run on (Chinese without a space); a new passage (line, page) starts a new line."""
    text, previous = "", None
    for sentence, passage in sentences:
        if previous is not None:
            cjk = re.match(rf"[{HAN}，。！？；：“”（）]", text[-1]) or re.match(rf"[{HAN}]", sentence[:1])
            text += "\n" if passage is not previous else "" if cjk else " "
        text, previous = text + sentence, passage
    return text


def chunk_passages(passages: list[Passage], size: int = 200, overlap: int = 40) -> list[Chunk]:
    """Consecutive sentences packed into chunks of at most `size` tokens; each chunk starts with the last sentences
    (up to `overlap` tokens) of the one before, and is located at its first new sentence's page or line. A new page
    starts a new chunk, so that a page cited is the page the text is on."""
    if size < 1 or not 0 <= overlap < size:
        raise ValueError(f"chunk size {size} and overlap {overlap}: need size >= 1 and 0 <= overlap < size")
    sentences = [(piece, passage) for passage in passages for sentence in split_sentences(passage.text)
                 for piece in _pieces(sentence, size)]
    chunks: list[Chunk] = []
    current: list[tuple[str, Passage, int]] = []  # (sentence, its passage, tokens) of the chunk being filled
    fresh = 0  # where the chunk's own sentences start, after the overlap: its page or line is theirs
    for text, passage in sentences:
        tokens = count_tokens(text)
        new_page = current and passage.page != current[-1][1].page
        if new_page:
            chunks.append(_chunk(current, current[fresh][1]))
            current, fresh = [], 0
        elif current and sum(t for _, _, t in current) + tokens > size:
            chunks.append(_chunk(current, current[fresh][1]))
            kept, total = [], 0
            for sentence in reversed(current):  # the overlap: whole sentences from the end
                if total + sentence[2] > overlap or total + sentence[2] + tokens > size:
                    break
                kept.insert(0, sentence)
                total += sentence[2]
            current, fresh = kept, len(kept)
        current.append((text, passage, tokens))
    if current:
        chunks.append(_chunk(current, current[fresh][1]))
    return chunks


def _chunk(sentences: list[tuple[str, Passage, int]], location: Passage) -> Chunk:
    return Chunk(_join([(text, passage) for text, passage, _ in sentences]), location.page, location.line)

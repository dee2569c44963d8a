"""Answers grounded in retrieved chunks: the prompt that numbers them, the sources list, and the citations."""

import re

from medicalgpt.rag.chunking import HAN
from medicalgpt.rag.index import Hit

CITATION = re.compile(r"\[(\d+)\]")
PROMPTS = {  # the instruction in the question's language
    "en": ("Documents:", "Answer the question from the documents above and cite them as [1], [2].", "Question:"),
    "zh": ("参考资料：", "请根据以上资料回答问题，并用[1]、[2]标注出处。", "问题："),
}


def last_user_text(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def grounded_messages(messages: list[dict], hits: list[Hit]) -> list[dict]:
    """The conversation with the retrieved chunks, numbered, in front of its last user turn's question."""
    if not hits:
        return messages
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    question = messages[last]["content"]
    header, instruction, label = PROMPTS["zh" if re.search(f"[{HAN}]", question) else "en"]
    context = "\n".join(f"[{n}] ({hit.location}) {hit.text}" for n, hit in enumerate(hits, start=1))
    grounded = f"{header}\n{context}\n\n{instruction}\n{label}{question}"
    return [*messages[:last], {**messages[last], "content": grounded}, *messages[last + 1:]]


def sources(hits: list[Hit]) -> list[dict]:
    """The numbered sources as the API returns them: [n] in an answer is the source whose id is n."""
    return [{"id": n, "file": hit.file, "page": hit.page, "line": hit.line, "score": round(hit.score, 4),
             "text": hit.text} for n, hit in enumerate(hits, start=1)]


def cited(answer: str, count: int) -> list[int]:
    """The source numbers an answer cites, in order of first mention; numbers with no source are ignored."""
    numbers = dict.fromkeys(int(n) for n in CITATION.findall(answer))
    return [n for n in numbers if 1 <= n <= count]


def uncited(answer: str) -> str:
    """The answer without its citation marks."""
    return CITATION.sub("", answer).strip()


def format_sources(hits: list[Hit], answer: str = "") -> str:
    """The source list printed under an answer: one `[n] file, page/line` per chunk, "(cited)" after those the
    answer cites."""
    cites = cited(answer, len(hits))
    return "\n".join(f"[{n}] {hit.location}" + (" (cited)" if n in cites else "") for n, hit in enumerate(hits, 1))

"""Reasoning models: the <think>...</think> block of a reply, apart from its answer, and the thinking switch.

Servers compatible with DeepSeek's and vLLM's reasoning output return the block as `reasoning_content` and only
the answer as `content` (streaming: `delta.reasoning_content`, then `delta.content`); ReasoningSplitter does that
split on text that arrives piece by piece, where a tag may be cut between two pieces.
"""

from dataclasses import replace

from medicalgpt.errors import UsageError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# Thinking templates and their variant with thinking off (an empty think block opens the reply).
NO_THINK_VARIANTS = {"qwen3": "qwen3_nothink", "qwen3_nothink": "qwen3_nothink"}
REASONING_TEMPLATES = {"qwen3", "qwen3_nothink", "deepseek3"}


def is_reasoning_model(template, tokenizer) -> bool:
    """Whether replies may hold a think block: a thinking template, or a tokenizer with a <think> token."""
    return template.name in REASONING_TEMPLATES or THINK_OPEN in tokenizer.get_vocab()


def with_thinking(template, enable_thinking: bool):
    """The template to prompt with under --enable_thinking: built-ins switch to their no-think variant, a
    tokenizer's own template gets enable_thinking=False as the Qwen3 templates read it."""
    from medicalgpt.templates import TokenizerChatTemplate, get_template

    if enable_thinking:
        return template
    if isinstance(template, TokenizerChatTemplate):
        return replace(template, template_kwargs={"enable_thinking": False})
    if template.name not in NO_THINK_VARIANTS:
        raise UsageError(f"--enable_thinking False: the {template.name} template has no thinking switch (templates "
                         f"with one: {', '.join(sorted(NO_THINK_VARIANTS))})")
    return replace(get_template(NO_THINK_VARIANTS[template.name]), allow_special_tokens=template.allow_special_tokens,
                   tool_format=template.tool_format)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a whole reply; reasoning is None when the reply holds no think block."""
    splitter = ReasoningSplitter()
    parts = splitter.feed(text) + splitter.flush()
    reasoning = "".join(t for kind, t in parts if kind == "reasoning_content")
    return (reasoning if splitter.saw_block else None), "".join(t for kind, t in parts if kind == "content")


class ReasoningSplitter:
    """Splits a streamed reply into ("reasoning_content", text) and ("content", text) pieces.

    A reply that starts (after blank space) with <think> is reasoning up to </think>; the blank lines around the
    reasoning and before the answer are dropped. Text that could still become a tag is held until it cannot.
    """

    def __init__(self):
        self.state = "start"  # start -> after_open -> reasoning -> after_block -> answer, or start -> answer
        self.held = ""
        self.saw_block = False

    def feed(self, piece: str) -> list[tuple[str, str]]:
        self.held += piece
        out: list[tuple[str, str]] = []
        while self.held:
            if self.state == "start":
                stripped = self.held.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self.held, self.state, self.saw_block = stripped[len(THINK_OPEN):], "after_open", True
                elif THINK_OPEN.startswith(stripped):  # blank, or a tag not yet whole: wait
                    break
                else:
                    self.state = "answer"
            elif self.state == "reasoning":
                end = self.held.find(THINK_CLOSE)
                if end < 0:  # hold a cut tag, and the newlines that may turn out to precede </think>
                    body = self.held[:len(self.held) - _partial_suffix(self.held, THINK_CLOSE)]
                    if body.rstrip("\n"):
                        out.append(("reasoning_content", body.rstrip("\n")))
                    self.held = self.held[len(body.rstrip("\n")):]
                    break
                if self.held[:end].rstrip("\n"):
                    out.append(("reasoning_content", self.held[:end].rstrip("\n")))
                self.held, self.state = self.held[end + len(THINK_CLOSE):], "after_block"
            elif self.state in ("after_open", "after_block"):  # blank lines after <think>, and before the answer
                self.held = self.held.lstrip("\n")
                if self.held:
                    self.state = "reasoning" if self.state == "after_open" else "answer"
            else:
                out.append(("content", self.held))
                self.held = ""
        return _merged(out)

    def flush(self) -> list[tuple[str, str]]:
        """What is still held at the end of the reply (a think block never closed stays reasoning)."""
        held, self.held = self.held, ""
        if not held or self.state in ("after_open", "after_block"):
            return []
        return [("reasoning_content" if self.state == "reasoning" else "content", held)]


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of text that is a proper start of tag (a tag cut between pieces)."""
    return next((n for n in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:n])), 0)


def _merged(parts: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Adjacent pieces of the same kind as one."""
    merged: list[tuple[str, str]] = []
    for kind, text in parts:
        if merged and merged[-1][0] == kind:
            merged[-1] = (kind, merged[-1][1] + text)
        else:
            merged.append((kind, text))
    return merged

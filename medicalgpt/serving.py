"""What the API server and the chat demo share: model flags, one chat model served one request at a time,
and message text that may arrive as a string or as a list of content parts."""

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jinja2

from medicalgpt.args import ModelArguments
from medicalgpt.errors import UsageError
from medicalgpt.generation import stream_generate
from medicalgpt.modeling import load_for_inference, load_tokenizer, set_stop_tokens, with_adapter_base
from medicalgpt.reasoning import is_reasoning_model, with_thinking
from medicalgpt.templates import resolve_template, with_tool_format

LOOPBACK = ("127.0.0.1", "localhost", "::1")  # the addresses that keep a server off the network


@dataclass
class BaseModelArguments(ModelArguments):
    """ModelArguments whose model flag is also spelled --base_model, as serving scripts traditionally do."""

    model_name_or_path: str | None = field(default=None, metadata={"aliases": ["--base_model"], "help": (
        "The base model (or a merged model): hub name or local path. Default: the base a --lora_model records, "
        "else the embedded default model.")})


@dataclass
class AdapterArguments:
    """The adapter and chat template of a model that answers: declared once for serving, inference, evaluation."""

    lora_model: str | None = field(default=None, metadata={"help": "A LoRA adapter to apply to the base model."})
    template_name: str | None = field(default=None, metadata={
        "help": "Built-in chat template (chatml, qwen, llama3, ...). Default: the tokenizer's own template."})
    tool_format: str | None = field(default=None, metadata={
        "help": "How tool calls are written and parsed: qwen, llama3, mistral, glm4 or json. Default: the chat "
                "template's own.",
        "choices": ["qwen", "llama3", "mistral", "glm4", "json"]})
    enable_thinking: bool = field(default=True, metadata={"help": (
        "Reasoning models (qwen3 templates, tokenizers with a <think> token): False prompts with thinking off. "
        "Reasoning comes back apart from the answer (reasoning_content in the API and in inference rows).")})


@dataclass
class ServeArguments(AdapterArguments):
    max_new_tokens: int = field(default=512, metadata={
        "help": "Completion length when a request does not say (API max_tokens; the demo's slider start)."})


@dataclass
class ChatModel:
    """A model with its tokenizer and chat template; generation is serialised by `lock`."""

    model: Any
    tokenizer: Any
    template: Any
    reasoning: bool = False  # replies may open with a <think> block: split it off (medicalgpt.reasoning)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def encode(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Prompt ids of a conversation ending in a user (or tool-result) turn, with the assistant generation
        prompt; tools: the functions the model may call (OpenAI's schema)."""
        try:
            return self.template.encode_prompt(self.tokenizer, messages, tools)
        except jinja2.TemplateError as error:  # a tokenizer's own template may refuse e.g. a system turn
            raise UsageError(f"the chat template rejects this conversation: {error}") from error

    def stream(self, prompt: list[int], max_new_tokens: int, stop: threading.Event | None = None,
               **kwargs) -> Iterator[str]:
        """stream_generate's text pieces. The lock is held from the first piece until the stream ends or is
        closed: concurrent requests queue instead of running generate() on one model at once."""
        with self.lock:
            yield from stream_generate(self.model, self.tokenizer, prompt, max_new_tokens, stop=stop, **kwargs)


def load_chat_model(model_args: ModelArguments, serve_args: AdapterArguments) -> ChatModel:
    """Tokenizer and template first (fast failures), then the model with the template's stop tokens. With a LoRA
    adapter and no base model, the base is the one the adapter records."""
    model_args = with_adapter_base(model_args, serve_args.lora_model)
    tokenizer = load_tokenizer(model_args, serve_args.lora_model)
    template = with_tool_format(resolve_template(tokenizer, serve_args.template_name), serve_args.tool_format)
    template = with_thinking(template, serve_args.enable_thinking)
    model = load_for_inference(model_args, serve_args.lora_model)
    set_stop_tokens(model, tokenizer, template.stop_words)
    return ChatModel(model, tokenizer, template, reasoning=is_reasoning_model(template, tokenizer))


class ContextLengthError(UsageError):
    """A prompt (plus the completion asked for) longer than the model's context; OpenAI's wording."""


def completion_budget(prompt_tokens: int, requested: int | None, default: int, max_model_len: int | None) -> int:
    """The tokens to generate: as requested, or the default cut to the room the context leaves. A prompt that
    leaves no room, or a request for more than there is, is refused the way OpenAI refuses it."""
    if max_model_len is None:
        return requested or default
    room = max_model_len - prompt_tokens
    if room < (requested or 1):
        raise ContextLengthError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_tokens + (requested or 1)} tokens ({prompt_tokens} in the messages, {requested or 1} in the "
            "completion). Please reduce the length of the messages or completion.")
    return requested or min(default, room)


def context_length(model: Any) -> int | None:
    """The longest sequence (prompt + completion) the model was built for, when its config says."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def invalid_unicode(text: str) -> str | None:
    """Why text cannot be tokenised, or None: JSON (and a browser) can carry a lone UTF-16 surrogate, which no
    tokenizer (and no UTF-8 response) can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"a lone UTF-16 surrogate ({text[error.start]!r}) at character {error.start}; send valid Unicode text"
    return None


def message_text(content: Any) -> str:
    """A message's text: a string (gradio_client, most API clients) or a list of content parts such as
    [{"type": "text", "text": ...}] (browsers, newer API clients); other parts (files) carry no text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part["text"] for part in content if isinstance(part, dict) and part.get("type") == "text")
    return ""

"""The OpenAI chat-completions wire format: the request schema, error bodies, response chunks and stop strings."""

import json
import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from medicalgpt.errors import DataError
from medicalgpt.serving import invalid_unicode, message_text
from medicalgpt.tool_calls import CallTurn, calls_of, openai_tool_calls, results_content

INVALID_UNICODE = "invalid_unicode"  # the validation error type that is answered with a 400, as OpenAI does
# Fields outside the schema that are accepted because they cannot change the completion.
IGNORED_FIELDS = ("user", "store", "metadata", "service_tier")
# Fields outside the schema that are accepted only with the value that asks for what this server does anyway.
NEUTRAL_VALUES = {"response_format": {"type": "text"}, "frequency_penalty": 0, "presence_penalty": 0,
                  "logit_bias": {}}
MAX_TOP_LOGPROBS = 20  # as OpenAI


class StrictModel(BaseModel):
    """No coercion: "stream": "yes" or "max_tokens": true is a schema error (422), not a guess."""

    model_config = ConfigDict(strict=True)


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


def _valid_unicode(value: str | list | None) -> str | list | None:
    """A text field (a string, a list of strings or of text parts) that the tokenizer can take."""
    texts = [value] if isinstance(value, str) else [v.text if isinstance(v, TextPart) else v for v in value or []]
    for text in texts:
        if problem := invalid_unicode(text):
            raise PydanticCustomError(INVALID_UNICODE, problem)
    return value


class FunctionCall(StrictModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(StrictModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None

    _content_unicode = field_validator("content")(_valid_unicode)


class FunctionDefinition(StrictModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(StrictModel):
    include_usage: bool = False


class ChatCompletionRequest(StrictModel):
    """The fields this server honours. Other fields are kept (extra) for unsupported() to refuse: a request is never
    answered as if a field it relies on had been applied."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer name of max_tokens
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = None
    logprobs: bool | None = None  # clients send null for "not asked"
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # several calls in one turn are always allowed

    _text_unicode = field_validator("model", "stop")(_valid_unicode)

    def conversation(self) -> list[dict]:
        """The messages as the chat templates take them: role and plain-text content; an assistant turn with
        tool_calls becomes a function_call turn and the tool messages after it one observation turn."""
        messages = []
        for index, message in enumerate(self.model_dump()["messages"]):
            text = message_text(message["content"])
            if message["role"] == "tool":
                if messages and messages[-1]["role"] == "observation":  # the results of several calls
                    messages[-1]["results"].append(text)
                else:
                    messages.append({"role": "observation", "results": [text]})
            elif message["role"] == "assistant" and message["tool_calls"]:
                try:
                    calls = calls_of([call["function"] for call in message["tool_calls"]], "tool_calls")
                except DataError as error:
                    raise ApiError(400, f"messages[{index}].{error}", param="messages") from None
                messages.append({"role": "function_call", "content": CallTurn(calls, text).content()})
            else:
                messages.append({"role": message["role"], "content": text})
        return [{"role": "observation", "content": results_content(m["results"])} if "results" in m else m
                for m in messages]

    def tool_schemas(self) -> list[dict] | None:
        """The tools to offer the model: none when there are none or tool_choice is "none"."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    def forced_call(self) -> tuple[bool, str | None]:
        """(whether a call is required, the function it must call or None)."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return True, self.tool_choice.function.name
        return self.tool_choice == "required", None

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) for the first field this server cannot honour, or None."""
        for name, value in (self.model_extra or {}).items():
            if name in IGNORED_FIELDS or value is None:
                continue
            if name not in NEUTRAL_VALUES:
                return name, f"Unrecognized request argument supplied: {name}"
            if value != NEUTRAL_VALUES[name]:
                return name, f"{name} is not supported by this server; only {json.dumps(NEUTRAL_VALUES[name])} is"
        if self.n != 1:
            return "n", "Only n=1 is supported."
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs=true"
        if self.logprobs and self.stream:
            return "logprobs", "logprobs are supported only without stream"
        names = [tool.function.name for tool in self.tools or []]
        if self.tool_choice not in (None, "none", "auto") and not names:
            return "tool_choice", "tool_choice requires tools: send the functions the model may call in tools"
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            return "tool_choice", (f"tool_choice names the function {self.tool_choice.function.name!r}, which is "
                                   f"not in tools ({', '.join(names)})")
        return None


class ApiError(Exception):
    """An error answered as OpenAI does: an HTTP status and {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = error_body(message, type, param, code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StopStrings:
    """Cuts streamed text at the first stop string, holding back only the tail that could begin one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.hit = False

    def feed(self, piece: str) -> str:
        """The text that is now safe to send; sets `hit` (and drops the rest) once a stop string appears."""
        self.held += piece
        cuts = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.hit = True
            text, self.held = self.held[:min(cuts)], ""
            return text
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        split = len(self.held) - keep
        text, self.held = self.held[:split], self.held[split:]
        return text

    def flush(self) -> str:
        """What was held back, once the generation has ended without a stop string."""
        text, self.held = self.held, ""
        return text


class ChunkWriter:
    """Server-sent events of one streamed completion, each `data: {json}` and a blank line."""

    def __init__(self, model: str, first: dict | None = None):
        self.base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                     "created": int(time.time()), "model": model}
        self.first = first or {}  # extra fields of the first chunk only (a --rag_index answer's sources)

    def choice(self, delta: dict, finish_reason: str | None = None) -> str:
        extra, self.first = self.first, {}
        return sse({**self.base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra})

    def usage(self, usage: dict) -> str:
        return sse({**self.base, "choices": [], "usage": usage})

    def tool_calls(self, call: CallTurn) -> list[str]:
        """The deltas of each call as OpenAI streams them: index, id, type and name with empty arguments first,
        then the arguments."""
        chunks = []
        for index, tool_call in enumerate(openai_tool_calls(call, for_api=True)):
            head = {**tool_call, "function": {"name": tool_call["function"]["name"], "arguments": ""}}
            chunks.append(self.choice({"tool_calls": [{"index": index, **head}]}))
            chunks.append(self.choice({"tool_calls": [{"index": index, "function": {
                "arguments": tool_call["function"]["arguments"]}}]}))
        return chunks


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def completion_body(model: str, text: str, finish_reason: str, usage: dict, logprobs: dict | None = None,
                    reasoning: str | None = None, call: CallTurn | None = None) -> dict:
    """A non-streamed chat.completion response; a reasoning model's think block as reasoning_content; tool calls
    as tool_calls (content: the text before them, or null) with finish_reason "tool_calls"."""
    message = {"role": "assistant", "content": text, **({"reasoning_content": reasoning} if reasoning is not None
                                                        else {})}
    if call:
        message |= {"content": call.text or None, "tool_calls": openai_tool_calls(call, for_api=True)}
        finish_reason = "tool_calls"
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "usage": usage,
            "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}]}


def token_logprob(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

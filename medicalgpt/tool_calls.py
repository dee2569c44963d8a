"""Tool calls in one normalised form: read from ShareGPT, OpenAI messages and ReAct text, checked against the tools'
schemas, rendered in a model family's format and parsed back out of generated text.

A normalised function_call turn holds JSON: one call {"name", "arguments"} (MedicalGPT's ShareGPT form), a list of
calls, or {"content": text, "tool_calls": [calls]} when the assistant writes text before its calls. Arguments are
always JSON objects. An observation turn answering several calls holds {"tool_results": [text, ...]}.
"""

import json
import re
import string
import uuid
from dataclasses import dataclass

from medicalgpt.errors import DataError, UsageError

# ReAct-style calls (MedicalGPT's tool-call preference sample): "Action: name\nAction Input: {json}".
REACT_CALL = re.compile(r"Action:[ \t]*(?P<name>[^\n]+?)[ \t]*\nAction Input:[ \t]*(?P<arguments>.*?)[ \t]*"
                        r"(?=\nAction:|\nObservation:|\Z)", re.S)
_TEXT_CALL_KEYS = {"content", "tool_calls"}
_RESULTS_KEY = "tool_results"


@dataclass(frozen=True)
class CallTurn:
    """An assistant turn that calls tools: optional text before the calls, and the calls {"name", "arguments"}."""

    calls: list[dict]
    text: str = ""

    def content(self) -> str:
        """The normalised function_call content (see the module docstring)."""
        if self.text:
            return _dumps({"content": self.text, "tool_calls": self.calls})
        return _dumps(self.calls[0] if len(self.calls) == 1 else self.calls)


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _call(value: object, where: str) -> dict:
    """One call as {"name", "arguments": object}; OpenAI's {"function": {...}} wrapper, arguments as a JSON string
    and Llama's "parameters" are accepted."""
    if isinstance(value, dict) and isinstance(value.get("function"), dict):
        value = value["function"]
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"].strip():
        raise DataError(f"{where}: expected a call {{\"name\": ..., \"arguments\": {{...}}}}")
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise DataError(f"{where}.arguments: invalid JSON: {e.msg}") from None
    if not isinstance(arguments, dict):
        raise DataError(f"{where}.arguments: expected a JSON object, got {type(arguments).__name__}")
    return {"name": value["name"], "arguments": arguments}


def calls_of(value: object, where: str) -> list[dict]:
    """A call or a non-empty list of calls, normalised."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise DataError(f"{where}: an empty list of tool calls")
    return [_call(item, f"{where}[{i}]" if isinstance(value, list) else where) for i, item in enumerate(items)]


def read_react(text: str) -> CallTurn | None:
    """A ReAct-style answer ("Thought: ...\\nAction: name\\nAction Input: {json}") as calls; None if it is not one."""
    matches = list(REACT_CALL.finditer(text))
    if not matches:
        return None
    calls = [_call({"name": m["name"].strip(), "arguments": m["arguments"].strip() or "{}"}, "Action Input")
             for m in matches]
    thought = text[: matches[0].start()].strip()
    return CallTurn(calls, thought.removeprefix("Thought:").strip())


def read_call_turn(value: object, where: str = "function_call") -> CallTurn:
    """A function_call turn's value (JSON text or already parsed, normalised or ReAct) as a CallTurn."""
    if isinstance(value, str):
        if (react := read_react(value)) is not None:
            return react
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: a tool call must be JSON ({e.msg}) or ReAct \"Action:\"/\"Action Input:\" "
                            "text") from None
    if isinstance(value, dict) and set(value) == _TEXT_CALL_KEYS:
        text = value["content"] if isinstance(value["content"], str) else ""
        return CallTurn(calls_of(value["tool_calls"], f"{where}.tool_calls"), text)
    return CallTurn(calls_of(value, where))


def normalise_answer(answer: str) -> str:
    """A preference answer: a ReAct call becomes the normalised call JSON; any other answer is unchanged."""
    react = read_react(answer)
    return react.content() if react else answer


def is_call(content: str) -> bool:
    """Whether an answer is a normalised tool call (so it is rendered as one)."""
    if not content.lstrip().startswith(("{", "[")):
        return False
    try:
        read_call_turn(json.loads(content))
    except (DataError, json.JSONDecodeError):
        return False
    return True


def results_content(results: list[str]) -> str:
    """One observation turn for the results of one call turn."""
    return results[0] if len(results) == 1 else _dumps({_RESULTS_KEY: results})


def read_results(content: str) -> list[str]:
    """The tool results of an observation turn."""
    if not content.startswith("{\"" + _RESULTS_KEY):
        return [content]
    try:
        results = json.loads(content)[_RESULTS_KEY]
    except (json.JSONDecodeError, KeyError):
        return [content]
    return results if isinstance(results, list) and all(isinstance(r, str) for r in results) else [content]


def openai_tool_calls(turn: CallTurn, for_api: bool = False) -> list[dict]:
    """OpenAI tool_calls of a call turn: arguments as objects (chat templates and data files), or for the API as
    OpenAI sends them, with ids and arguments as JSON text."""
    calls = [{"type": "function", "function": {"name": c["name"], "arguments": _dumps(c["arguments"]) if for_api
                                               else c["arguments"]}} for c in turn.calls]
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", **c} for c in calls] if for_api else calls


def to_openai_messages(messages: list[dict], call_ids: bool = False) -> list[dict]:
    """Normalised messages as OpenAI messages (assistant tool_calls with object arguments, one tool message per
    result): what chat templates that know tools (Qwen2.5, Llama 3.1, Mistral) take. call_ids: each call gets an id
    and each result the id of the call it answers, counted in order (call_id), as Mistral's template requires."""
    out, calls, results = [], 0, 0
    for message in messages:
        if message["role"] == "function_call":
            turn = read_call_turn(message["content"])
            tool_calls = openai_tool_calls(turn)
            if call_ids:
                tool_calls = [{"id": call_id(calls + i), **call} for i, call in enumerate(tool_calls)]
            calls += len(tool_calls)
            out.append({"role": "assistant", "content": turn.text, "tool_calls": tool_calls})
        elif message["role"] == "observation":
            for result in read_results(message["content"]):
                out.append({"role": "tool", "content": result, **({"tool_call_id": call_id(results)} if call_ids
                                                                    else {})})
                results += 1
        else:
            out.append(message)
    return out


def tool_names(tools: list[dict]) -> dict[str, dict]:
    """Each tool's schema by name; tools may be OpenAI's {"type": "function", "function": {...}} or bare."""
    schemas = {}
    for tool in tools:
        schema = tool.get("function", tool) if isinstance(tool, dict) else {}
        if isinstance(schema, dict) and isinstance(schema.get("name"), str):
            schemas[schema["name"]] = schema
    return schemas


def schema_problems(messages: list[dict], tools: list[dict], answers: dict[str, str] | None = None) -> list[str]:
    """Calls (in function_call turns and in tool-call answers, by field name) naming a tool not in tools, or
    missing arguments the tool's schema requires."""
    schemas, problems = tool_names(tools), []
    turns = [(f"messages[{i}]", m["content"]) for i, m in enumerate(messages) if m["role"] == "function_call"]
    turns += [(name, answer) for name, answer in (answers or {}).items() if is_call(answer)]
    for where, content in turns:
        for call in read_call_turn(content, where).calls:
            schema = schemas.get(call["name"])
            if schema is None:
                known = ", ".join(schemas) or "none"
                problems.append(f"{where}: calls {call['name']!r}, which is not in tools (tools: {known})")
                continue
            required = (schema.get("parameters") or {}).get("required") or []
            missing = [name for name in required if name not in call["arguments"]]
            if missing:
                problems.append(f"{where}: {call['name']} misses required arguments {', '.join(missing)}")
    return problems


def call_id(index: int) -> str:
    """The id of a conversation's index-th call (and of the result answering it) where a format writes ids: nine
    alphanumerics, as Mistral's template requires; counted, so that the same conversation always renders alike."""
    return f"{index:09d}"


@dataclass(frozen=True)
class ToolFormat:
    """How a model family writes tool definitions, calls and tool results (the definitions go where the template
    puts them, usually its system text)."""

    name: str
    call_open: str = ""  # before each call's JSON
    call_close: str = ""  # after it
    arguments_key: str = "arguments"  # Llama 3.1 says "parameters"
    join: str = "\n"  # between the text and the calls, and between calls
    result_open: str = ""
    result_close: str = ""
    result_join: str = "\n"
    verbatim: bool = False  # calls and results are written as their normalised JSON

    def render_tools(self, tools: list[dict]) -> str:
        """The tool definitions, one JSON object a line."""
        return "\n".join(_dumps(tool) for tool in tools)

    def render_calls(self, content: str, first_id: int = 0) -> str:
        """A normalised function_call turn in this format; first_id: the number of calls before it in the
        conversation (formats that write call ids count from there)."""
        if self.verbatim:
            return content
        turn = read_call_turn(content)
        calls = [self.call_open + _dumps({"name": c["name"], self.arguments_key: c["arguments"]}) + self.call_close
                 for c in turn.calls]
        return self.join.join(([turn.text] if turn.text else []) + calls)

    def render_results(self, content: str, first_id: int = 0) -> str:
        """A normalised observation turn in this format; first_id: the number of results before it."""
        if self.verbatim:
            return content
        return self.result_join.join(self.result_open + r + self.result_close for r in read_results(content))

    def forced_prefix(self, name: str | None) -> str:
        """Text that starts a call (of the named function): prefilled when a request requires a call."""
        head = self.call_open + "{\"name\": "
        return head + _dumps(name) + f", \"{self.arguments_key}\": " if name else head

    def call_start(self, text: str) -> tuple[int, bool]:
        """Streaming: (how much of text, none of it sent yet, can go out as content now; whether a call begins
        there). A call may begin at its opening tag, or for formats without one at the first JSON bracket (held
        until the reply ends, when parse() says whether it was a call)."""
        if not self.call_open:
            starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
            end, calling = (min(starts), True) if starts else (len(text), False)
            return len(text[:end].rstrip(string.whitespace + self.join)), calling  # the join may precede a call
        start = text.find(self.call_open)
        if start >= 0:
            return start, True
        keep = next((n for n in range(min(len(self.call_open) - 1, len(text)), 0, -1)
                     if text.endswith(self.call_open[:n])), 0)  # a tag cut between pieces
        return len(text) - keep, False

    def parse(self, text: str) -> CallTurn | None:
        """Generated text as a call turn; None when it holds no call or a call that does not parse (plain text)."""
        try:
            if self.call_open:
                prose, *bodies = text.split(self.call_open)
                if not bodies:
                    return None
                calls = [c for body in bodies for c in calls_of(json.loads(body.split(self.call_close)[0]), "call")]
                return CallTurn(calls, prose.removesuffix(self.join).strip())
            return self._parse_json(text)
        except (json.JSONDecodeError, DataError):
            return None

    def _parse_json(self, text: str) -> CallTurn | None:
        """Calls written as bare JSON values, after optional text: the calls start at the first bracket from which
        the rest of the text is nothing but calls."""
        for start in (i for i, char in enumerate(text) if char in "{["):
            try:
                values = _json_values(text[start:].strip(), self.join.strip())
                turn = read_call_turn(values[0]) if len(values) == 1 else CallTurn(
                    [c for value in values for c in calls_of(value, "call")])
            except (json.JSONDecodeError, DataError):
                continue
            prose = text[:start].strip().removesuffix(self.join.strip()).strip()
            return CallTurn(turn.calls, " ".join(part for part in (prose, turn.text) if part))
        return None


def _before_space(text: str, end: int) -> int:
    """end moved back over the blank space before it: that space is held too, as it may be all that comes before
    a call."""
    return len(text[:end].rstrip())


def _json_values(text: str, separator: str) -> list:
    """The JSON values of text written one after another (separated by blank space and separator)."""
    decoder, values, position = json.JSONDecoder(), [], 0
    while position < len(text):
        value, position = decoder.raw_decode(text, position)
        values.append(value)
        while position < len(text) and (text[position].isspace() or text[position] in separator):
            position += 1
    return values


@dataclass(frozen=True)
class MistralToolFormat(ToolFormat):
    """Mistral's v3 tool format (Mistral-7B-Instruct-v0.3, Mixtral-8x22B, Mistral NeMo): the definitions as
    [AVAILABLE_TOOLS] [...] before the last user turn, the calls of a turn as one JSON list after [TOOL_CALLS],
    each with a nine-character id, and each result as {"content": ..., "call_id": ...} in [TOOL_RESULTS] tags.
    Text before the calls (which Mistral's template drops) is kept before [TOOL_CALLS]."""

    def render_tools(self, tools: list[dict]) -> str:
        # As Mistral's template writes them: string values are put between quotes as they are, not JSON-escaped.
        def field(key: str, value) -> str:
            return f'"{key}": "{value}"' if isinstance(value, str) else f'"{key}": {_dumps(value)}'

        functions = [tool.get("function", tool) for tool in tools]
        return "[" + ", ".join('{"type": "function", "function": {' + ", ".join(
            field(k, v) for k, v in function.items() if k != "return") + "}}" for function in functions) + "]"

    def render_calls(self, content: str, first_id: int = 0) -> str:
        turn = read_call_turn(content)
        calls = [_dumps({"name": c["name"], "arguments": c["arguments"], "id": call_id(first_id + i)})
                 for i, c in enumerate(turn.calls)]
        return turn.text + self.call_open + " [" + ", ".join(calls) + "]"

    def render_results(self, content: str, first_id: int = 0) -> str:
        return "".join(f'{self.result_open}{{"content": {result}, "call_id": "{call_id(first_id + i)}"}}'
                       f"{self.result_close}" for i, result in enumerate(read_results(content)))

    def forced_prefix(self, name: str | None) -> str:
        head = self.call_open + " [{\"name\": "
        return head + _dumps(name) + ", \"arguments\": " if name else head

    def call_start(self, text: str) -> tuple[int, bool]:
        # [TOOL_CALLS] is a special token, which decoding drops: a call may also begin at its list's bracket.
        start = text.find("[")
        return (_before_space(text, start), True) if start >= 0 else (_before_space(text, len(text)), False)

    def parse(self, text: str) -> CallTurn | None:
        prose, tag, body = text.partition(self.call_open)
        if not tag:  # the tag dropped by decoding: the list of calls follows the text
            start = text.find("[{")
            if start < 0:
                return None
            prose, body = text[:start], text[start:]
        try:
            calls = json.loads(body)
            return CallTurn(calls_of(calls, "call"), prose.strip()) if isinstance(calls, list) else None
        except (json.JSONDecodeError, DataError):
            return None


_GLM4_NAME = r"[A-Za-z_][A-Za-z0-9_\-]*"
# A call's name line: the name starts the text, a line or a turn (when decoding drops <|assistant|>, it follows the
# text before it), never a word of a sentence ("see below\n{...}" is an answer).
_GLM4_HEAD = re.compile(rf"\s*(?:<\|assistant\|>)?\s*(?<![A-Za-z0-9_\- \t])({_GLM4_NAME})\n\s*(?=\{{)")
_GLM4_SYSTEM_TEXT = "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"


@dataclass(frozen=True)
class GLM4ToolFormat(ToolFormat):
    """GLM-4's tool format (glm-4-9b-chat): each definition as "## name" over its JSON (indented by 4) in a system
    block of its own, each call as an assistant turn "<|assistant|>name\n{arguments}", each result as an
    <|observation|> turn. Text before the calls is an assistant turn of its own before them."""

    def render_tools(self, tools: list[dict]) -> str:
        functions = [tool.get("function", tool) for tool in tools]
        # "\n## ": GLM-4's template has "\n\n## " right after a block tag, whose first newline Jinja trims.
        return "".join(f"\n## {f['name']}\n\n{json.dumps(f, ensure_ascii=False, indent=4)}{_GLM4_SYSTEM_TEXT}"
                       for f in functions)

    def render_calls(self, content: str, first_id: int = 0) -> str:
        turn = read_call_turn(content)
        calls = self.join.join(f"{c['name']}\n{_dumps(c['arguments'])}" for c in turn.calls)
        return f"\n{turn.text}{self.join}{calls}" if turn.text else calls

    def forced_prefix(self, name: str | None) -> str:
        return f"{name}\n" if name else ""  # a call starts with its name: no text can require one without it

    def call_start(self, text: str) -> tuple[int, bool]:
        head = _GLM4_HEAD.search(text)
        if head:
            return _before_space(text, head.start()), True
        # Held, as it may begin a call: <|assistant|> (whole or cut between pieces), a name and its newline.
        tail = re.search(rf"(?:<\|assistant\|>)?(?:{_GLM4_NAME})?\n?$", text).start()
        cut = next((n for n in range(len(self.join) - 1, 0, -1) if text.endswith(self.join[:n])), 0)
        return _before_space(text, min(tail, len(text) - cut)), False

    def parse(self, text: str) -> CallTurn | None:
        first = _GLM4_HEAD.search(text)
        if first is None:
            return None
        decoder, calls, position = json.JSONDecoder(), [], first.start()
        try:
            while text[position:].strip():
                head = _GLM4_HEAD.match(text, position)
                if head is None:
                    return None
                arguments, position = decoder.raw_decode(text, head.end())
                calls.append(_call({"name": head[1], "arguments": arguments}, "call"))
        except (json.JSONDecodeError, DataError):
            return None
        return CallTurn(calls, text[:first.start()].replace(self.join, "").strip())


TOOL_FORMATS = {f.name: f for f in [
    # Qwen2.5 / Qwen3 (and Hermes): each call in <tool_call> tags, each result in <tool_response> tags.
    ToolFormat("qwen", call_open="<tool_call>\n", call_close="\n</tool_call>", result_open="<tool_response>\n",
               result_close="\n</tool_response>"),
    # Llama 3.1 JSON tool calling: {"name": ..., "parameters": ...}, several joined by "; " as vLLM reads them; the
    # results come in ipython turns.
    ToolFormat("llama3", arguments_key="parameters", join="; ",
               result_join="<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n"),
    MistralToolFormat("mistral", call_open="[TOOL_CALLS]", result_open="[TOOL_RESULTS] ",
                      result_close="[/TOOL_RESULTS]"),
    # GLM-4: several calls are consecutive assistant turns; several results consecutive observation turns.
    GLM4ToolFormat("glm4", join="<|assistant|>", result_join="<|observation|>\n"),
    # Families without a native format: the normalised JSON as it is.
    ToolFormat("json", verbatim=True),
]}


def get_tool_format(name: str) -> ToolFormat:
    """The tool format called name."""
    if name not in TOOL_FORMATS:
        raise UsageError(f"unknown --tool_format {name!r}; known formats: {', '.join(TOOL_FORMATS)}")
    return TOOL_FORMATS[name]


class CallStream:
    """A streamed reply's text passed on until it may be turning into a tool call; from there on it is held, and
    finish() says at the end whether it was a call (else the held text is still to be sent as content).

    prefix: text already put in the model's mouth (a forced call's opening), which the held text starts with.
    """

    def __init__(self, fmt: ToolFormat, prefix: str = ""):
        self.fmt, self.held, self.calling = fmt, prefix, bool(prefix)
        self.prose = ""  # the text passed on before the call

    def feed(self, piece: str) -> str:
        """The text that is safe to send as content now."""
        self.held += piece
        if self.calling:
            return ""
        end, self.calling = self.fmt.call_start(self.held)
        text, self.held = self.held[:end], self.held[end:]
        self.prose += text
        return text

    def finish(self) -> tuple[CallTurn | None, str]:
        """(the call, or None, and the held text still to send as content when it was no call)."""
        call = self.fmt.parse(self.prose + self.held) if self.calling else None
        return (call, "") if call else (None, self.held)


def first_decision(messages: list[dict]) -> tuple[list[dict], CallTurn | None]:
    """A conversation's turns before its first reply, and the call that reply makes (None: it answers)."""
    index = next(i for i, m in enumerate(messages) if m["role"] in ("assistant", "function_call"))
    reply = messages[index]
    return messages[:index], read_call_turn(reply["content"]) if reply["role"] == "function_call" else None


def score_tool_calls(expected: list[CallTurn | None], replies: list[str], fmt: ToolFormat) -> dict:
    """Tool-call accuracy of generated replies: tool_call_accuracy counts a reply right when it calls exactly the
    expected tools with exactly the expected arguments (parsed JSON equality), or makes no call where none is
    expected; tool_choice_accuracy asks only for the right tools (or none)."""
    exact = choice = 0
    for want, reply in zip(expected, replies, strict=True):
        got = fmt.parse(reply)
        names = [c["name"] for c in got.calls] if got else []
        choice += names == ([c["name"] for c in want.calls] if want else [])
        exact += (got.calls if got else None) == (want.calls if want else None)
    return {"tool_call_accuracy": exact / len(replies), "tool_choice_accuracy": choice / len(replies)}

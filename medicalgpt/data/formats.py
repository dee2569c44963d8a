"""Detect a record's format and normalise it.

Conversations (ShareGPT, OpenAI messages, Alpaca) become
    {"messages": [{"role": "system"|"user"|"assistant"|"function_call"|"observation", "content": str}],
     "tools": "<JSON list of tool schemas, or empty>"}
and pretraining text becomes {"text": str}. Problems raise DataError naming the field; the loader
prefixes the file and line.
"""

import itertools
import json

from medicalgpt.errors import DataError
from medicalgpt.tool_calls import CallTurn, calls_of, normalise_answer, read_call_turn, results_content

SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
    "function_call": "function_call", "observation": "observation", "tool": "observation",
}
OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "observation"}
USER_SIDE = {"user", "observation"}
ASSISTANT_SIDE = {"assistant", "function_call"}
FORMAT_KEYS = {"sharegpt": "conversations", "openai": "messages", "prompt": "prompt", "alpaca": "instruction",
               "text": "text", "question": "question"}


def detect_format(record: object) -> str:
    """One of sharegpt, openai, prompt, alpaca, text, question, judged by the record's fields."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    for name, key in FORMAT_KEYS.items():
        if key in record:
            return name
    keys = ", ".join(sorted(record)) or "none"
    raise DataError(f"unknown record format: expected a field {', '.join(FORMAT_KEYS.values())}; found: {keys}")


def _string(value: object, field_name: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(f"{field_name}: expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{field_name}: empty")
    return value


def _tools_json(record: dict) -> str:
    """Tool schemas as a JSON list string ("" when absent); accepts a list or a JSON string."""
    tools = record.get("tools")
    if tools in (None, "", []):
        return ""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataError(f"tools: invalid JSON: {e.msg}") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError("tools: expected a list of tool schemas (objects)")
    return json.dumps(tools, ensure_ascii=False)


def validate_turns(messages: list[dict], field_name: str, ends_with: set[str] = ASSISTANT_SIDE) -> None:
    """System first (optional), then user-side and assistant-side turns alternating, ending on the given side."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns:
        raise DataError(f"{field_name}: no user/assistant turns")
    for index, message in enumerate(turns):
        expected = USER_SIDE if index % 2 == 0 else ASSISTANT_SIDE
        if message["role"] not in expected:
            side = "a user (or observation)" if index % 2 == 0 else "an assistant (or function_call)"
            position = index + len(messages) - len(turns)
            raise DataError(f"{field_name}[{position}]: expected {side} turn, got role '{message['role']}'")
    if turns[-1]["role"] not in ends_with:
        side = "an assistant" if ends_with == ASSISTANT_SIDE else "a user"
        raise DataError(f"{field_name}: the conversation must end with {side} turn")


def _role(turn: object, where: str, key: str, roles: dict[str, str], earlier: list[dict]) -> str:
    """The normalised role of one turn; a system turn may only open the conversation."""
    if not isinstance(turn, dict):
        raise DataError(f"{where}: expected an object, got {type(turn).__name__}")
    name = _string(turn.get(key), f"{where}.{key}")
    if name not in roles:
        raise DataError(f"{where}.{key}: unknown role '{name}' (expected one of {', '.join(roles)})")
    if roles[name] == "system" and earlier:
        raise DataError(f"{where}.{key}: a system turn may only come first")
    return roles[name]


def _sharegpt(record: dict) -> list[dict]:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError("conversations: expected a non-empty list of turns")
    system = record.get("system_prompt", record.get("system"))
    messages = [{"role": "system", "content": _string(system, "system_prompt", True)}] if system else []
    for index, turn in enumerate(turns):
        where = f"conversations[{index}]"
        role = _role(turn, where, "from", SHAREGPT_ROLES, messages)
        value = turn.get("value")
        if role == "function_call":  # a call as JSON (text or parsed) or in ReAct style
            messages.append({"role": role, "content": read_call_turn(value, f"{where}.value").content()})
        else:
            messages.append({"role": role, "content": _string(value, f"{where}.value")})
    return messages


def _openai_content(message: dict, where: str) -> str:
    """Message text; content given as a list of {"type": "text"} parts is joined; an assistant message with
    tool_calls becomes a normalised call turn (its text kept before the calls)."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if message.get("tool_calls"):
        text = _string(content or "", f"{where}.content", allow_empty=True)
        return CallTurn(calls_of(message["tool_calls"], f"{where}.tool_calls"), text.strip()).content()
    return _string(content, f"{where}.content")


def _openai(record: dict) -> list[dict]:
    raw = record["messages"]
    if not isinstance(raw, list) or not raw:
        raise DataError("messages: expected a non-empty list of messages")
    messages = []
    for index, message in enumerate(raw):
        where = f"messages[{index}]"
        role = _role(message, where, "role", OPENAI_ROLES, messages)
        if role == "assistant" and message.get("tool_calls"):
            role = "function_call"
        messages.append({"role": role, "content": _openai_content(message, where)})
    return _merge_tool_results(messages)


def _merge_tool_results(messages: list[dict]) -> list[dict]:
    """Consecutive tool messages (the results of several calls, one message each) as one observation turn."""
    merged = []
    for role, group in itertools.groupby(messages, key=lambda m: m["role"]):
        group = list(group)
        if role == "observation":
            merged.append({"role": role, "content": results_content([m["content"] for m in group])})
        else:
            merged += group
    return merged


def _alpaca(record: dict) -> list[dict]:
    instruction = _string(record["instruction"], "instruction")
    extra = _string(record.get("input") or "", "input", allow_empty=True)
    system = _string(record.get("system") or "", "system", allow_empty=True)
    messages = [{"role": "system", "content": system}] if system else []
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError("history: expected a list of [question, answer] pairs")
    for index, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise DataError(f"history[{index}]: expected a [question, answer] pair")
        messages.append({"role": "user", "content": _string(pair[0], f"history[{index}][0]")})
        messages.append({"role": "assistant", "content": _string(pair[1], f"history[{index}][1]")})
    prompt = f"{instruction}\n{extra}" if extra.strip() else instruction
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": _string(record.get("output"), "output")})
    return messages


def _question_answer(record: dict) -> list[dict]:
    """A question with its reference answer (GRPO's files) as one exchange: SFT on the answer format GRPO rewards."""
    return [{"role": "user", "content": _question_prompt(record)},
            {"role": "assistant", "content": _reference_answer(record)}]


CONVERTERS = {"sharegpt": (_sharegpt, "conversations"), "openai": (_openai, "messages"),
              "alpaca": (_alpaca, "messages"), "question": (_question_answer, "question")}


def to_conversation(record: object) -> dict:
    """A ShareGPT, OpenAI-messages, Alpaca or question/answer record as {"messages": [...], "tools": str}."""
    kind = detect_format(record)
    if kind not in CONVERTERS:
        raise DataError(f"{FORMAT_KEYS[kind]}: a {kind} record where a conversation (conversations, messages, "
                        "instruction/output or question/answer) was expected")
    convert, field_name = CONVERTERS[kind]
    messages = convert(record)
    validate_turns(messages, field_name)
    return {"messages": messages, "tools": _tools_json(record)}


def to_text(record: object) -> dict:
    """A pretraining document as {"text": str}."""
    kind = detect_format(record)
    if kind != "text":
        raise DataError(f"{FORMAT_KEYS[kind]}: a {kind} conversation where pretraining text "
                        "(a .txt line or {\"text\": ...}) was expected")
    return {"text": _string(record["text"], "text")}


def _response(record: dict, key: str) -> str:
    """A chosen/rejected/completion answer: a string, or OpenAI-style [{"role": "assistant", "content": ...}]."""
    if key not in record and f"response_{key}" in record:  # MedicalGPT's DPO files: response_chosen, ...
        key = f"response_{key}"
    if key not in record:
        raise DataError(f"{key}: missing")
    value = record[key]
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict) or value[0].get("role") != "assistant":
            raise DataError(f"{key}: expected a string or a list with one assistant message")
        return _openai_content(value[0], f"{key}[0]")
    return normalise_answer(_string(value, key))


def _prompt_messages(record: dict) -> tuple[list[dict], str]:
    """The prompt turns (ending with a user turn) of a preference/KTO record, and the field they came from."""
    kind = detect_format(record)
    if kind == "sharegpt":
        return _sharegpt(record), "conversations"
    if kind == "alpaca":
        return _alpaca({**record, "output": "-"})[:-1], "instruction"
    if kind == "prompt":
        prompt = record["prompt"]
        if isinstance(prompt, str):
            return [{"role": "user", "content": _string(prompt, "prompt")}], "prompt"
        return _openai({"messages": prompt}), "prompt"
    if kind == "question":  # MedicalGPT's DPO files: {system, history, question, response_chosen, response_rejected}
        return _alpaca({**record, "instruction": _question_prompt(record), "output": "-"})[:-1], "question"
    raise DataError(f"{FORMAT_KEYS[kind]}: a {kind} record where a preference prompt (conversations, prompt, "
                    "instruction or question) was expected")


def to_preference(record: object) -> dict:
    """A preference pair as {"messages": prompt turns, "tools": str, "chosen": str, "rejected": str}."""
    messages, field_name = _prompt_messages(record)
    validate_turns(messages, field_name, ends_with=USER_SIDE)
    chosen, rejected = _response(record, "chosen"), _response(record, "rejected")
    if chosen.strip() == rejected.strip():
        raise DataError("chosen, rejected: identical answers carry no preference")
    return {"messages": messages, "tools": _tools_json(record), "chosen": chosen, "rejected": rejected}


def to_unpaired(record: object) -> dict:
    """A KTO example as {"messages", "tools", "completions": [str], "labels": [bool]}.

    A prompt/completion/label record gives one completion; a preference pair gives two, its chosen answer
    desirable and its rejected one not.
    """
    if isinstance(record, dict) and ("chosen" in record or "response_chosen" in record):
        pair = to_preference(record)
        return {"messages": pair["messages"], "tools": pair["tools"],
                "completions": [pair["chosen"], pair["rejected"]], "labels": [True, False]}
    messages, field_name = _prompt_messages(record)
    validate_turns(messages, field_name, ends_with=USER_SIDE)
    label = record.get("label")
    if not isinstance(label, bool):
        raise DataError(f"label: expected true or false, got {json.dumps(label)}")
    return {"messages": messages, "tools": _tools_json(record), "completions": [_response(record, "completion")],
            "labels": [label]}


def to_prompt(record: object) -> dict:
    """A conversation to answer (inference input), as {"messages": [..., last user turn], "tools": str}.

    A final assistant turn (a reference answer) is dropped, and an Alpaca record may leave out its output.
    """
    kind = detect_format(record)
    if kind not in CONVERTERS:
        raise DataError(f"{FORMAT_KEYS[kind]}: a {kind} record where a conversation to answer was expected")
    if kind == "alpaca" and record.get("output") is None:
        record = {**record, "output": "-"}  # a placeholder answer, dropped below like a reference answer
    convert, field_name = CONVERTERS[kind]
    messages = convert(record)
    validate_turns(messages, field_name, ends_with=USER_SIDE | ASSISTANT_SIDE)
    if messages[-1]["role"] in ASSISTANT_SIDE:
        messages = messages[:-1]
    return {"messages": messages, "tools": _tools_json(record)}


def to_rl_prompts(record: object) -> dict:
    """Prompts for RL rollouts as {"prompts": [turns ending with a user turn, ...], "answers": [str], "tools": str}.

    A conversation (ShareGPT, OpenAI messages, Alpaca) gives one prompt per assistant turn: the history up to
    that turn ("" as its answer). A record with a reference "answer" (GRPO's question/answer and multiple-choice
    files) gives its question and that answer, for answer-checking rewards; {"prompt": ...} and text lines give
    one prompt.
    """
    kind = detect_format(record)
    if isinstance(record, dict) and "answer" in record:
        question = to_grpo(record)
        return {"prompts": [question["prompt"]], "answers": [question["answer"]], "tools": _tools_json(record)}
    if kind == "text":
        return {"prompts": [[{"role": "user", "content": _string(record["text"], "text")}]], "answers": [""],
                "tools": ""}
    if kind == "prompt":
        messages, field_name = _prompt_messages(record)
        validate_turns(messages, field_name, ends_with=USER_SIDE)
        return {"prompts": [messages], "answers": [""], "tools": _tools_json(record)}
    conversation = to_conversation(record)
    messages = conversation["messages"]
    prompts = [messages[:index] for index, message in enumerate(messages) if message["role"] in ASSISTANT_SIDE]
    return {"prompts": prompts, "answers": [""] * len(prompts), "tools": conversation["tools"]}

def _question_prompt(record: dict) -> str:
    """A question, with multiple-choice options ({"A": text, ...}) rendered below it as "A. text" lines."""
    question = _string(record["question"], "question")
    options = record.get("options")
    if options is None:
        return question
    if not isinstance(options, dict) or not options:
        raise DataError("options: expected an object mapping option letters to texts, e.g. {\"A\": \"...\"}")
    lines = [f"{letter}. {_string(text, f'options.{letter}')}" for letter, text in options.items()]
    return "\n".join([question, *lines])


def _reference_answer(record: dict) -> str:
    answer = record.get("answer")
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        return str(answer)
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise DataError("answer: missing")
    return _string(answer, "answer")


def to_grpo(record: object, system_prompt: str | None = None) -> dict:
    """A question with a verifiable answer as {"prompt": [turns ending with a user turn], "answer": str}.

    Accepts {"question", "answer"} (MedicalGPT's GRPO files), multiple choice {"question", "options", "answer"},
    and a prompt ({"messages"}, {"conversations"}, {"prompt"} or Alpaca {"instruction"}) ending with the user's
    turn plus "answer". system_prompt opens prompts that bring no system turn of their own.
    """
    kind = detect_format(record)
    if kind == "question":
        messages, field_name = [{"role": "user", "content": _question_prompt(record)}], "question"
    elif kind == "openai":
        messages, field_name = _openai(record), "messages"
    elif kind == "text":
        raise DataError("text: pretraining text where a question with an answer was expected")
    else:
        messages, field_name = _prompt_messages(record)
    validate_turns(messages, field_name, ends_with=USER_SIDE)
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return {"prompt": messages, "answer": _reference_answer(record)}

"""Normalised records written back as ShareGPT, OpenAI messages or Alpaca: the inverse of formats.py.

convert_dataset.py reads a record with the formats.py converters and writes it with these, so a converted file
reads back (through formats.py) to the same normalised record.
"""

import json

from medicalgpt.errors import DataError
from medicalgpt.tool_calls import is_call, to_openai_messages

SHAREGPT_FROM = {"user": "human", "assistant": "gpt", "function_call": "function_call", "observation": "observation"}
STYLES = ("sharegpt", "openai", "alpaca")


def _split_system(messages: list[dict]) -> tuple[str | None, list[dict]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


def _extras(system: str | None, tools: str, system_key: str) -> dict:
    """The optional system prompt and tool schemas, under the keys formats.py reads."""
    extras = {system_key: system} if system else {}
    return {**extras, "tools": json.loads(tools)} if tools else extras


def _openai_answer(answer: str) -> list[dict]:
    """A preference answer as OpenAI's [assistant message], with tool_calls when it is a call."""
    if is_call(answer):
        return to_openai_messages([{"role": "function_call", "content": answer}])
    return [{"role": "assistant", "content": answer}]


def _alpaca_pairs(turns: list[dict]) -> list[list[str]]:
    """The [question, answer] pairs before the last question of a plain user/assistant dialog (no tool turns)."""
    roles = {message["role"] for message in turns}
    if not roles <= {"user", "assistant"}:
        raise DataError(f"Alpaca records cannot hold {', '.join(sorted(roles - {'user', 'assistant'}))} turns")
    return [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns) - 1, 2)]


def _alpaca_prompt(turns: list[dict], system: str | None, tools: str) -> dict:
    """An Alpaca instruction (the last user turn) with the earlier exchanges as history.

    turns alternate user/assistant and end with a user turn: formats.validate_turns has checked that.
    """
    history = _alpaca_pairs(turns)
    record = {"instruction": turns[-1]["content"], "input": ""}
    return {**record, **({"history": history} if history else {}), **_extras(system, tools, "system")}


def write_conversation(record: dict, style: str) -> dict:
    """A normalised conversation {"messages", "tools"} as a record in style (sharegpt, openai, alpaca)."""
    system, turns = _split_system(record["messages"])
    if style == "sharegpt":
        conversations = [{"from": SHAREGPT_FROM[m["role"]], "value": m["content"]} for m in turns]
        return {"conversations": conversations, **_extras(system, record["tools"], "system_prompt")}
    if style == "openai":
        return {"messages": to_openai_messages(record["messages"]), **_extras(None, record["tools"], "")}
    prompt = _alpaca_prompt(turns[:-1], system, record["tools"])
    return {**prompt, "output": turns[-1]["content"]}


def write_preference(record: dict, style: str) -> dict:
    """A normalised preference pair {"messages", "tools", "chosen", "rejected"} as a record in style."""
    system, turns = _split_system(record["messages"])
    answers = {"chosen": record["chosen"], "rejected": record["rejected"]}
    if style == "sharegpt":
        prompt = write_conversation(record, "sharegpt")
    elif style == "openai":
        prompt = {"prompt": write_conversation(record, "openai")["messages"]}
        prompt.update(_extras(None, record["tools"], ""))
        answers = {key: _openai_answer(text) for key, text in answers.items()}
    else:
        prompt = _alpaca_prompt(turns, system, record["tools"])
    return {**prompt, **answers}

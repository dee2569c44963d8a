"""Tool calling end to end: tool data read in every shape and normalised, rendered in each family's format with loss
on the calls and the answer only, converted without loss, validated by file:line, served through the OpenAI API
(an agent loop with the official client), and evaluated."""

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

import convert_dataset
import dpo_training
import inference
import openai_api
import supervised_finetuning
import validate_data
from medicalgpt.args import ModelArguments
from medicalgpt.data import iter_records, to_conversation, to_preference
from medicalgpt.data.processors import prompt_and_response
from medicalgpt.errors import DataError
from medicalgpt.sample_tools import call_sample_tool, run_sample_tool
from medicalgpt.serving import ServeArguments, load_chat_model
from medicalgpt.templates import IGNORE_INDEX, get_template, resolve_template
from medicalgpt.tool_calls import CallStream, CallTurn, get_tool_format, read_call_turn
from tests.ports import api_server
from tests.test_serving import openai_client
from tests.test_templates import SPECIAL_TOKENS, template_tokenizer

REPO = Path(__file__).resolve().parents[1]
DOSE_TOOL = {"name": "lookup_drug_dose", "description": "成人/儿童常用剂量", "parameters": {
    "type": "object", "properties": {"drug": {"type": "string"}, "population": {"type": "string"}},
    "required": ["drug", "population"]}}
DEPT_TOOL = {"name": "find_department", "description": "症状对应的科室", "parameters": {
    "type": "object", "properties": {"symptom": {"type": "string"}}, "required": ["symptom"]}}
CALL = {"name": "lookup_drug_dose", "arguments": {"drug": "二甲双胍", "population": "成人"}}
RESULT = '{"dose": "500 mg 每日两次"}'
# MedicalGPT's tool-call SFT shape: tools as a JSON string, the call as a JSON string in a function_call turn.
SHAREGPT = {"conversations": [
    {"from": "human", "value": "二甲双胍成人怎么吃？"},
    {"from": "function_call", "value": json.dumps(CALL, ensure_ascii=False)},
    {"from": "observation", "value": RESULT},
    {"from": "gpt", "value": "成人起始 500 mg，每日两次。"}], "tools": json.dumps([DOSE_TOOL], ensure_ascii=False)}
# MedicalGPT's tool-call preference shape: a ReAct call as the chosen answer.
REACT_PAIR = {"conversations": [{"from": "human", "value": "二甲双胍成人怎么吃？"}], "tools": [DOSE_TOOL],
              "chosen": "Action: lookup_drug_dose\nAction Input: {\"drug\": \"二甲双胍\", \"population\": \"成人\"}\n",
              "rejected": "一天吃很多次。"}


def openai_call(name: str, arguments: dict, text_arguments: bool = True) -> dict:
    return {"id": f"call_{name}", "type": "function", "function": {
        "name": name, "arguments": json.dumps(arguments, ensure_ascii=False) if text_arguments else arguments}}


def test_sharegpt_tools_as_string_or_list_and_call_turns():
    as_string = to_conversation(SHAREGPT)
    as_list = to_conversation({**SHAREGPT, "tools": [DOSE_TOOL]})
    assert as_string == as_list
    assert [m["role"] for m in as_string["messages"]] == ["user", "function_call", "observation", "assistant"]
    assert json.loads(as_string["messages"][1]["content"]) == CALL
    assert json.loads(as_string["tools"]) == [DOSE_TOOL]


def test_openai_calls_with_text_and_several_calls_in_one_turn():
    record = {"messages": [
        {"role": "user", "content": "二甲双胍的剂量，还有头痛看哪个科？"},
        {"role": "assistant", "content": "我查一下。", "tool_calls": [
            openai_call("lookup_drug_dose", CALL["arguments"]),
            openai_call("find_department", {"symptom": "头痛"}, text_arguments=False)]},
        {"role": "tool", "tool_call_id": "call_lookup_drug_dose", "content": RESULT},
        {"role": "tool", "tool_call_id": "call_find_department", "content": '{"department": "神经内科"}'},
        {"role": "assistant", "content": "500 mg 每日两次；头痛看神经内科。"}], "tools": [DOSE_TOOL, DEPT_TOOL]}
    messages = to_conversation(record)["messages"]
    assert [m["role"] for m in messages] == ["user", "function_call", "observation", "assistant"]
    turn = read_call_turn(messages[1]["content"])
    assert turn == CallTurn([CALL, {"name": "find_department", "arguments": {"symptom": "头痛"}}], "我查一下。")
    # Rendered as Qwen2.5 does: the text, then each call in its tags; both results in one user turn.
    text = "".join(t for t, _ in get_template("qwen")._segments(_NoSpecials(), messages, [DOSE_TOOL, DEPT_TOOL]))
    assert ("<|im_start|>assistant\n我查一下。\n<tool_call>\n" + json.dumps(CALL, ensure_ascii=False)
            + "\n</tool_call>\n<tool_call>\n{\"name\": \"find_department\", \"arguments\": {\"symptom\": \"头痛\"}}"
            "\n</tool_call><|im_end|>\n") in text
    assert ("<|im_start|>user\n<tool_response>\n" + RESULT + "\n</tool_response>\n<tool_response>\n"
            "{\"department\": \"神经内科\"}\n</tool_response><|im_end|>\n") in text


class _NoSpecials:
    """A stand-in tokenizer for rendering text only (no special tokens to escape)."""

    added_tokens_decoder: dict = {}


@pytest.mark.parametrize("name", ["qwen", "llama3", "chatml", "mistral_v3", "glm4"])
def test_loss_on_calls_and_answer_never_on_tool_results(tokenizer, name):
    tok = template_tokenizer(tokenizer, name)
    record = to_conversation(SHAREGPT)
    template = get_template(name)
    ids, labels = template.encode(tok, record["messages"], json.loads(record["tools"]))
    trained = tok.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])
    untrained = tok.decode([i for i, label in zip(ids, labels) if label == IGNORE_INDEX])
    call = template.tools_format.render_calls(record["messages"][1]["content"])
    assert call in trained and "成人起始 500 mg，每日两次。" in trained
    assert RESULT not in trained and RESULT in untrained and "lookup_drug_dose" in untrained  # the tools section
    expected_call = {"qwen": "<tool_call>\n" + json.dumps(CALL, ensure_ascii=False) + "\n</tool_call>",
                     "chatml": "<tool_call>\n" + json.dumps(CALL, ensure_ascii=False) + "\n</tool_call>",
                     "llama3": json.dumps({"name": CALL["name"], "parameters": CALL["arguments"]}, ensure_ascii=False),
                     "mistral_v3": "[TOOL_CALLS] [" + json.dumps({**CALL, "id": "000000000"}, ensure_ascii=False) + "]",
                     "glm4": CALL["name"] + "\n" + json.dumps(CALL["arguments"], ensure_ascii=False)}
    assert call == expected_call[name]


def test_react_preference_answer_becomes_a_call_in_the_template_format(tokenizer):
    pair = to_preference(REACT_PAIR)
    assert json.loads(pair["chosen"]) == CALL and pair["rejected"] == "一天吃很多次。"
    tok = template_tokenizer(tokenizer, "qwen")
    prompt, chosen = prompt_and_response(tok, get_template("qwen"), pair["messages"], [DOSE_TOOL], pair["chosen"])
    assert tok.decode(chosen) == "<tool_call>\n" + json.dumps(CALL, ensure_ascii=False) + "\n</tool_call><|im_end|>"
    # the OpenAI shape of a pair whose chosen answer is a call reads back to the same pair
    openai_pair = {"prompt": [{"role": "user", "content": "二甲双胍成人怎么吃？"}], "tools": [DOSE_TOOL],
                   "chosen": [{"role": "assistant", "content": None, "tool_calls": [openai_call(**CALL)]}],
                   "rejected": [{"role": "assistant", "content": "一天吃很多次。"}]}
    assert to_preference(openai_pair) == pair


def test_medicalgpts_tool_sft_and_dpo_shapes_train_as_they_are(tmp_path, tiny_model_dir):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft/glaive_toolcall.jsonl").write_text((json.dumps(SHAREGPT, ensure_ascii=False) + "\n") * 4,
                                                        encoding="utf-8")
    pairs = {**REACT_PAIR, "tools": json.dumps(REACT_PAIR["tools"], ensure_ascii=False)}
    (tmp_path / "dpo").mkdir()
    (tmp_path / "dpo/toolcall_dpo.jsonl").write_text((json.dumps(pairs, ensure_ascii=False) + "\n") * 4,
                                                     encoding="utf-8")
    fast = ["--model_name_or_path", tiny_model_dir, "--max_steps", "1", "--per_device_train_batch_size", "2",
            "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True", "--max_length", "512"]
    assert supervised_finetuning.main([*fast, "--train_file_dir", str(tmp_path / "sft"),
                                       "--output_dir", str(tmp_path / "out_sft")])["train_loss"] > 0
    assert dpo_training.main([*fast, "--train_file_dir", str(tmp_path / "dpo"),
                              "--output_dir", str(tmp_path / "out_dpo")])["train_loss"] > 0


def test_sharegpt_openai_sharegpt_round_trip_is_lossless(tmp_path):
    parallel = {"conversations": [
        {"from": "human", "value": "查剂量和科室"},
        {"from": "function_call", "value": json.dumps({"content": "好的。", "tool_calls": [
            CALL, {"name": "find_department", "arguments": {"symptom": "头痛"}}]}, ensure_ascii=False)},
        {"from": "observation", "value": json.dumps({"tool_results": [RESULT, "{}"]}, ensure_ascii=False)},
        {"from": "gpt", "value": "好。"}], "tools": [DOSE_TOOL, DEPT_TOOL], "system_prompt": "你是医生。"}
    source = tmp_path / "tools.jsonl"
    source.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [SHAREGPT, parallel]) + "\n",
                      encoding="utf-8")
    convert_dataset.main([str(source), str(tmp_path / "openai.jsonl"), "--to", "openai"])
    convert_dataset.main([str(tmp_path / "openai.jsonl"), str(tmp_path / "back.jsonl"), "--to", "sharegpt"])
    openai_records = [r for _, r in iter_records(tmp_path / "openai.jsonl")]
    assert openai_records[0]["messages"][1]["tool_calls"] == [{"type": "function", "function": CALL}]
    assert "\\u" not in (tmp_path / "openai.jsonl").read_text(encoding="utf-8")  # arguments are objects
    assert [m["role"] for m in openai_records[1]["messages"]] == ["system", "user", "assistant", "tool", "tool",
                                                                  "assistant"]
    back = [r for _, r in iter_records(tmp_path / "back.jsonl")]
    assert [to_conversation(r) for r in back] == [to_conversation(r) for r in (SHAREGPT, parallel)]
    assert json.loads(back[0]["conversations"][1]["value"]) == CALL


def test_validate_data_reports_tool_schema_errors_by_file_and_line(tmp_path, capsys, tiny_model_dir):
    def with_call(value: str) -> dict:
        turns = [dict(t) for t in SHAREGPT["conversations"]]
        turns[1]["value"] = value
        return {**SHAREGPT, "conversations": turns}

    records = [SHAREGPT, with_call("{\"name\": \"lookup_drug_dose\", \"arguments\": {"),
               with_call(json.dumps({"name": "book_visit", "arguments": {}})),
               with_call(json.dumps({"name": "lookup_drug_dose", "arguments": {"drug": "x"}}))]
    data = tmp_path / "tools.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        validate_data.main([str(data), "--stage", "sft", "--model_name_or_path", tiny_model_dir])
    out = capsys.readouterr().out
    assert f"{data}:2: conversations[1].value: a tool call must be JSON" in out
    assert f"{data}:3: messages[1]: calls 'book_visit', which is not in tools (tools: lookup_drug_dose)" in out
    assert f"{data}:4: messages[1]: lookup_drug_dose misses required arguments population" in out
    assert "4 records" not in out and "1 good records, 3 bad" in out


@pytest.mark.parametrize("name, text", [
    ("qwen", "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>"),
    ("llama3", "{\"name\": \"f\", \"parameters\": {\"a\": 1}}"),
    ("mistral", "[TOOL_CALLS] [{\"name\": \"f\", \"arguments\": {\"a\": 1}, \"id\": \"000000000\"}]"),
    ("glm4", "f\n{\"a\": 1}"),
    ("json", "{\"name\": \"f\", \"arguments\": {\"a\": 1}}"),
])
def test_each_format_parses_what_it_renders(name, text):
    fmt = get_tool_format(name)
    turn = CallTurn([{"name": "f", "arguments": {"a": 1}}])
    assert fmt.render_calls(turn.content()) == text
    assert fmt.parse(text) == turn
    assert fmt.parse(text[:-3]) is None  # a call cut short is no call: the text comes back as content
    assert fmt.parse("plain answer") is None


TEXT_AND_CALLS = CallTurn([{"name": "lookup_drug_dose", "arguments": {"drug": "布洛芬", "population": "child"}},
                           {"name": "find_department", "arguments": {"symptom": "头痛"}}], "我查一下; 稍等。")


@pytest.mark.parametrize("name", ["qwen", "llama3", "mistral", "glm4", "json"])
def test_text_before_several_calls_survives_rendering_parsing_and_streaming(name):
    fmt = get_tool_format(name)
    rendered = fmt.render_calls(TEXT_AND_CALLS.content())
    assert fmt.parse(rendered) == TEXT_AND_CALLS
    stream = CallStream(fmt)
    sent = "".join(stream.feed(rendered[i:i + 5]) for i in range(0, len(rendered), 5))
    assert stream.finish() == (TEXT_AND_CALLS, "")
    assert TEXT_AND_CALLS.text.startswith(sent.strip())  # the calls (and what joins them to it) are held
    assert "lookup_drug_dose" not in sent and "{" not in sent and not sent.strip().endswith(";")


def test_calls_whose_marker_token_decoding_dropped_still_parse():
    """[TOOL_CALLS] and <|assistant|> are special tokens, which generation decodes away."""
    mistral, glm4 = get_tool_format("mistral"), get_tool_format("glm4")
    calls = TEXT_AND_CALLS.calls
    assert mistral.parse(" " + mistral.render_calls(CallTurn(calls).content()).removeprefix("[TOOL_CALLS]")) == \
        CallTurn(calls)
    assert glm4.parse(glm4.render_calls(TEXT_AND_CALLS.content()).replace("<|assistant|>", "")) == TEXT_AND_CALLS
    assert mistral.forced_prefix("f") == '[TOOL_CALLS] [{"name": "f", "arguments": '
    assert glm4.forced_prefix("f") == "f\n"
    for plain in ["I have a headache [1].", "Take it\n{with food}", "[{\"name\": \"f\", \"arguments\": ",
                  "The dose is below\n{\"dose\": \"5 mg\"}"]:
        assert mistral.parse(plain) is None and glm4.parse(plain) is None


def test_streamed_text_goes_out_until_a_call_begins_even_with_its_tag_cut_between_pieces():
    stream = CallStream(get_tool_format("qwen"))
    pieces = ["I will check.", "\n<tool", "_call>\n{\"name\": \"f\", ", "\"arguments\": {}}\n</tool_call>"]
    sent = [stream.feed(piece) for piece in pieces]
    assert "".join(sent) == "I will check.\n" and sent[1] == "\n"  # the cut tag is held, not sent
    assert stream.finish() == (CallTurn([{"name": "f", "arguments": {}}], "I will check."), "")
    plain = CallStream(get_tool_format("json"))
    assert [plain.feed(p) for p in [" ", "{\"a\": ", "1} is JSON, not a call"]] == ["", "", ""]
    assert plain.finish() == (None, " {\"a\": 1} is JSON, not a call")  # held, then sent as content
    forced = CallStream(get_tool_format("qwen"), prefix=get_tool_format("qwen").forced_prefix("f"))
    forced.feed("{\"x\": 2}}\n</tool_call>")
    assert forced.finish() == (CallTurn([{"name": "f", "arguments": {"x": 2}}]), "")


def test_tool_format_flag_and_the_tokenizer_template_say_the_format(tokenizer):
    assert resolve_template(tokenizer, "mistral", tool_format="qwen").tool_format == "qwen"
    assert resolve_template(tokenizer, "qwen").tool_format == "qwen"
    with pytest.raises(ValueError, match="'xml'; known formats: qwen, llama3, mistral, glm4, json"):
        resolve_template(tokenizer, "chatml", tool_format="xml")
    with pytest.raises(DataError, match="a tool call must be JSON"):
        read_call_turn("call lookup_drug_dose please")


# --- serving: a tiny model that has learnt one agent exchange answers through the OpenAI API -------------------

TOOL = {"type": "function", "function": {"name": "find_department", "description": "Department for a symptom",
                                         "parameters": {"type": "object", "properties": {"symptom": {
                                             "type": "string"}}, "required": ["symptom"]}}}
QUESTION, SYMPTOM = "头痛看哪个科？", {"symptom": "头痛"}
FOUND, ANSWER = run_sample_tool("find_department", SYMPTOM), "请看心内科或感染科。"  # the sample tool's real result
AGENT_TURNS = [{"role": "user", "content": QUESTION},
               {"role": "function_call", "content": json.dumps({"name": "find_department", "arguments": SYMPTOM},
                                                               ensure_ascii=False)},
               {"role": "observation", "content": FOUND}, {"role": "assistant", "content": ANSWER}]


def fine_tuned_on_the_exchange(tiny_model_dir: str, out: Path, template_name: str | None = None,
                               special_tokens: list[str] | None = None, steps: int = 150) -> str:
    """The tiny model fully fine-tuned on one exchange (call find_department, then answer from its result) in the
    template's format; special_tokens: the family's control tokens, added to the tokenizer as its own has them."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)  # the new tokens' embeddings are drawn at random too
    if special_tokens:
        tok.add_special_tokens({"additional_special_tokens": special_tokens}, replace_extra_special_tokens=False)
        model.resize_token_embeddings(len(tok))
    ids, labels = resolve_template(tok, template_name).encode(tok, AGENT_TURNS, [TOOL])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)  # decays: stays learnt
    for _ in range(steps):
        model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def tool_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    return fine_tuned_on_the_exchange(tiny_model_dir, tmp_path_factory.mktemp("tool_model"))


@pytest.fixture(scope="module")
def tool_client(tool_model_dir) -> Iterator[openai.OpenAI]:
    chat = load_chat_model(ModelArguments(model_name_or_path=tool_model_dir), ServeArguments())
    with openai_client(openai_api.create_app(chat, max_new_tokens=96)) as client:
        yield client


def ask_with_tools(client: openai.OpenAI, **kwargs):
    return client.chat.completions.create(model="medicalgpt", messages=[{"role": "user", "content": QUESTION}],
                                          tools=[TOOL], temperature=0, **kwargs)


def test_a_call_comes_back_as_tool_calls_streamed_or_not(tool_client):
    reply = ask_with_tools(tool_client)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "find_department"
    assert json.loads(call.function.arguments) == SYMPTOM
    chunks = [c for c in ask_with_tools(tool_client, stream=True) if c.choices]
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
    # as OpenAI streams them: id, type and name with empty arguments first, then the arguments
    assert deltas[0][0].index == 0 and deltas[0][0].id.startswith("call_") and deltas[0][0].type == "function"
    assert deltas[0][0].function.name == "find_department" and deltas[0][0].function.arguments == ""
    assert json.loads("".join(d[0].function.arguments for d in deltas)) == SYMPTOM
    assert not any(c.choices[0].delta.content for c in chunks)  # the call's text is not also sent as content
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "find_department"}}])
def test_required_and_named_tool_choice_force_a_call(tool_client, tool_choice):
    reply = ask_with_tools(tool_client, tool_choice=tool_choice)
    assert reply.choices[0].finish_reason == "tool_calls"
    assert reply.choices[0].message.tool_calls[0].function.name == "find_department"


def test_tool_choice_none_answers_in_text(tool_client):
    reply = ask_with_tools(tool_client, tool_choice="none", max_tokens=8)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason != "tool_calls"


def test_a_call_that_does_not_parse_comes_back_as_content(tool_client):
    reply = ask_with_tools(tool_client, max_tokens=20)  # the call is cut off before its JSON ends
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content.startswith("<tool_call>\n{\"name\"")
    streamed = [c for c in ask_with_tools(tool_client, max_tokens=20, stream=True) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == reply.choices[0].message.content


@pytest.mark.parametrize("change, status, param", [
    ({"tool_choice": "required", "tools": None}, 400, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "book_visit"}}}, 400, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, 422, "tools"),
    ({"tools": "find_department"}, 422, "tools"),
    ({"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "find_department", "arguments": "{\"symptom\": "}}]},
        {"role": "tool", "tool_call_id": "c1", "content": FOUND}]}, 400, "messages"),
    ({"messages": [{"role": "tool", "content": {"x": 1}}]}, 422, "messages"),
])
def test_hostile_tool_requests_are_4xx_not_500(tool_model_dir, change, status, param):
    chat = load_chat_model(ModelArguments(model_name_or_path=tool_model_dir), ServeArguments())
    body = {"model": "medicalgpt", "messages": [{"role": "user", "content": QUESTION}], "tools": [TOOL], **change}
    with TestClient(openai_api.create_app(chat, max_new_tokens=4)) as http:
        response = http.post("/v1/chat/completions", json={k: v for k, v in body.items() if v is not None})
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_the_official_client_runs_an_agent_loop_against_the_server(tool_model_dir, tmp_path):
    tools = {"find_department": lambda symptom: FOUND}  # the client's own tool
    with api_server(tool_model_dir, "sk-agent", tmp_path / "server.log") as url:
        client = openai.OpenAI(api_key="sk-agent", base_url=url, max_retries=0)
        messages = [{"role": "user", "content": QUESTION}]
        first = client.chat.completions.create(model="medicalgpt", messages=messages, tools=[TOOL], temperature=0)
        assert first.choices[0].finish_reason == "tool_calls"
        messages.append(first.choices[0].message)  # as agents do: the assistant's message object as it came
        for call in first.choices[0].message.tool_calls:
            result = tools[call.function.name](**json.loads(call.function.arguments))
            messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
        final = client.chat.completions.create(model="medicalgpt", messages=messages, tools=[TOOL], temperature=0)
    assert final.choices[0].finish_reason == "stop" and final.choices[0].message.content == ANSWER
    assert final.choices[0].message.tool_calls is None


# Mistral's longer calls, with new (random) token embeddings, take more steps to learn word for word.
@pytest.mark.parametrize("template_name, steps", [("mistral_v3", 250), ("glm4", 150)])
def test_native_formats_run_the_agent_loop_with_their_marker_tokens_decoded_away(tiny_model_dir, tmp_path,
                                                                                 template_name, steps):
    """Generation decodes special tokens away ([TOOL_CALLS], <|assistant|>): the calls still come back parsed."""
    model_dir = fine_tuned_on_the_exchange(tiny_model_dir, tmp_path, template_name, SPECIAL_TOKENS[template_name],
                                           steps)
    chat = load_chat_model(ModelArguments(model_name_or_path=model_dir), ServeArguments(template_name=template_name))
    with openai_client(openai_api.create_app(chat, max_new_tokens=96)) as client:
        first = ask_with_tools(client)
        (call,) = first.choices[0].message.tool_calls
        assert (call.function.name, json.loads(call.function.arguments)) == ("find_department", SYMPTOM)
        chunks = [c for c in ask_with_tools(client, stream=True) if c.choices]
        deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
        assert json.loads("".join(d[0].function.arguments for d in deltas)) == SYMPTOM
        assert not any(c.choices[0].delta.content for c in chunks)
        messages = [{"role": "user", "content": QUESTION}, first.choices[0].message,
                    {"role": "tool", "tool_call_id": call.id, "content": FOUND}]
        final = client.chat.completions.create(model="medicalgpt", messages=messages, tools=[TOOL], temperature=0)
    # (GLM-4 opens an answer with "\n", Mistral with " ": the format's, as the API sends it)
    assert final.choices[0].message.content.strip() == ANSWER and final.choices[0].finish_reason == "stop"


def test_inference_returns_the_calls_parsed(tool_model_dir, tmp_path):
    record = {"messages": AGENT_TURNS[:1], "tools": [TOOL]}
    (tmp_path / "ask.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    inference.main(["--base_model", tool_model_dir, "--data_file", str(tmp_path / "ask.jsonl"), "--output_file",
                    str(tmp_path / "out.jsonl"), "--temperature", "0", "--max_new_tokens", "96"])
    (row,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert row["tool_calls"] == [{"name": "find_department", "arguments": SYMPTOM}] and row["response"] == ""


def test_demo_runs_the_sample_tool_the_model_calls_and_answers_with_its_result(tool_model_dir):
    import gradio_demo
    from data.knowledge import CONDITIONS

    chat = load_chat_model(ModelArguments(model_name_or_path=tool_model_dir), ServeArguments())
    requests, encode = [], chat.encode

    def recorded(messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        requests.append(messages)
        return encode(messages, tools)

    chat.encode = recorded
    respond = gradio_demo.responder(chat, tools=gradio_demo.LocalTools([TOOL], run_sample_tool))
    views = list(respond(QUESTION, [], "", 0.0, 1.0, 96))
    step, answer = views[-1]
    assert step.metadata == {"title": "🛠️ find_department({\"symptom\": \"头痛\"})", "status": "done"}
    departments = sorted({c["department_zh"] for c in CONDITIONS if "头痛" in c["symptoms_zh"]})
    assert json.loads(step.content) == {"symptom": "头痛", "departments": departments} and departments
    assert answer == ANSWER
    assert not any("<tool_call>" in str(view) for view in views)  # the call's text is shown as the call only
    # The second request sends the call and its result back, the result as the template writes a tool message.
    first, second = requests
    assert second[len(first):] == [
        {"role": "function_call", "content": json.dumps({"name": "find_department", "arguments": SYMPTOM},
                                                        ensure_ascii=False)},
        {"role": "observation", "content": step.content}]
    assert f"<tool_response>\n{step.content}\n</tool_response>" in chat.tokenizer.decode(encode(second, [TOOL]))
    # Shown history goes back as the question and the answer: the tool step is for the reader.
    shown = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": step.content,
                                                     "metadata": step.metadata},
             {"role": "assistant", "content": answer}]
    assert gradio_demo.normalise_history(shown) == [shown[0], shown[2]]


def test_demo_shows_a_call_that_does_not_parse_as_text_and_runs_nothing(tool_model_dir):
    import gradio_demo

    chat = load_chat_model(ModelArguments(model_name_or_path=tool_model_dir), ServeArguments())
    ran = []
    respond = gradio_demo.responder(chat, tools=gradio_demo.LocalTools([TOOL], lambda *call: ran.append(call)))
    shown = list(respond(QUESTION, [], "", 0.0, 1.0, 20))[-1]  # cut off before the call's JSON ends
    assert isinstance(shown, str) and shown.startswith("<tool_call>\n{\"name\"") and not ran


def test_sample_tools_answer_from_the_knowledge_table():
    from data.knowledge import CONDITIONS, WEIGHT_BASED_DOSES

    gout = next(c for c in CONDITIONS if c["id"] == "gout")
    assert call_sample_tool("recommend_exam", {"condition": gout["name_en"]}) == {
        "condition": gout["name_en"], "exam": gout["exam_en"]}
    assert call_sample_tool("lookup_drug_dose", {"drug": gout["drug_zh"], "population": "adult"}) == {
        "drug": gout["drug_zh"], "dose": gout["dose_zh"]}
    child = WEIGHT_BASED_DOSES[0]
    assert call_sample_tool("lookup_drug_dose", {"drug": child["drug_en"], "population": "child"}) == {
        "drug": child["drug_en"], "dose": f"{child['mg_per_kg_per_dose']} mg/kg per dose, "
                                         f"{child['doses_per_day']} times a day"}
    # What the table cannot answer, and calls the schema does not take, answer with an error, never raise.
    for name, arguments in [("recommend_exam", {"condition": "no such disease"}), ("book_visit", {}),
                            ("lookup_drug_dose", {"drug": gout["drug_en"]}),
                            ("find_department", {"symptom": "头痛", "age": 3})]:
        assert set(call_sample_tool(name, arguments)) == {"error"}


def test_demo_tools_flag_offers_and_runs_the_sample_tools(tool_model_dir, monkeypatch):
    import gradio as gr

    import gradio_demo
    from data.knowledge import CONDITIONS
    from medicalgpt.serving import ChatModel

    launched, prompts = [], []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.append(self))
    replies = iter(['<tool_call>\n{"name": "lookup_drug_dose", "arguments": {"drug": "二甲双胍", '
                    '"population": "adult"}}\n</tool_call>', "每次500毫克。"])

    def scripted(self, prompt, max_new_tokens, stop=None, **kwargs):  # generation fixed: any model may take the flag
        prompts.append(self.tokenizer.decode(prompt))
        reply = next(replies)
        yield from (reply[i:i + 4] for i in range(0, len(reply), 4))

    monkeypatch.setattr(ChatModel, "stream", scripted)
    gradio_demo.main(["--base_model", tool_model_dir, "--tools", "sample"])
    (demo,) = launched
    step, answer = list(demo.fn("二甲双胍成人怎么用？", [], "", 0.0, 1.0, 64, None))[-1]
    diabetes = next(c for c in CONDITIONS if c["drug_zh"] == "二甲双胍")
    assert step.metadata["title"] == '🛠️ lookup_drug_dose({"drug": "二甲双胍", "population": "adult"})'
    assert json.loads(step.content) == {"drug": "二甲双胍", "dose": diabetes["dose_zh"]} and answer == "每次500毫克。"
    assert all(name in prompts[0] for name in ("lookup_drug_dose", "find_department", "recommend_exam"))
    assert f"<tool_response>\n{step.content}\n</tool_response>" in prompts[1]
    assert demo.examples == [[question] for question in gradio_demo.TOOL_EXAMPLES]

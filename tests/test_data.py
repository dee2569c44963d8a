"""Data layer: format detection and normalisation, file:line errors, skips, splits, processors."""

import json
import logging
from types import SimpleNamespace

import pytest
from datasets import Dataset, DatasetDict

from medicalgpt.data import (
    DataError,
    build_pretraining_splits,
    build_sft_splits,
    detect_format,
    load_splits,
    sorted_by_length,
    to_conversation,
    to_text,
)
from medicalgpt.templates import get_template

SHAREGPT = {"conversations": [{"from": "human", "value": "高血压吃什么药？"}, {"from": "gpt", "value": "氨氯地平。"}],
            "system_prompt": "你是医生。"}
OPENAI = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Dose?"}]},
                       {"role": "assistant", "content": "500 mg."}]}
ALPACA = {"instruction": "Name the exam.", "input": "Asthma", "output": "Spirometry.", "system": "Be brief.",
          "history": [["Hi", "Hello."]]}


def data_args(**overrides) -> SimpleNamespace:
    base = dict(train_file_dir=None, validation_file_dir=None, dataset_name=None, dataset_config_name=None,
                validation_split_percentage=0.0, max_train_samples=None, max_eval_samples=None,
                skip_bad_records=False, deidentify=False)
    return SimpleNamespace(**{**base, **overrides})


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("record, expected", [(SHAREGPT, "sharegpt"), (OPENAI, "openai"), (ALPACA, "alpaca"),
                                              ({"text": "doc"}, "text")])
def test_detect_format(record, expected):
    assert detect_format(record) == expected


def test_sharegpt_normalises_roles_system_and_tools():
    record = {**SHAREGPT, "tools": json.dumps([{"name": "lookup", "parameters": {}}])}
    conversation = to_conversation(record)
    assert [m["role"] for m in conversation["messages"]] == ["system", "user", "assistant"]
    assert conversation["messages"][0]["content"] == "你是医生。"
    assert json.loads(conversation["tools"]) == [{"name": "lookup", "parameters": {}}]


def test_sharegpt_tool_turns():
    record = {"conversations": [
        {"from": "human", "value": "Look up metformin."}, {"from": "function_call", "value": '{"name": "lookup"}'},
        {"from": "observation", "value": '{"dose": "500 mg"}'}, {"from": "gpt", "value": "500 mg twice daily."}]}
    roles = [m["role"] for m in to_conversation(record)["messages"]]
    assert roles == ["user", "function_call", "observation", "assistant"]


def test_openai_joins_content_parts():
    messages = to_conversation(OPENAI)["messages"]
    assert messages == [{"role": "user", "content": "Dose?"}, {"role": "assistant", "content": "500 mg."}]


def test_alpaca_history_input_and_system():
    messages = to_conversation(ALPACA)["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[3]["content"] == "Name the exam.\nAsthma"


def test_a_question_with_its_answer_is_one_exchange():
    """GRPO's question/answer files train SFT on the answer format (the main job's GRPO warm-up)."""
    record = {"question": "Which drug?", "options": {"A": "aspirin", "B": "omeprazole"}, "answer": "B"}
    question = "Which drug?\nA. aspirin\nB. omeprazole"
    assert to_conversation(record)["messages"] == [{"role": "user", "content": question},
                                                   {"role": "assistant", "content": "B"}]
    with pytest.raises(DataError, match="answer: missing"):
        to_conversation({"question": "Which drug?"})


@pytest.mark.parametrize("record, message", [
    ({"conversations": [{"from": "doctor", "value": "x"}]}, "conversations[0].from: unknown role 'doctor'"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "must end with an assistant turn"),
    ({"conversations": [{"from": "gpt", "value": "a"}]}, "conversations[0]: expected a user"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}]},
     "conversations[1]: expected an assistant"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
     "conversations[1].value: empty"),
    ({"conversations": []}, "conversations: expected a non-empty list"),
    ({"conversations": ["hi"]}, "conversations[0]: expected an object, got str"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]},
     "messages[1].role: a system turn may only come first"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content: expected a string, got int"),
    ({"instruction": "q"}, "output: expected a string"),
    ({"body": "q"}, "unknown record format"),
    ({"text": "doc"}, "text: a text record where a conversation"),
])
def test_bad_conversations_name_the_field(record, message):
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        to_conversation(record)


def test_pretraining_rejects_conversations():
    assert to_text({"text": "doc"}) == {"text": "doc"}
    with pytest.raises(DataError, match="pretraining text"):
        to_text(SHAREGPT)


def test_error_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [SHAREGPT, SHAREGPT, {"conversations": [{"from": "bot", "value": "x"}]}])
    with pytest.raises(DataError, match=r"sft\.jsonl:3: conversations\[0\]\.from: unknown role 'bot'"):
        load_splits(data_args(train_file_dir=path), to_conversation)


def test_malformed_json_and_bad_utf8_name_their_lines(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [SHAREGPT, '{"conversations": [', SHAREGPT])
    with pytest.raises(DataError, match=r"a\.jsonl:2: invalid JSON"):
        load_splits(data_args(train_file_dir=path), to_conversation)
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"fine line\n\xff\xfe broken\n")
    with pytest.raises(DataError, match=r"b\.txt:2: not valid UTF-8"):
        load_splits(data_args(train_file_dir=str(binary)), to_text)


def test_skip_bad_records_counts_and_keeps_the_good(tmp_path, caplog):
    path = write_jsonl(tmp_path / "mixed.jsonl", [SHAREGPT, "not json", {"conversations": "x"}, SHAREGPT])
    splits = load_splits(data_args(train_file_dir=path, skip_bad_records=True), to_conversation)
    assert len(splits["train"]) == 2
    assert "Skipped 2 bad records" in caplog.text and "mixed.jsonl:2" in caplog.text


def test_mixed_formats_in_one_file_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [SHAREGPT, OPENAI])
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: mixed formats in one file: a openai record"):
        load_splits(data_args(train_file_dir=path), to_conversation)


def test_directory_json_array_and_parquet(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([SHAREGPT, SHAREGPT]), encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", [ALPACA])
    Dataset.from_list([{"text": "x"}]).to_parquet(str(tmp_path / "skip.other"))  # ignored: not a data suffix
    splits = load_splits(data_args(train_file_dir=str(tmp_path)), to_conversation)
    assert len(splits["train"]) == 3
    Dataset.from_list([{"text": "doc one"}, {"text": "doc two"}]).to_parquet(str(tmp_path / "pt.parquet"))
    assert load_splits(data_args(train_file_dir=str(tmp_path / "pt.parquet")), to_text)["train"]["text"] == [
        "doc one", "doc two"]


def test_empty_inputs_get_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files"):
        load_splits(data_args(train_file_dir=str(tmp_path / "empty")), to_text)
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(DataError, match="training set is empty"):
        load_splits(data_args(train_file_dir=str(tmp_path / "blank.txt")), to_text)
    with pytest.raises(DataError, match="no training data"):
        load_splits(data_args(), to_text)


def test_validation_split_percentage(tmp_path):
    path = write_jsonl(tmp_path / "pt.jsonl", [{"text": f"doc {i}"} for i in range(20)])
    splits = load_splits(data_args(train_file_dir=path, validation_split_percentage=10), to_text)
    assert (len(splits["train"]), len(splits["validation"])) == (18, 2)
    assert not set(splits["train"]["text"]) & set(splits["validation"]["text"])
    with pytest.raises(DataError, match="leaves none to train on"):
        load_splits(data_args(train_file_dir=path, validation_split_percentage=100), to_text)


def test_pretraining_blocks_put_eos_between_documents(tokenizer):
    docs = ["高血压", "asthma", "糖尿病 metformin"]
    splits = DatasetDict({"train": Dataset.from_list([{"text": d} for d in docs])})
    blocks = build_pretraining_splits(splits, tokenizer, block_size=4)["train"]["input_ids"]
    stream = [t for block in blocks for t in block]
    expected = [t for d in docs for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    assert stream == expected
    assert all(len(b) == 4 for b in blocks[:-1]) and 0 < len(blocks[-1]) <= 4


def test_sft_truncation_drops_samples_without_assistant_tokens(tokenizer, caplog):
    long_question = {"messages": [{"role": "user", "content": "很长的问题" * 50},
                                  {"role": "assistant", "content": "答"}], "tools": ""}
    short = {"messages": [{"role": "user", "content": "Dose?"}, {"role": "assistant", "content": "500 mg."}],
             "tools": ""}
    splits = DatasetDict({"train": Dataset.from_list([long_question, short])})
    out = build_sft_splits(splits, tokenizer, get_template("chatml"), max_length=32)["train"]
    assert len(out) == 1 and len(out[0]["input_ids"]) <= 32
    assert "1 left with no assistant token were dropped" in caplog.text
    with pytest.raises(DataError, match="raise --max_length"):
        build_sft_splits(DatasetDict({"train": Dataset.from_list([long_question])}), tokenizer,
                         get_template("chatml"), max_length=32)


def test_over_long_text_is_encoded_without_the_tokenizers_indexing_warning(tiny_model_dir):
    """The stages measure and report over-long samples themselves (PT cuts documents into blocks), so transformers'
    "will result in indexing errors" warning would be wrong news."""
    from transformers import AutoTokenizer

    def warned(encode) -> bool:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, model_max_length=8)  # fresh: it warns only once
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logger = logging.getLogger("transformers.tokenization_utils_base")
        logger.addHandler(handler)
        try:
            encode(tokenizer)
        finally:
            logger.removeHandler(handler)
        return any("indexing errors" in r.getMessage() for r in records)

    long_text = "高血压患者应低盐饮食 " * 10
    assert warned(lambda tok: tok(long_text))  # the warning the stages must not trigger
    documents = DatasetDict({"train": Dataset.from_list([{"text": long_text}])})
    assert not warned(lambda tok: build_pretraining_splits(documents, tok, block_size=4))
    conversation = {"messages": [{"role": "user", "content": long_text},
                                 {"role": "assistant", "content": long_text}], "tools": ""}
    conversations = DatasetDict({"train": Dataset.from_list([conversation])})
    assert not warned(lambda tok: build_sft_splits(conversations, tok, get_template("chatml"), max_length=512))


def test_second_load_reuses_the_cache_with_its_report(tmp_path, caplog):
    path = write_jsonl(tmp_path / "mixed.jsonl", [SHAREGPT, "not json", SHAREGPT])
    caplog.set_level(logging.INFO)
    first = load_splits(data_args(train_file_dir=path, skip_bad_records=True), to_conversation)
    caplog.clear()
    second = load_splits(data_args(train_file_dir=path, skip_bad_records=True), to_conversation)
    assert "Reusing the records read before" in caplog.text
    assert "Skipped 1 bad records" in caplog.text and "mixed.jsonl:2" in caplog.text  # the report came with the cache
    assert second["train"].to_list() == first["train"].to_list()
    write_jsonl(tmp_path / "mixed.jsonl", [SHAREGPT])  # a changed file is read again
    caplog.clear()
    assert len(load_splits(data_args(train_file_dir=path, skip_bad_records=True), to_conversation)["train"]) == 1
    assert "Reusing" not in caplog.text


def test_tokenised_splits_are_reused_from_the_cache(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [SHAREGPT] * 3)
    encode = [build_sft_splits(load_splits(data_args(train_file_dir=path), to_conversation), tokenizer,
                               get_template("chatml"), max_length=64)["train"] for _ in range(2)]
    assert encode[0].cache_files == encode[1].cache_files and encode[1].cache_files
    assert encode[0]._fingerprint == encode[1]._fingerprint


def test_automatic_validation_split_is_capped_and_logged(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr("medicalgpt.data.loading.MAX_AUTO_VALIDATION", 3)
    path = write_jsonl(tmp_path / "pt.jsonl", [{"text": f"doc {i}"} for i in range(20)])
    splits = load_splits(data_args(train_file_dir=path, validation_split_percentage=50), to_text)
    assert (len(splits["train"]), len(splits["validation"])) == (17, 3)
    assert sorted([*splits["train"]["text"], *splits["validation"]["text"]]) == sorted(f"doc {i}" for i in range(20))
    assert "Held out 3 of 20 training records for validation (--validation_split_percentage 50, capped at 3" \
        in caplog.text


def test_bad_record_deep_in_a_large_file_names_its_line(tmp_path):
    rows = [{"text": f"doc {i}"} for i in range(5000)]
    rows[4321] = {"body": "no text"}
    with pytest.raises(DataError, match=r"big\.jsonl:4322: unknown record format"):
        load_splits(data_args(train_file_dir=write_jsonl(tmp_path / "big.jsonl", rows)), to_text)


def test_validation_sorted_by_length_keeps_every_sample():
    split = Dataset.from_list([{"input_ids": [1] * n, "labels": [1] * n} for n in (5, 2, 9, 2, 7)])
    ordered = sorted_by_length(split)
    assert [len(ids) for ids in ordered["input_ids"]] == [2, 2, 5, 7, 9] and ordered.column_names == split.column_names

"""De-identification: detection per type in both languages, medical content kept, the CLI over every format, bad
input, the labelled evaluation set, and --deidentify in a training stage."""

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import deidentify_data
import pretraining
from data.build_phi_data import OUTPUT as PHI_EVAL
from data.build_phi_data import build as build_phi_records
from data.knowledge import CONDITIONS
from medicalgpt.args import DataArguments
from medicalgpt.data import load_splits, to_conversation, to_preference, to_text
from medicalgpt.data.corpus import corpus_lines
from medicalgpt.errors import run_cli
from medicalgpt.privacy import Deidentifier, default_deidentifier, valid_resident_id

ZH_NOTE = ("患者张伟，男，45岁，身份证号11010519491231002X，因头痛于2023年3月15日到心内科就诊。"
           "家属李娜电话138-1234-5678，座机010-62345678。家住北京市朝阳区建国路88号3栋2单元501室，"
           "住院号：ZY2023001234，邮箱zhangwei@163.com。欧阳娜娜复诊。处方：氨氯地平，每次5毫克，每日一次。")
EN_NOTE = ("Patient John Smith, a 45-year-old man, MRN: 00123456, was seen on March 5, 2023 by Dr. Emily Chen. "
           "Call (555) 123-4567. Lives at 221 Baker Street, Apt 4B, Boston. SSN 123-45-6789, email js@example.org. "
           "Mr. Smith takes amlodipine 5 mg once daily; HbA1c 7.2%, BP 150/95 mmHg on 2023-03-05.")
PHI = {"张伟": "NAME", "11010519491231002X": "ID", "2023年3月15日": "DATE", "李娜": "NAME", "138-1234-5678": "PHONE",
       "010-62345678": "PHONE", "北京市朝阳区建国路88号3栋2单元501室": "ADDRESS", "ZY2023001234": "MRN",
       "zhangwei@163.com": "EMAIL", "欧阳娜娜": "NAME", "John Smith": "NAME", "00123456": "MRN",
       "March 5, 2023": "DATE", "Emily Chen": "NAME", "(555) 123-4567": "PHONE", "221 Baker Street, Apt 4B, Boston":
       "ADDRESS", "123-45-6789": "ID", "js@example.org": "EMAIL", "Smith": "NAME", "2023-03-05": "DATE"}
MEDICAL = ["头痛", "心内科", "氨氯地平", "每次5毫克，每日一次", "amlodipine", "5 mg once daily", "HbA1c 7.2%",
           "150/95 mmHg"]


@pytest.fixture(scope="module")
def deidentifier() -> Deidentifier:
    return default_deidentifier()


@pytest.mark.parametrize("note", [ZH_NOTE, EN_NOTE], ids=["zh", "en"])
def test_every_phi_type_is_replaced_and_medical_content_stays(deidentifier, note):
    found = {note[s.start: s.end]: s.kind for s in deidentifier.detect(note, known_names=["Smith"])}
    assert found == {text: kind for text, kind in PHI.items() if text in note}
    clean, _ = deidentifier.deidentify_record({"text": note})
    assert not [text for text in PHI if text in clean["text"]]
    assert [term for term in MEDICAL if term in note and term not in clean["text"]] == []
    assert "[NAME]" in clean["text"] and "[ADDRESS]" in clean["text"]


def test_overlapping_patterns_give_one_span_of_the_right_type(deidentifier):
    text = "邮箱13812345678@qq.com，住院号：13812345678"
    assert [(text[s.start: s.end], s.kind) for s in deidentifier.detect(text)] == [
        ("13812345678@qq.com", "EMAIL"), ("13812345678", "MRN")]


def test_resident_id_needs_its_check_digit(deidentifier):
    assert valid_resident_id("11010519491231002X") and not valid_resident_id("110105194912310021")
    assert [s.kind for s in deidentifier.detect("身份证号11010519491231002X")] == ["ID"]
    assert deidentifier.detect("批号110105194912310021") == []  # 18 digits with a wrong check digit: not an ID


def test_knowledge_table_terms_are_never_masked(deidentifier):
    # jieba alone tags fragments of these as person names (奥司他/韦, 雷米/普利, 左乙/拉西坦).
    for condition in CONDITIONS:
        for lang, template in (("zh", "患者因{}就诊，{}，予{}{}，{}随访。"), ("en", "Seen for {}, {}; {} {} in {}.")):
            symptoms = condition[f"symptoms_{lang}"][0]
            facts = [condition[f"{key}_{lang}"] for key in ("name", "exam", "drug", "dose", "department")]
            text = template.format(facts[0], symptoms, *facts[2:])
            assert deidentifier.detect(text) == [], text


def test_drugs_outside_the_knowledge_table_stay_after_a_medication_verb_or_with_keep_terms(tmp_path, capsys):
    # jieba tags 孟鲁司/nr 特 (montelukast) as a name: kept after 服用, and anywhere once listed in --keep_terms.
    notes = write_jsonl(tmp_path / "notes.jsonl", [{"text": "患者王芳服用孟鲁司特。"}, {"text": "孟鲁司特每日一次。"}])

    def output(*flags: str) -> list[str]:
        deidentify_data.main([str(notes), str(tmp_path / "out.jsonl"), *flags])
        return [json.loads(line)["text"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]

    assert output() == ["患者[NAME]服用孟鲁司特。", "[NAME]特每日一次。"]
    (tmp_path / "terms.txt").write_text("孟鲁司特\n", encoding="utf-8")
    assert output("--keep_terms", str(tmp_path / "terms.txt")) == ["患者[NAME]服用孟鲁司特。", "孟鲁司特每日一次。"]


def test_phi_free_medical_corpus_is_left_unchanged(deidentifier):
    lines = list(corpus_lines("data/pretrain/validation,data/sft/validation"))
    assert len(lines) > 300
    assert [line for line in lines if deidentifier.detect(line)] == []


def test_surrogates_are_consistent_within_a_record():
    record = {"messages": [{"role": "user", "content": "我是张伟，电话13812345678。"},
                           {"role": "assistant", "content": "张伟您好，我们会打13812345678联系您。"}]}
    surrogates = Deidentifier(surrogates=True, seed=1)
    clean, found = surrogates.deidentify_record(record)
    user, assistant = (m["content"] for m in clean["messages"])
    assert [m["role"] for m in clean["messages"]] == ["user", "assistant"]
    assert "张伟" not in user + assistant and "13812345678" not in user + assistant
    name, phone = re.search(r"我是(\w+)，电话(\d+)", user).groups()
    assert assistant == f"{name}您好，我们会打{phone}联系您。" and len(phone) == 11
    assert sorted(span.kind for _, span in found) == ["NAME", "NAME", "PHONE", "PHONE"]
    fake_id = surrogates.deidentify_record({"text": "身份证号11010519491231002X"})[0]["text"]
    assert valid_resident_id(fake_id[-18:]) and fake_id[-18:] != "11010519491231002X"


def test_a_name_found_once_is_masked_in_every_field(deidentifier):
    record = {"conversations": [{"from": "human", "value": "Patient: Mary Jones. Is metformin safe?"},
                                {"from": "gpt", "value": "Mary Jones can take metformin; Ms Jones should eat first."}]}
    clean, _ = deidentifier.deidentify_record(record)
    assert clean["conversations"][1]["value"] == "[NAME] can take metformin; Ms [NAME] should eat first."


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_cli_keeps_every_format_and_reports_file_line(tmp_path, capsys):
    source = tmp_path / "in"
    source.mkdir()
    (source / "corpus.txt").write_text(f"{ZH_NOTE}\n心内科负责高血压。\n", encoding="utf-8")
    write_jsonl(source / "sharegpt.jsonl", [{"conversations": [{"from": "human", "value": EN_NOTE},
                                                               {"from": "gpt", "value": "Take amlodipine."}]}])
    tools = [{"type": "function", "function": {"name": "book", "description": "Book a visit on 2023-03-05"}}]
    (source / "openai.json").write_text(json.dumps([{"messages": [
        {"role": "system", "content": "You are a doctor."}, {"role": "user", "content": "My number is 13812345678."},
        {"role": "assistant", "content": "Noted."}], "tools": tools}]), encoding="utf-8")
    write_jsonl(source / "alpaca.jsonl", [{"instruction": "患者李娜，电话13812345678，头痛怎么办？", "input": "",
                                           "output": "建议到神经内科就诊。"}])
    write_jsonl(source / "pairs.jsonl", [{"conversations": [{"from": "human", "value": "I am Dr. Emily Chen."}],
                                          "chosen": "Hello Dr. Chen.", "rejected": "Hi."}])
    pq.write_table(pa.Table.from_pylist([{"text": EN_NOTE}]), source / "notes.parquet")

    result = deidentify_data.main([str(source), str(tmp_path / "out")])
    report = capsys.readouterr().out
    assert f"{source / 'corpus.txt'}:1: text[" in report and f"{source / 'pairs.jsonl'}:1: chosen[" in report
    assert "13812345678" not in report and "张伟" not in report  # the report never repeats the PHI
    assert result["records"] == 7 and result["counts"]["PHONE"] == 6
    out = tmp_path / "out"
    assert (out / "corpus.txt").read_text(encoding="utf-8").splitlines()[1] == "心内科负责高血压。"
    conversation = to_conversation(json.loads((out / "sharegpt.jsonl").read_text(encoding="utf-8")))
    assert "John Smith" not in conversation["messages"][0]["content"] and "amlodipine" in conversation["messages"][1][
        "content"]
    openai = json.loads((out / "openai.json").read_text(encoding="utf-8"))  # still one JSON array
    assert openai[0]["messages"][1] == {"role": "user", "content": "My number is [PHONE]."}
    assert openai[0]["tools"] == tools  # tool schemas are structure, kept as they are
    alpaca = json.loads((out / "alpaca.jsonl").read_text(encoding="utf-8"))
    assert alpaca["instruction"] == "患者[NAME]，电话[PHONE]，头痛怎么办？"
    pair = to_preference(json.loads((out / "pairs.jsonl").read_text(encoding="utf-8")))
    assert pair["chosen"] == "Hello Dr. [NAME]."
    assert "John Smith" not in to_text(pq.read_table(out / "notes.parquet").to_pylist()[0])["text"]


def test_dry_run_writes_nothing(tmp_path, capsys):
    source = write_jsonl(tmp_path / "notes.jsonl", [{"text": ZH_NOTE}])
    deidentify_data.main([str(source), str(tmp_path / "out.jsonl"), "--dry_run"])
    assert not (tmp_path / "out.jsonl").exists()
    summary = "Would replace: NAME 3, ID 1, PHONE 2, DATE 1, ADDRESS 1, MRN 1, EMAIL 1 in 1 records"
    assert summary in capsys.readouterr().out


def cli_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: deidentify_data.main(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_input_names_the_file_line_and_the_fix(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "张伟 13812345678"}\n{"text": \n{"conversations": [{"from": "human"}]}\n')
    assert f"{bad}:2: invalid JSON" in cli_error([str(bad), str(tmp_path / "out.jsonl")], capsys)
    assert not (tmp_path / "out.jsonl").exists()
    result = deidentify_data.main([str(bad), str(tmp_path / "out.jsonl"), "--skip_bad_records"])
    assert (result["records"], result["skipped"]) == (1, 2)
    assert (tmp_path / "out.jsonl").read_text() == '{"text": "[NAME] [PHONE]"}\n'
    assert "write .jsonl like the input" in cli_error([str(bad), str(tmp_path / "out.txt")], capsys)
    assert "no such file or directory" in cli_error([str(tmp_path / "missing.jsonl"), "out.jsonl"], capsys)
    with pytest.raises(SystemExit):
        deidentify_data.main([str(bad)])
    assert "give INPUT and OUTPUT" in capsys.readouterr().err


def test_labelled_set_is_reproducible_and_measured(capsys):
    shipped = [json.loads(line) for line in PHI_EVAL.read_text(encoding="utf-8").splitlines()]
    assert shipped == build_phi_records()  # regenerate with: python data/build_phi_data.py
    assert len(shipped) == 300 and {span["type"] for r in shipped for span in r["spans"]} >= {"NAME", "MRN", "EMAIL"}
    results = deidentify_data.main(["--evaluate", str(PHI_EVAL)])
    assert "| NAME | en |" in capsys.readouterr().out
    for kind, row in results["all"]["per_type"].items():
        assert row["precision"] >= 0.98 and row["recall"] >= (0.9 if kind == "NAME" else 0.98), (kind, row)
    assert results["all"]["medical_terms_intact"] == 1.0


def test_deidentify_flag_loads_clean_records_for_every_stage_format(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"conversations": [{"from": "human", "value": ZH_NOTE}],
                                                    "chosen": "张伟您好。", "rejected": "你好。"}])
    args = DataArguments(train_file_dir=str(pairs), validation_split_percentage=0, deidentify=True)
    pair = load_splits(args, to_preference)["train"][0]
    assert pair["chosen"] == "[NAME]您好。" and "11010519491231002X" not in pair["messages"][0]["content"]


def test_a_stage_with_deidentify_trains_on_deidentified_text(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"{ZH_NOTE} {EN_NOTE}"}] * 8)
    seen = {}

    def spy(records, *args):
        seen["blocks"] = pretraining_build(records, *args)
        return seen["blocks"]

    pretraining_build = pretraining.build_pretraining_splits
    monkeypatch.setattr(pretraining, "build_pretraining_splits", spy)
    metrics = pretraining.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "pt"),
                                "--train_file_dir", str(tmp_path), "--validation_split_percentage", "0",
                                "--deidentify", "--max_steps", "2", "--per_device_train_batch_size", "2",
                                "--block_size", "64", "--report_to", "none", "--save_strategy", "no",
                                "--disable_tqdm", "True", "--use_peft", "False"])
    assert metrics["train_loss"] > 0
    trained = tokenizer.decode(sum(seen["blocks"]["train"]["input_ids"], []))
    assert "[PHONE]" in trained and "氨氯地平" in trained and "amlodipine" in trained
    assert not [text for text in PHI if text in trained]


def test_ner_model_adds_names_the_rules_miss(tokenizer, tmp_path, deidentifier):
    import torch
    from transformers import Qwen2Config, Qwen2ForTokenClassification

    # A token classifier that tags every token I-PER: it shows the model's entities are used, and that medical
    # terms still win over them.
    labels = {0: "O", 1: "B-PER", 2: "I-PER"}
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, id2label=labels,
                         label2id={v: k for k, v in labels.items()}, pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForTokenClassification(config)
    with torch.no_grad():
        model.score.weight.zero_()
        model.score.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert deidentifier.detect("call john smith") == []
    with_model = Deidentifier(ner_model=str(tmp_path))
    assert with_model.deidentify_record({"text": "call john smith"})[0] == {"text": "[NAME]"}
    assert with_model.detect("call john smith about fever") == []

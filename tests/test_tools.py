"""Data and tokenizer tools: conversion, validation, domain tokenizers and vocabulary extension, embedding
resizing, quantization and the memory estimator, each checked against an independent computation."""

import json
import math
import tracemalloc
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import build_domain_tokenizer
import convert_dataset
import estimate_memory
import extend_tokenizer
import pretraining
import quantize_model
import validate_data
from data.knowledge import CONDITIONS
from medicalgpt.args import LoraArguments
from medicalgpt.data import iter_records, to_conversation, to_preference
from medicalgpt.data.readers import _ArrayStream
from medicalgpt.errors import DataError
from medicalgpt.templates import get_template
from medicalgpt.vocab import new_token_ids, resize_embeddings

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "data/pretrain"
CORPUS_LINES = [line for split in ("train", "validation")
                for line in (PRETRAIN / split / "medical_corpus.txt").read_text(encoding="utf-8").splitlines()]
TERMS = [c[key] for c in CONDITIONS for key in ("name_en", "name_zh", "drug_en", "drug_zh", "exam_zh")]


def normalised(path: Path, convert) -> list[dict]:
    return [convert(record) for _, record in iter_records(path)]


@pytest.mark.parametrize("source, convert", [("data/sft/train", to_conversation),
                                             ("data/preference/train", to_preference)])
def test_conversions_read_back_to_the_same_records(tmp_path, source, convert):
    files = sorted((REPO / source).glob("*.jsonl"))
    for path in files:
        expected = normalised(path, convert)
        for style in ("sharegpt", "openai", "alpaca"):
            for suffix in (".jsonl", ".json"):
                out = tmp_path / f"{path.stem}-{style}{suffix}"
                convert_dataset.main([str(path), str(out), "--to", style])
                records = [record for _, record in iter_records(out)]
                assert {convert_dataset.detect_format(r) for r in records} <= {style, "prompt"}
                assert [convert(r) for r in records] == expected, (path.name, style, suffix)


def test_csv_to_sft_and_errors_name_file_and_line(tmp_path):
    table = tmp_path / "qa.csv"
    table.write_text('question,answer\n"Dose of amlodipine, usually?","5 mg\nonce daily"\n"",empty question\n')
    with pytest.raises(DataError, match=r"qa\.csv:4: question: empty"):  # the quoted answer spans lines 2-3
        convert_dataset.main([str(table), str(tmp_path / "sft.jsonl"), "--to", "sharegpt"])
    assert not (tmp_path / "sft.jsonl").exists()  # a failed conversion leaves no half-written file
    result = convert_dataset.main([str(table), str(tmp_path / "sft.jsonl"), "--to", "openai", "--skip_bad_records"])
    assert result == {"written": 1, "skipped": 1}
    (record,) = [r for _, r in iter_records(tmp_path / "sft.jsonl")]
    assert to_conversation(record)["messages"] == [{"role": "user", "content": "Dose of amlodipine, usually?"},
                                                  {"role": "assistant", "content": "5 mg\nonce daily"}]
    with pytest.raises(DataError, match="text: pretraining text has no alpaca form"):
        convert_dataset.main([str(PRETRAIN / "validation"), str(tmp_path / "x.jsonl"), "--to", "alpaca"])


def test_json_array_reader_streams_across_chunk_boundaries(tmp_path):
    records = [{"text": "高血压" * (i % 7) + f"doc {i}", "n": i / 3} for i in range(50)]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    for chunk_size in (1, 3, 64):
        assert list(_ArrayStream(path, chunk_size).records()) == records
    path.write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(DataError, match=r"a\.json:2: invalid JSON: Expecting value \(column 11\)"):
        list(_ArrayStream(path, 4).records())


def peak_traced_bytes(function) -> int:
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_conversion_memory_does_not_grow_with_the_file(tmp_path):
    record = {"instruction": "高血压通常用什么药？" * 100, "input": "", "output": "氨氯地平。" * 400}
    peaks, sizes = {}, {}
    for count in (500, 2000):  # JSON arrays of ~3 MB and ~12 MB, read in 1 MiB chunks
        source = tmp_path / f"in{count}.json"
        source.write_text(json.dumps([record] * count, ensure_ascii=False), encoding="utf-8")
        out = tmp_path / f"out{count}.jsonl"
        peaks[count] = peak_traced_bytes(lambda s=source, o=out: convert_dataset.main([str(s), str(o), "--to",
                                                                                        "sharegpt"]))
        sizes[count] = source.stat().st_size
        assert sum(1 for _ in out.open()) == count
    assert peaks[2000] < 1.3 * peaks[500] and peaks[2000] < sizes[2000] / 2, (peaks, sizes)


def test_validate_data_reports_problems_lengths_and_turns_without_loss(tmp_path, tiny_model_dir, tokenizer, capsys):
    turns = [{"role": "user", "content": "高血压用什么药？"}, {"role": "assistant", "content": "氨氯地平。"},
             {"role": "user", "content": "剂量？"}, {"role": "assistant", "content": "每次5毫克，每日一次。"},
             {"role": "user", "content": "多久复查？"}, {"role": "assistant", "content": "四周后复查血压。"}]
    (tmp_path / "good").mkdir()
    good = tmp_path / "good/chats.jsonl"
    good.write_text("".join(json.dumps({"messages": turns[:k]}, ensure_ascii=False) + "\n" for k in (2, 4, 6)))
    # Independently of validate_data: lengths from the tokenizer rendering the template's Jinja twin.
    lengths = [len(tokenizer.apply_chat_template(turns[:k], chat_template=get_template("chatml").jinja,
                                                 tokenize=True, return_dict=False)) for k in (2, 4, 6)]
    cut = lengths[0]  # keeps the first exchange only: the later 1 + 2 assistant turns lose their loss
    (result,) = validate_data.main([str(good), "--stage", "sft", "--model_name_or_path", tiny_model_dir,
                                    "--max_length", str(cut)])
    assert result["tokens"] == {"p50": lengths[1], "p90": lengths[2], "p99": lengths[2], "max": lengths[2]}
    assert (result["format"], result["over_max_length"], result["assistant_turns_without_loss"]) == ("openai", 2, 3)

    (tmp_path / "good/bad.jsonl").write_text(json.dumps({"conversations": [{"from": "doctor", "value": "x"}]})
                                              + "\n{oops\n")
    with pytest.raises(SystemExit) as exit_info:
        validate_data.main([str(tmp_path / "good"), "--stage", "sft", "--model_name_or_path", tiny_model_dir])
    out = capsys.readouterr().out
    assert exit_info.value.code == 1
    assert "bad.jsonl:1: conversations[0].from: unknown role 'doctor'" in out
    assert "bad.jsonl:2: invalid JSON" in out and "2 files, 3 good records, 2 bad" in out


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    """Domain tokenizers of both kinds from the training corpus, and two bases: the tiny model's byte-level one
    and a Llama-2-style SentencePiece BPE that knows little beyond the corpus's characters."""
    out = tmp_path_factory.mktemp("tokenizers")
    dirs = {"byte_base": tiny_model_dir}
    for name, kind, vocab in (("sp_domain", "bpe", 4000), ("byte_domain", "byte_bpe", 4000), ("sp_base", "bpe", 1200)):
        dirs[name] = build_domain_tokenizer.main(["--corpus", str(PRETRAIN / "train"), "--output_dir",
                                                  str(out / name), "--model_type", kind, "--vocab_size", str(vocab)])
    for base in ("byte_base", "sp_base"):
        for domain in ("sp_domain", "byte_domain"):
            extend_tokenizer.main(["--base_tokenizer", dirs[base], "--domain_tokenizer", dirs[domain],
                                   "--output_dir", str(out / f"{base}+{domain}"), "--eval_files",
                                   str(PRETRAIN / "validation")])
            dirs[f"{base}+{domain}"] = str(out / f"{base}+{domain}")
    return dirs


def boundaries(tokenizer, text: str) -> set[int]:
    return {end for _, end in tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).offsets}


@pytest.mark.parametrize("base_name, domain_name", [("sp_base", "sp_domain"), ("sp_base", "byte_domain"),
                                                    ("byte_base", "byte_domain"), ("byte_base", "sp_domain")])
def test_extended_tokenizer_compresses_medical_text_and_keeps_base_encodings(tokenizer_dirs, base_name, domain_name):
    base = AutoTokenizer.from_pretrained(tokenizer_dirs[base_name])
    extended = AutoTokenizer.from_pretrained(tokenizer_dirs[f"{base_name}+{domain_name}"])
    report = json.loads(Path(tokenizer_dirs[f"{base_name}+{domain_name}"], "extension.json").read_text())
    new_ids = set(new_token_ids(extended, base))  # base tokens keep their ids
    assert len(new_ids) == report["added"] > 100

    count = {name: [len(t.encode(term, add_special_tokens=False)) for term in TERMS]
             for name, t in (("base", base), ("extended", extended))}
    assert all(e <= b for e, b in zip(count["extended"], count["base"], strict=True))
    assert sum(count["extended"]) < 0.8 * sum(count["base"])
    assert report["compression_gain_chinese_lines"] > 0.25

    for text in CORPUS_LINES:
        ids = extended.encode(text, add_special_tokens=False)
        assert extended.decode(ids) == base.decode(base.encode(text, add_special_tokens=False))
        assert boundaries(extended, text) <= boundaries(base, text)  # new tokens only join base tokens
        if not new_ids.intersection(ids):
            assert ids == base.encode(text, add_special_tokens=False)


def test_resize_embeddings_rows_are_means_of_the_replaced_subwords(tokenizer_dirs, tiny_model_dir):
    base = AutoTokenizer.from_pretrained(tiny_model_dir)
    extended = AutoTokenizer.from_pretrained(tokenizer_dirs["byte_base+byte_domain"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.tie_word_embeddings = False  # an untied head gets its own mean rows
    model = AutoModelForCausalLM.from_config(model.config)
    before = {"in": model.get_input_embeddings().weight.detach().clone(),
              "out": model.get_output_embeddings().weight.detach().clone()}
    assert resize_embeddings(model, extended, base) == len(extended) - len(base)
    after = {"in": model.get_input_embeddings().weight, "out": model.get_output_embeddings().weight}
    checked = 0
    for token_id in new_token_ids(extended, base):
        text = extended.decode([token_id])
        if "\ufffd" in text:  # a merge step inside a character has no text to re-encode
            continue
        ids = base.encode(text, add_special_tokens=False)
        for side in ("in", "out"):
            torch.testing.assert_close(after[side][token_id], before[side][ids].mean(0))
        checked += 1
    assert checked > 100 and after["in"].shape[0] == len(extended)
    assert torch.equal(after["in"][: len(base)], before["in"])
    with pytest.raises(ValueError, match="not an extension of the model's own"):
        resize_embeddings(model, AutoTokenizer.from_pretrained(tokenizer_dirs["sp_base"]), base)


def test_resized_model_trains_new_embeddings_with_lora(tokenizer_dirs, tiny_model_dir, tmp_path):
    extended = tokenizer_dirs["byte_base+byte_domain"]
    metrics = pretraining.main([
        "--model_name_or_path", tiny_model_dir, "--tokenizer_name_or_path", extended, "--resize_embeddings",
        "--modules_to_save", "embed_tokens,lm_head", "--output_dir", str(tmp_path), "--train_file_dir",
        str(PRETRAIN / "train"), "--validation_file_dir", str(PRETRAIN / "validation"), "--max_eval_samples", "20",
        "--block_size", "128", "--max_steps", "3", "--learning_rate", "1e-2", "--report_to", "none",
        "--save_strategy", "no", "--disable_tqdm", "True", "--per_device_train_batch_size", "4"])
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "embed_tokens" in saved["modules_to_save"]  # the tiny model ties its head: one trained matrix
    from peft import PeftModel

    base = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    new = new_token_ids(AutoTokenizer.from_pretrained(extended), base)
    resize_embeddings(model, AutoTokenizer.from_pretrained(extended), base)
    initial = model.get_input_embeddings().weight.detach().clone()
    trained = PeftModel.from_pretrained(model, tmp_path).merge_and_unload().get_input_embeddings().weight
    assert trained.shape == initial.shape
    assert not torch.allclose(trained[new], initial[new])  # the new rows trained


def independent_perplexity(model_dir: str, block_size: int, max_blocks: int) -> float:
    """Token-level perplexity over the validation corpus: documents + EOS, concatenated, cut into blocks."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lines = (PRETRAIN / "validation/medical_corpus.txt").read_text(encoding="utf-8").splitlines()
    stream = [i for line in lines for i in tokenizer.encode(line, add_special_tokens=False) + [tokenizer.eos_token_id]]
    blocks = [stream[i: i + block_size] for i in range(0, len(stream), block_size)][:max_blocks]
    with torch.no_grad():
        nll = sum(model(input_ids=torch.tensor([b]), labels=torch.tensor([b])).loss.item() * (len(b) - 1)
                  for b in blocks)
    return math.exp(nll / sum(len(b) - 1 for b in blocks))


@pytest.mark.parametrize("flags", [["--load_in_4bit", "--bnb_4bit_quant_type", "nf4"], ["--load_in_8bit"]])
def test_quantized_copy_is_smaller_and_keeps_perplexity(tiny_model_dir, tmp_path, flags):
    report = quantize_model.main(["--model_name_or_path", tiny_model_dir, *flags, "--output_dir", str(tmp_path),
                                  "--eval_file", str(PRETRAIN / "validation"), "--block_size", "128",
                                  "--max_eval_blocks", "12"])
    before, after = report["before"], report["after"]
    assert before["perplexity"] == pytest.approx(independent_perplexity(tiny_model_dir, 128, 12), rel=1e-4)
    assert after["perplexity"] == pytest.approx(before["perplexity"], rel=0.05)
    assert after["size_on_disk_bytes"] < 0.85 * before["size_on_disk_bytes"]
    assert after["memory_bytes"] < 0.85 * before["memory_bytes"]
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["load_in_4bit" if "--load_in_4bit" in flags else "load_in_8bit"]


def test_memory_estimate_counts_parameters_and_shards_like_the_real_model():
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=352, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    args = estimate_memory.MemoryArguments(model="-", method="lora", seq_len=64, dtype="bfloat16", lora_rank=4)
    lora = estimate_memory.estimate(args, config)
    model = AutoModelForCausalLM.from_config(config)
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    trainable = get_peft_model(model, LoraConfig(r=4, target_modules=targets)).num_parameters(only_trainable=True)
    assert lora["parameters"] == sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert lora["trainable_parameters"] == trainable
    assert lora["weights"] == 2 * lora["parameters"] + 4 * trainable
    assert lora["gradients"] == 4 * trainable and lora["optimizer_states"] == 8 * trainable
    full = estimate_memory.estimate(estimate_memory.MemoryArguments(model="-", method="full", seq_len=64), config)
    zero3 = estimate_memory.estimate(estimate_memory.MemoryArguments(model="-", method="full", seq_len=64, zero=3,
                                                                     gpus=4), config)
    assert zero3["weights"] == full["weights"] / 4 and zero3["gradients"] == full["gradients"] / 4
    assert zero3["optimizer_states"] == 12 * full["parameters"] / 4  # float32 master weights and Adam states
    qlora = estimate_memory.estimate(estimate_memory.MemoryArguments(model="-", method="qlora4", seq_len=64,
                                                                     lora_rank=4), config)
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lora_" not in name and not name.endswith("lm_head"))
    # nf4 with double quantization; everything else (embeddings, head, norms) in bfloat16 as loaded; LoRA in float32
    expected = linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + (lora["parameters"] - linear) * 2 + trainable * 4
    assert qlora["weights"] == pytest.approx(expected) and qlora["activations"] == lora["activations"]


def test_memory_estimate_knows_common_models_offline_and_meets_the_published_7b_figures(capsys):
    gb = {}
    for method in ("qlora4", "lora", "full"):
        result = estimate_memory.main(["--model", "Qwen/Qwen2.5-7B-Instruct", "--method", method, "--seq_len", "512",
                                       "--gradient_checkpointing"])
        gb[method] = result["peak"] / 1e9
    assert result["parameters"] == 7_615_616_512  # Qwen2.5-7B's published count
    assert 5 < gb["qlora4"] < 7.5 and 14 < gb["lora"] < 18 and gb["full"] > 60, gb
    assert "assume batch 1, ~512-token sequences, gradient checkpointing" in capsys.readouterr().out
    assert estimate_memory.MemoryArguments(model="-").lora_dropout == LoraArguments().lora_dropout


def test_memory_estimate_matches_a_measured_training_run(tiny_model_dir):
    result = estimate_memory.main(["--model", tiny_model_dir, "--method", "full", "--seq_len", "512", "--batch_size",
                                   "8", "--dtype", "float32", "--measure", "--measure_steps", "2"])
    assert abs(result["error"]) < 0.2, result

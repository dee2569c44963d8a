"""The embedded default model: deterministic, CPU-sized, a tokenizer that splits Chinese sensibly."""

import hashlib
from pathlib import Path

from transformers import AutoConfig

from medicalgpt.default_model import build_default_model, build_tokenizer


def _digest(directory: Path) -> dict[str, str]:
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
            for name in ("tokenizer.json", "model.safetensors", "config.json", "chat_template.jinja")}


def test_build_is_deterministic(tmp_path, tiny_model_dir):
    again = build_default_model(tmp_path / "again", size="tiny")
    assert _digest(again) == _digest(Path(tiny_model_dir))


def test_default_size_fits_a_cpu(tmp_path):
    config = AutoConfig.from_pretrained(build_default_model(tmp_path / "default", size="default"))
    head_dim = config.hidden_size // config.num_attention_heads
    parameters = config.vocab_size * config.hidden_size + config.num_hidden_layers * (
        2 * config.hidden_size ** 2 + 2 * config.hidden_size * head_dim * config.num_key_value_heads
        + 3 * config.hidden_size * config.intermediate_size)
    assert head_dim >= 32 and 1e6 < parameters < 1e7 and config.model_type == "qwen2"


def test_chinese_splits_into_characters_not_clauses(tokenizer):
    pieces = [tokenizer.decode([i]) for i in tokenizer("高血压的一线药物是氨氯地平，每次5毫克。")["input_ids"]]
    assert max(len(p) for p in pieces) == 1 and "".join(pieces) == "高血压的一线药物是氨氯地平，每次5毫克。"
    assert tokenizer.tokenize("250 mg") == ["2", "5", "0", "Ġmg"]
    assert tokenizer.tokenize(" levothyroxine") == ["Ġlevothyroxine"]  # frequent English words stay whole


def test_chat_template_trains_the_end_of_turn_token(tokenizer):
    assert "{% generation %}" in tokenizer.chat_template
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    trained = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(trained) == "Hello<|im_end|>"
    assert {tokenizer.eos_token, tokenizer.pad_token} == {"<|endoftext|>"}


def test_tokenizer_vocabulary_is_capped(tmp_path):
    assert len(build_tokenizer(vocab_size=600)) <= 600

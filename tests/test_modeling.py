"""Model loading flags do what they say: RoPE scaling, LoRA targets and variants, continued adapters."""

from types import SimpleNamespace

import pytest
import torch

from medicalgpt.args import LoraArguments, ModelArguments
from medicalgpt.data import load_splits, to_conversation
from medicalgpt.errors import UsageError
from medicalgpt.modeling import adapter_base, apply_lora, find_linear_modules, load_model, resolve_dtype

NO_CHECKPOINTING = SimpleNamespace(activation_checkpointing=False)


def test_rope_scaling_reaches_the_config(tiny_model_dir):
    model = load_model(ModelArguments(model_name_or_path=tiny_model_dir, rope_scaling="linear:2.0"))
    assert model.config.rope_parameters["rope_type"] == "linear"
    assert model.config.rope_parameters["factor"] == 2.0
    with pytest.raises(ValueError, match="expected TYPE:FACTOR"):
        load_model(ModelArguments(model_name_or_path=tiny_model_dir, rope_scaling="linear"))


def test_dtype_auto_follows_the_hardware():
    expected = torch.float32
    if torch.cuda.is_available():
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert resolve_dtype("auto") == expected
    assert resolve_dtype("bfloat16") == torch.bfloat16


def test_all_linear_targets_exclude_the_head(tiny_model_dir):
    model = load_model(ModelArguments(model_name_or_path=tiny_model_dir))
    assert find_linear_modules(model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_lora_variants_and_modules_to_save(tiny_model_dir):
    model = load_model(ModelArguments(model_name_or_path=tiny_model_dir))
    lora_args = LoraArguments(lora_rank=4, use_dora=True, use_rslora=True, target_modules="q_proj,v_proj",
                              modules_to_save="embed_tokens")
    peft_model = apply_lora(model, lora_args, NO_CHECKPOINTING)
    config = peft_model.peft_config["default"]
    assert (config.r, config.use_dora, config.use_rslora) == (4, True, True)
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert any("embed_tokens.modules_to_save" in name for name in trainable)
    assert not any("k_proj" in name for name in trainable)


def test_peft_path_continues_an_adapter(tiny_model_dir, tmp_path):
    first = apply_lora(load_model(ModelArguments(model_name_or_path=tiny_model_dir)), LoraArguments(lora_rank=4),
                       NO_CHECKPOINTING)
    with torch.no_grad():
        for name, param in first.named_parameters():
            if "lora_B" in name:
                param.fill_(0.01)  # a recognisable, non-initial adapter
    first.save_pretrained(tmp_path)
    continued = apply_lora(load_model(ModelArguments(model_name_or_path=tiny_model_dir)),
                           LoraArguments(peft_path=str(tmp_path)), NO_CHECKPOINTING)
    lora_b = [p for name, p in continued.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.requires_grad and torch.allclose(p, torch.full_like(p, 0.01)) for p in lora_b)


def test_dataset_name_reads_through_datasets(tmp_path):
    # A local dataset directory takes the same load_dataset path as a hub name, offline.
    (tmp_path / "train.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n' * 3)
    args = SimpleNamespace(dataset_name=str(tmp_path), dataset_config_name=None, skip_bad_records=False,
                           validation_split_percentage=0, max_train_samples=None, max_eval_samples=None,
                           deidentify=False)
    splits = load_splits(args, to_conversation)
    assert len(splits["train"]) == 3 and splits["train"][0]["messages"][1]["content"] == "a"


def test_qlora_keeps_the_frozen_unquantized_weights_in_their_dtype(tiny_model_dir):
    model = load_model(ModelArguments(model_name_or_path=tiny_model_dir, load_in_4bit=True, dtype="bfloat16"))
    model = apply_lora(model, LoraArguments(lora_rank=4), NO_CHECKPOINTING)
    # not upcast to float32 (peft's prepare_model_for_kbit_training would: 2.2 GB more for Qwen2.5-7B)
    frozen = {p.dtype for name, p in model.named_parameters() if not p.requires_grad and p.dtype.is_floating_point}
    assert frozen == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # the adapters
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    assert all(grad is not None for grad in grads.values())
    assert all(grad.abs().sum() > 0 for name, grad in grads.items() if "lora_B" in name)  # lora_B starts at 0


def test_a_folder_without_an_adapter_names_the_adapters_inside_it(tmp_path):
    (tmp_path / "checkpoint-40" / "policy").mkdir(parents=True)  # PPO's checkpoint layout
    (tmp_path / "checkpoint-40" / "policy" / "adapter_config.json").write_text('{"base_model_name_or_path": "m"}')
    with pytest.raises(UsageError, match="one level down: .*checkpoint-40/policy"):
        adapter_base(str(tmp_path / "checkpoint-40"))
    assert adapter_base(str(tmp_path / "checkpoint-40" / "policy")) == "m"
    with pytest.raises(UsageError, match=r"not a LoRA adapter\)$"):
        adapter_base(str(tmp_path))  # nothing one level down: no hint

"""Contracts: exactly what we rely on in library internals (TRL, transformers, peft, torch), one named test each.

medicalgpt subclasses TRL trainers, calls private hooks and rebuilds some of their outputs. When an upgrade changes
one of those, the matching test here fails by name, instead of a training run failing (or silently training
something else) deep inside a stage. Each test says which of our code depends on it.
"""

import inspect
import json
import os
import subprocess
import sys
from dataclasses import fields

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from medicalgpt.templates import IGNORE_INDEX

ROWS = 4


def preference_rows(count: int = 8) -> Dataset:
    generator = torch.Generator().manual_seed(0)

    def ids(length: int) -> list[int]:
        return torch.randint(3, 200, (length,), generator=generator).tolist()

    return Dataset.from_list([{"prompt_ids": ids(6 + i % 3), "chosen_ids": ids(4 + i % 2), "rejected_ids": ids(5)}
                              for i in range(count)])


def trainer_config(config_class, tmp_path, **overrides):
    return config_class(output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=False,
                        activation_checkpointing=False, per_device_train_batch_size=ROWS, max_length=64,
                        save_strategy="no", **overrides)


@pytest.fixture()
def tiny_model(tiny_model_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def first_batch(trainer) -> dict:
    return next(iter(trainer.get_train_dataloader()))


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def answer_lengths(rows: Dataset) -> dict[tuple, int]:
    """Each prompt + answer sequence of the pairs, and its answer's length (batches are shuffled)."""
    return {tuple(row["prompt_ids"] + row[side]): len(row[side])
            for row in rows for side in ("chosen_ids", "rejected_ids")}


# --- TRL: DPO (medicalgpt.trainers.TokenizedDPOTrainer, _HalfBatches) ----------------------------------------------

def test_dpo_prepare_dataset_hook_takes_our_token_ids(tokenizer, tiny_model, tmp_path):
    """We override DPOTrainer._prepare_dataset to return our tokenised rows as they are: the hook must keep its
    signature, and TRL's collator must build the model inputs from prompt_ids / chosen_ids / rejected_ids."""
    from trl import DPOConfig, DPOTrainer

    from medicalgpt.trainers import TokenizedDPOTrainer

    assert parameters(DPOTrainer._prepare_dataset) == ["self", "dataset", "processing_class", "args", "dataset_name"]
    rows = preference_rows()
    trainer = TokenizedDPOTrainer(model=tiny_model, args=trainer_config(DPOConfig, tmp_path),
                                  processing_class=tokenizer, train_dataset=rows)
    assert trainer.train_dataset is rows
    batch = first_batch(trainer)
    assert batch["input_ids"].shape[0] == 2 * ROWS  # [chosen; rejected], the layout _HalfBatches splits
    sequences = answer_lengths(rows)
    for ids, mask, completion in zip(batch["input_ids"], batch["attention_mask"], batch["completion_mask"]):
        assert sequences[tuple(ids[mask.bool()].tolist())] == completion.sum()


def test_dpo_policy_forward_is_one_fused_call_that_half_batches_reproduce(tokenizer, tiny_model, tmp_path):
    """_HalfBatches stands in for the policy in DPOTrainer.compute_loss: TRL must call it once with per-row tensors
    and fused_lm_head=True, and read only FusedCausalLMOutput fields that _HalfBatches rebuilds."""
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.utils import FusedCausalLMOutput

    from medicalgpt.trainers import TokenizedDPOTrainer, _HalfBatches

    per_token = {f.name for f in fields(FusedCausalLMOutput)} - {"loss", "aux_loss"}
    assert set(_HalfBatches.FIELDS) == per_token
    assert parameters(DPOTrainer.compute_loss) == ["self", "model", "inputs", "return_outputs", "num_items_in_batch"]

    trainer = TokenizedDPOTrainer(model=tiny_model, args=trainer_config(DPOConfig, tmp_path),
                                  processing_class=tokenizer, train_dataset=preference_rows(), half_batches=True)
    batch = first_batch(trainer)
    calls = []
    original_call = _HalfBatches.__call__

    def recording_call(self, **inputs):
        calls.append(inputs)
        return original_call(self, **inputs)

    trainer.model.train()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_HalfBatches, "__call__", recording_call)
        halves = trainer.compute_loss(trainer.model, batch)
    assert len(calls) == 1 and calls[0]["fused_lm_head"] is True
    rows = batch["input_ids"].shape[0]
    assert all(value.shape[0] == rows for value in calls[0].values() if torch.is_tensor(value) and value.dim())
    whole = DPOTrainer.compute_loss(trainer, trainer.model, batch)
    torch.testing.assert_close(halves, whole)


def test_dpo_trainer_adds_its_fused_head_in_init_and_its_loss_is_the_same_through_our_compact_head(
        tokenizer, tiny_model, tmp_path):
    """TokenizedDPOTrainer replaces TRL's fused LM head on the CPU after DPOTrainer.__init__ has added it (with the
    use_weighting and aux_loss_enabled attributes read there), and TRL's loss must not change through it."""
    from trl import DPOConfig
    from trl.trainer.utils import add_fused_lm_head

    from medicalgpt.trainers import TokenizedDPOTrainer

    trainer = TokenizedDPOTrainer(model=tiny_model, args=trainer_config(DPOConfig, tmp_path),
                                  processing_class=tokenizer, train_dataset=preference_rows())
    assert "add_compact_lm_head" in trainer.model.forward.__func__.__code__.co_qualname
    assert trainer.use_weighting is False and trainer.aux_loss_enabled is False
    batch = first_batch(trainer)
    ours = trainer.compute_loss(trainer.model, batch)
    add_fused_lm_head(trainer.model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    torch.testing.assert_close(ours, trainer.compute_loss(trainer.model, batch))


# --- TRL: KTO (TokenizedKTOTrainer) -----------------------------------------------------------------------------------

def test_kto_kl_pairs_come_from_the_kl_completion_ids_column(tokenizer, tiny_model, tmp_path):
    """TokenizedKTOTrainer._prepare_dataset adds KL_completion_ids itself when trainer.calculate_KL is set; TRL's
    collator must turn that column into the KL_input_ids of the mismatched pairs."""
    from trl import KTOConfig, KTOTrainer

    from medicalgpt.trainers import TokenizedKTOTrainer

    assert parameters(KTOTrainer._prepare_dataset) == ["self", "dataset", "processing_class", "args", "dataset_name"]
    pairs = preference_rows()
    rows = Dataset.from_list([{"prompt_ids": pair["prompt_ids"], "completion_ids": pair[side], "label": label}
                              for pair in pairs for side, label in (("chosen_ids", True), ("rejected_ids", False))])
    trainer = TokenizedKTOTrainer(model=tiny_model, args=trainer_config(KTOConfig, tmp_path),
                                  processing_class=tokenizer, train_dataset=rows)
    assert trainer.calculate_KL is True
    batch = first_batch(trainer)
    first, last = rows[0], rows[ROWS - 1]  # row 0 is paired with the batch's last completion
    kl_ids = batch["KL_input_ids"][0][batch["KL_attention_mask"][0].bool()].tolist()
    assert kl_ids[-len(first["prompt_ids"] + last["completion_ids"]):] == first["prompt_ids"] + last["completion_ids"]


# --- TRL experimental: ORPO and CPO/SimPO (_RowsFromIds, TokenizedORPOTrainer) --------------------------------------

@pytest.mark.parametrize("stage", ["orpo", "cpo"])
def test_orpo_cpo_rows_come_from_tokenize_row(stage, tokenizer, tiny_model, tmp_path):
    """_RowsFromIds overrides tokenize_row(feature, model=None), which TRL maps over the dataset: its output columns
    are what TRL's collator pads and concatenated_inputs concatenates."""
    from medicalgpt.trainers import TokenizedCPOTrainer, TokenizedORPOTrainer

    if stage == "orpo":
        from trl.experimental.orpo import ORPOConfig as config_class
        from trl.experimental.orpo import ORPOTrainer as trl_class
        trainer_class = TokenizedORPOTrainer
    else:
        from trl.experimental.cpo import CPOConfig as config_class
        from trl.experimental.cpo import CPOTrainer as trl_class
        trainer_class = TokenizedCPOTrainer

    assert parameters(trl_class.tokenize_row) == ["self", "feature", "model"]
    rows = preference_rows()
    trainer = trainer_class(model=tiny_model, args=trainer_config(config_class, tmp_path, remove_unused_columns=False),
                            processing_class=tokenizer, train_dataset=rows)
    batch = first_batch(trainer)
    concatenated = trainer.concatenated_inputs(batch, padding_value=tokenizer.pad_token_id, device=torch.device("cpu"))
    assert concatenated["concatenated_input_ids"].shape[0] == 2 * ROWS
    sequences = answer_lengths(rows)
    for ids, mask, labels in zip(concatenated["concatenated_input_ids"], concatenated["concatenated_attention_mask"],
                                 concatenated["concatenated_labels"]):
        answer_length = sequences[tuple(ids[mask.bool()].tolist())]
        trained = labels[mask.bool()]
        assert (trained[:-answer_length] == IGNORE_INDEX).all()
        assert trained[-answer_length:].tolist() == ids[mask.bool()][-answer_length:].tolist()


def test_orpo_concatenated_forward_returns_shifted_chosen_logits_and_the_nll(tokenizer, tiny_model, tmp_path):
    """TokenizedORPOTrainer.concatenated_forward replaces item 4 (the chosen NLL) and reads item 2 (chosen logits,
    already shifted: position t predicts token t + 1) of the parent's 5-tuple."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from medicalgpt.trainers import TokenizedORPOTrainer

    trainer = TokenizedORPOTrainer(model=tiny_model, args=trainer_config(ORPOConfig, tmp_path,
                                                                         remove_unused_columns=False),
                                   processing_class=tokenizer, train_dataset=preference_rows())
    batch = first_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        outputs = ORPOTrainer.concatenated_forward(trainer, trainer.model, batch)
        inputs = trainer.concatenated_inputs(batch, padding_value=trainer.padding_value, device=torch.device("cpu"))
        logits = trainer.model(inputs["concatenated_input_ids"],
                               attention_mask=inputs["concatenated_attention_mask"]).logits
    assert len(outputs) == 5
    torch.testing.assert_close(outputs[2], logits[:ROWS, :-1])
    assert outputs[4].dim() == 0


# --- TRL: SFT (CPUFriendlySFTTrainer, PackedRowsCollator, pack_dataset) ----------------------------------------------

def test_sft_trainer_adds_its_fused_head_in_init_and_logs_the_same_through_our_compact_head(
        tokenizer, tiny_model, tmp_path):
    """CPUFriendlySFTTrainer replaces TRL's fused LM head on the CPU after SFTTrainer.__init__ has added it (and set
    aux_loss_enabled); TRL's compute_loss (evaluation's) must give the same loss, entropy and token accuracy through
    it, reading the FusedCausalLMOutput fields the compact head fills."""
    from trl import SFTConfig
    from trl.trainer.utils import add_fused_lm_head

    from medicalgpt.trainers import CPUFriendlySFTTrainer

    rows = Dataset.from_list([{"input_ids": [5, 6, 7, 8, 9], "completion_mask": [0, 0, 1, 1, 1]}] * ROWS)
    trainer = CPUFriendlySFTTrainer(model=tiny_model, args=trainer_config(SFTConfig, tmp_path),
                                    processing_class=tokenizer, train_dataset=rows)
    assert "add_compact_lm_head" in trainer.model.forward.__func__.__code__.co_qualname
    assert trainer.aux_loss_enabled is False
    batch = first_batch(trainer)
    trainer.model.eval()
    results = []
    for _ in range(2):
        loss = trainer.compute_loss(trainer.model, batch)
        metrics = trainer._metrics["eval"]
        results.append((loss, metrics["entropy"][-1], metrics["mean_token_accuracy"][-1]))
        add_fused_lm_head(trainer.model, outputs=("log_probs", "entropy", "is_top1"))  # TRL's, for the second
    (our_loss, *our_metrics), (trl_loss, *trl_metrics) = results
    torch.testing.assert_close(our_loss, trl_loss)
    assert our_metrics == pytest.approx(trl_metrics, rel=1e-5)


def test_packing_gives_seq_lengths_and_the_collator_restarts_positions():
    """pack_dataset(..., strategy="bfd") must record each row's sample lengths as seq_lengths, and TRL's collator (our
    PackedRowsCollator's base) must turn them into position ids that restart at every sample."""
    from trl import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from medicalgpt.data.collators import PackedRowsCollator

    assert "return_position_ids" in {f.name for f in fields(DataCollatorForLanguageModeling)}
    rows = Dataset.from_list([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}, {"input_ids": [6, 7, 8, 9]}])
    packed = pack_dataset(rows, seq_length=6, strategy="bfd")
    assert sorted(sum(packed["seq_lengths"], [])) == [2, 3, 4] and len(packed) == 2
    row = next(row for row in packed if len(row["seq_lengths"]) == 2)
    batch = PackedRowsCollator(pad_token_id=0)([row])
    starts = [0, row["seq_lengths"][0]]
    expected = [i - max(s for s in starts if s <= i) for i in range(sum(row["seq_lengths"]))]
    assert batch["position_ids"][0].tolist() == expected
    assert "attention_mask" not in batch


def test_custom_attention_gets_position_ids_and_its_mask_function_the_mask_arguments(tiny_model_dir, monkeypatch):
    """medicalgpt.packed_attention registers an attention function and a mask function under one name, and relies on
    the attention function receiving the position ids as a keyword, the mask function attention_mask, q_length,
    kv_length and q_offset, and find_packed_sequence_indices numbering a row's samples where positions restart."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import find_packed_sequence_indices, sdpa_mask

    seen = {}

    def attention(module, query, key, value, attention_mask, **kwargs):
        seen["position_ids"] = kwargs.get("position_ids")
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    def mask(**kwargs):
        seen["mask_kwargs"] = set(kwargs)
        return sdpa_mask(**kwargs)

    AttentionInterface.register("contract_probe", attention)
    AttentionMaskInterface.register("contract_probe", mask)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.set_attn_implementation("contract_probe")
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0]])
    model(input_ids=torch.tensor([[5, 6, 7, 8, 9, 0, 0]]), position_ids=positions, use_cache=False)
    assert torch.equal(seen["position_ids"], positions)
    assert {"attention_mask", "q_length", "kv_length", "q_offset"} <= seen["mask_kwargs"]
    assert find_packed_sequence_indices(positions).tolist() == [[0, 0, 0, 1, 1, 2, 3]]
    assert find_packed_sequence_indices(torch.arange(4)[None]) is None


# --- peft: saved adapters, reward-model heads ---------------------------------------------------------------------

def test_saved_adapter_records_its_base_model(tiny_model_dir, tmp_path):
    """modeling.py resolves an adapter's base from adapter_config.json's base_model_name_or_path."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_model_dir


def test_sequence_classification_lora_trains_the_new_score_head(tiny_model_dir):
    """reward_modeling.py applies LoRA with task_type SEQ_CLS and relies on peft training the score head in full."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS"))
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert any(name.endswith("score.modules_to_save.default.weight") for name in trainable)


# --- transformers: checkpoints, logging, auto classes; torch: CPU features ------------------------------------------

def test_trainer_checkpoint_layout_and_sorting(tiny_model, tmp_path):
    """medicalgpt.training.CHECKPOINT_PARTS names the files Trainer._save_checkpoint writes (resume skips incomplete
    checkpoints by them), and sort_checkpoints(output_dir) orders checkpoints by step."""
    from transformers.trainer_utils import sort_checkpoints

    from medicalgpt.training import missing_checkpoint_parts

    rows = Dataset.from_list([{"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8]}] * 8)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                             max_steps=2, save_strategy="steps", save_steps=1, disable_tqdm=True)
    Trainer(model=tiny_model, args=args, train_dataset=rows).train()
    assert parameters(sort_checkpoints)[0] == "output_dir"
    checkpoints = sort_checkpoints(str(tmp_path))
    assert [path.rsplit("-", 1)[1] for path in checkpoints] == ["1", "2"]
    assert missing_checkpoint_parts(checkpoints[-1]) == []
    (tmp_path / "checkpoint-2" / "trainer_state.json").unlink()
    assert missing_checkpoint_parts(checkpoints[-1]) == ["trainer_state.json"]


def test_transformers_logging_goes_through_one_handler():
    """setup_logging relies on disable_default_handler + enable_propagation: with $CI set (transformers then also
    propagates), a library warning must still print once."""
    script = ("import transformers; from medicalgpt.training import setup_logging; setup_logging(); "
              "transformers.utils.logging.get_logger('transformers.contract').warning('contract check')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "CI": "true"})
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).count("contract check") == 1


def test_auto_class_model_mapping_lists_config_classes():
    """modeling.check_architecture and support_matrix ask `type(config) in AutoModel..._model_mapping`."""
    from transformers import AutoModelForSequenceClassification, LlamaConfig, Qwen2Config

    assert Qwen2Config in AutoModelForSequenceClassification._model_mapping
    assert LlamaConfig in AutoModelForCausalLM._model_mapping


def test_torch_cpu_feature_probes_exist():
    """training.cpu_has_native_bf16 reads torch.cpu's private AVX512-BF16 and AMX probes."""
    assert isinstance(torch.cpu._is_avx512_bf16_supported(), bool)
    assert isinstance(torch.cpu._is_amx_tile_supported(), bool)


def test_bytes_to_unicode_is_the_gpt2_byte_alphabet():
    """medicalgpt.vocab maps byte-level BPE tokens back to bytes with transformers' bytes_to_unicode."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    assert sorted(alphabet) == list(range(256)) and len(set(alphabet.values())) == 256
    assert alphabet[ord("a")] == "a" and alphabet[ord(" ")] == "Ġ"


def test_argparse_lists_option_strings_on_its_actions():
    """medicalgpt.args.parser_flags (unknown-flag hints and MedicalGPT's aliases) reads argparse's private
    `_actions`: each action's `option_strings` and `dest`, for the dataclass fields HfArgumentParser adds."""
    from transformers import HfArgumentParser

    from medicalgpt.args import closest_flags, parser_flags

    parser = HfArgumentParser((TrainingArguments,))
    flags = parser_flags(parser)
    assert {"--learning_rate", "--output_dir", "-h"} <= set(flags)
    assert "learning_rate" in {action.dest for action in parser._actions}
    assert closest_flags(["--learning_rat", "3e-4"], flags) == " (did you mean --learning_rat -> --learning_rate?)"



def test_peft_gives_fused_moe_experts_their_rank_pattern_and_our_filter_drops_only_its_false_warning(tmp_path):
    """medicalgpt.quiet drops peft's "rank_pattern keys did not match" warning for the pattern peft adds itself to a
    fused gate_up_proj: that pattern is applied (2r, the same scaling), so the warning is false."""
    import importlib
    import warnings
    from types import SimpleNamespace

    import medicalgpt.quiet

    from medicalgpt.args import LoraArguments, ModelArguments
    from medicalgpt.default_model import build_tokenizer
    from medicalgpt.modeling import apply_lora, load_model
    from tools.support_matrix import FAMILIES, build_family_model

    family = next(f for f in FAMILIES if f.model_type == "glm4_moe")
    model_dir = build_family_model(family, build_tokenizer(), tmp_path)

    def lora_warnings(quiet: bool) -> tuple[list[str], list]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if quiet:  # the filters as a script has them (pytest resets those set while collecting)
                importlib.reload(medicalgpt.quiet)
            ignored = [f[1] for f in warnings.filters if f[0] == "ignore" and f[2] is RuntimeWarning and f[1]]
            model = apply_lora(load_model(ModelArguments(model_name_or_path=model_dir)),
                               LoraArguments(lora_rank=8, lora_alpha=16, lora_dropout=0.0),
                               SimpleNamespace(activation_checkpointing=False))
        fused = [m for m in model.modules() if getattr(m, "parameter_name", None) == "gate_up_proj"]
        assert fused and all(m.r["default"] == 16 and m.scaling["default"] == 2.0 for m in fused)
        return [str(w.message) for w in caught if "pattern keys did not match" in str(w.message)], ignored

    false_warnings, _ = lora_warnings(quiet=False)
    assert len(false_warnings) == 2  # rank and alpha; if peft stops warning, drop the filter
    quiet_warnings, ignored = lora_warnings(quiet=True)
    assert quiet_warnings == []
    user_pattern = false_warnings[0].replace("gate_up_proj']", "gate_up_proj', 'mlp.w9']")
    assert not any(regex.match(user_pattern) for regex in ignored)  # a user's own unmatched pattern still warns

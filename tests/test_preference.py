"""Preference stages: data formats, token-level pairs, and RM / DPO / ORPO / CPO-SimPO / KTO training."""

import json

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM

import cpo_training
import dpo_training
import kto_training
import orpo_training
import reward_modeling
import validate_data
from medicalgpt.args import DataArguments, ModelArguments
from medicalgpt.data import (
    DataError,
    LengthLimits,
    build_preference_splits,
    build_unpaired_splits,
    load_splits,
    to_preference,
    to_unpaired,
)
from medicalgpt.evaluation import reward_model_accuracy
from medicalgpt.modeling import load_reward_model
from medicalgpt.templates import IGNORE_INDEX, get_template, resolve_template

# Sized for a constant start: the stage configs' warm-up would take most of these short runs.
FAST = ["--report_to", "none", "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "True",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--warmup_steps", "0",
        "--lr_scheduler_type", "linear"]
PAIRS = ["--train_file_dir", "data/preference/train", "--validation_file_dir", "data/preference/validation",
         "--max_train_samples", "64", "--max_eval_samples", "16"]
MEDICALGPT_PAIR = {"conversations": [{"from": "human", "value": "痛风急性发作首选什么药？"}],
                   "chosen": "秋水仙碱。", "rejected": "阿莫西林。"}


def data_args(path: str) -> DataArguments:
    return DataArguments(train_file_dir=path, validation_split_percentage=0)


def losses(output_dir) -> list[float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def capture(monkeypatch, module, name: str) -> list:
    """Record the trainer a stage script builds, to inspect it after main() returns."""
    built = []
    original = getattr(module, name)

    class Recording(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(module, name, Recording)
    return built


# --- data -----------------------------------------------------------------------------------------------------------

def test_preference_formats_normalise_alike():
    expected = {"messages": [{"role": "user", "content": "痛风急性发作首选什么药？"}], "tools": "",
                "chosen": "秋水仙碱。", "rejected": "阿莫西林。"}
    openai_style = {"prompt": [{"role": "user", "content": "痛风急性发作首选什么药？"}],
                    "chosen": [{"role": "assistant", "content": "秋水仙碱。"}],
                    "rejected": [{"role": "assistant", "content": "阿莫西林。"}]}
    alpaca_style = {"instruction": "痛风急性发作首选什么药？", "input": "", "chosen": "秋水仙碱。",
                    "rejected": "阿莫西林。"}
    medicalgpt_dpo_style = {"system": "", "history": [], "question": "痛风急性发作首选什么药？",  # dpo_zh_500.jsonl
                            "response_chosen": "秋水仙碱。", "response_rejected": "阿莫西林。"}
    assert (to_preference(MEDICALGPT_PAIR) == to_preference(openai_style) == to_preference(alpaca_style)
            == to_preference(medicalgpt_dpo_style) == expected)
    with_history = to_preference({**medicalgpt_dpo_style, "system": "你是医生。", "history": [["你好", "您好。"]]})
    assert [m["role"] for m in with_history["messages"]] == ["system", "user", "assistant", "user"]
    assert to_unpaired(medicalgpt_dpo_style)["completions"] == ["秋水仙碱。", "阿莫西林。"]
    with pytest.raises(DataError, match="response_rejected: empty"):
        to_preference({**medicalgpt_dpo_style, "response_rejected": " "})


def test_medicalgpt_preference_file_loads_and_bad_pairs_name_file_and_line(tmp_path):
    assert len(load_splits(data_args("data/preference/train"), to_preference)["train"]) == 400
    bad = tmp_path / "pairs.jsonl"
    missing = {k: v for k, v in MEDICALGPT_PAIR.items() if k != "rejected"}
    bad.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [MEDICALGPT_PAIR, missing]) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: rejected: missing"):
        load_splits(data_args(str(bad)), to_preference)
    with pytest.raises(DataError, match="identical answers"):
        to_preference({**MEDICALGPT_PAIR, "rejected": "秋水仙碱。"})
    with pytest.raises(DataError, match="must end with a user turn"):
        to_preference({**MEDICALGPT_PAIR, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt",
                                                                                             "value": "a"}]})


def test_kto_reads_unpaired_records_and_splits_pairs():
    assert to_unpaired({"prompt": "Dose?", "completion": "500 mg.", "label": False})["labels"] == [False]
    assert to_unpaired(MEDICALGPT_PAIR)["completions"] == ["秋水仙碱。", "阿莫西林。"]
    with pytest.raises(DataError, match="label: expected true or false"):
        to_unpaired({"prompt": "Dose?", "completion": "500 mg.", "label": "yes"})


def test_pairs_are_rendered_with_the_template(tokenizer):
    template = get_template("chatml")
    pair = to_preference({**MEDICALGPT_PAIR, "system_prompt": "你是医生。"})
    row = build_preference_splits(DatasetDict({"train": Dataset.from_list([pair])}), tokenizer, template)["train"][0]
    ids, labels = template.encode(tokenizer, pair["messages"] + [{"role": "assistant", "content": pair["chosen"]}])
    trained_end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX) + 1
    assert row["prompt_ids"] + row["chosen_ids"] == ids[:trained_end]
    assert tokenizer.decode(row["chosen_ids"]) == "秋水仙碱。<|im_end|>"
    assert tokenizer.decode(row["rejected_ids"]) == "阿莫西林。<|im_end|>"
    assert tokenizer.decode(row["prompt_ids"]).endswith("<|im_start|>assistant\n")


def long_pair(index: int, chosen: str = "建议尽快就医，完善血常规检查。" * 12, rejected: str = "多喝水。" * 30) -> dict:
    """A MedicalGPT-style pair with a long earlier exchange before the last question."""
    return {"system_prompt": "你是医生。",
            "conversations": [{"from": "human", "value": "我之前的情况是这样的：" * 20},
                              {"from": "gpt", "value": "明白了，请继续说明。" * 20},
                              {"from": "human", "value": f"病例{index}：发热三天，应该怎么处理？"}],
            "chosen": chosen, "rejected": rejected}


def test_long_pairs_are_kept_and_lose_their_prompt_before_their_answers(tokenizer, caplog):
    template = get_template("chatml")
    max_length = 160
    pairs = [to_preference(long_pair(i)) for i in range(6)] + [to_preference(long_pair(6, "秋水仙碱。", "阿莫西林。"))]
    full = [build_preference_splits(DatasetDict({"train": Dataset.from_list([p])}), tokenizer, template)["train"][0]
            for p in pairs]
    rows = build_preference_splits(DatasetDict({"train": Dataset.from_list(pairs)}), tokenizer, template,
                                   LengthLimits(max_length))["train"]
    assert len(rows) == len(pairs)
    assert "cut 7 of 7 pairs longer than --max_length 160 tokens (the prompt in 7, the answers in 6)" in caplog.text
    assert "--long_pairs drop" in caplog.text
    for row, whole, pair in zip(rows, full, pairs, strict=True):
        prompt = tokenizer.decode(row["prompt_ids"])
        # The earlier exchange went, the system prompt and the last question stayed.
        assert "之前的情况" not in prompt and prompt.startswith("<|im_start|>system\n你是医生。")
        assert prompt.endswith(f"{pair['messages'][-1]['content']}<|im_end|>\n<|im_start|>assistant\n")
        assert len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) <= max_length
        for side in ("chosen_ids", "rejected_ids"):  # answers are cut at their end only, to what the prompt leaves
            assert row[side] == whole[side][: max_length - len(row["prompt_ids"])]
    assert len(rows[0]["chosen_ids"]) > max_length // 2  # most of the budget bears loss
    assert tokenizer.decode(rows[-1]["chosen_ids"]) == "秋水仙碱。<|im_end|>"  # a short answer keeps its end


def test_long_pairs_can_be_dropped_instead_and_that_is_a_warning(tokenizer, caplog):
    template = get_template("chatml")
    pairs = [to_preference(long_pair(0))] + [to_preference(MEDICALGPT_PAIR)] * 3
    splits = DatasetDict({"train": Dataset.from_list(pairs)})
    rows = build_preference_splits(splits, tokenizer, template, LengthLimits(160, drop=True))["train"]
    assert len(rows) == 3
    assert "WARNING" in caplog.text and "dropped 1 of 4 pairs longer than --max_length 160 tokens" in caplog.text
    assert "--long_pairs truncate" in caplog.text
    with pytest.raises(DataError, match="every pair is longer than --max_length 16 .*--long_pairs truncate"):
        build_preference_splits(splits, tokenizer, template, LengthLimits(16, drop=True))


def test_kto_rows_are_fitted_each_on_its_own(tokenizer):
    records = DatasetDict({"train": Dataset.from_list([to_unpaired(long_pair(0, rejected="不用。"))])})
    rows = build_unpaired_splits(records, tokenizer, get_template("chatml"), LengthLimits(160))["train"]
    assert rows["label"] == [True, False]
    assert [len(r["prompt_ids"]) + len(r["completion_ids"]) <= 160 for r in rows] == [True, True]
    assert tokenizer.decode(rows[1]["completion_ids"]) == "不用。<|im_end|>"


def test_validate_data_predicts_what_a_preference_stage_cuts_or_drops(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(long_pair(i), ensure_ascii=False) + "\n" for i in range(3))
                    + json.dumps(MEDICALGPT_PAIR, ensure_ascii=False) + "\n")
    for stage, rows in (("dpo", 3), ("kto", 6)):
        (result,) = validate_data.main([str(data), "--stage", stage, "--model_name_or_path", tiny_model_dir,
                                        "--max_length", "160"])
        assert (result["prompts_cut"], result["answers_cut"], result["dropped_by_drop"]) == (rows, rows, rows)
    assert "--long_pairs drop drops 6 rows" in capsys.readouterr().out


@pytest.mark.parametrize("stage", ["rm", "dpo", "orpo", "cpo", "kto"])
def test_validate_data_checks_at_the_stages_default_max_length(stage, tiny_model_dir, monkeypatch):
    module = {"rm": reward_modeling, "dpo": dpo_training, "orpo": orpo_training, "cpo": cpo_training,
              "kto": kto_training}[stage]

    class Parsed(Exception):
        """Stops the stage once its arguments are parsed."""

    def stop(training_args):
        raise Parsed(training_args.max_length)

    monkeypatch.setattr(module, "prepare_run", stop)
    with pytest.raises(Parsed) as parsed:
        module.main(["--model_name_or_path", tiny_model_dir, "--output_dir", "unused"])
    assert validate_data.parse_arguments(["data", "--stage", stage]).max_length == parsed.value.args[0]


# --- stages ---------------------------------------------------------------------------------------------------------

def write_separable_pairs(directory, count: int, first: int = 0) -> str:
    """Pairs a reward model can learn to separate quickly: a fixed good answer against a fixed bad one."""
    rows = [{"conversations": [{"from": "human", "value": f"病例{i}应该怎么处理？"}],
             "chosen": "建议尽快就医，遵医嘱规范治疗。", "rejected": "不用管，自己会好的。"}
            for i in range(first, first + count)]
    directory.mkdir()
    (directory / "pairs.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return str(directory)


def test_reward_model_separates_held_out_pairs(tiny_model_dir, tokenizer, tmp_path):
    train = write_separable_pairs(tmp_path / "train", 64)
    valid = write_separable_pairs(tmp_path / "valid", 16, first=64)  # questions the training pairs never ask
    metrics = reward_modeling.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "rm"),
                                    "--train_file_dir", train, "--validation_file_dir", valid, *FAST,
                                    "--max_steps", "24", "--learning_rate", "5e-3", "--lora_rank", "8"])
    assert metrics["eval_accuracy"] > 0.9 and metrics["eval_margin"] > 0
    saved = json.loads((tmp_path / "rm" / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and "score" in saved["modules_to_save"]
    # The trained score head is saved with the adapter and loaded back: what evaluate_model.py and PPO load scores the
    # held-out pairs exactly as the trainer did.
    reloaded = load_reward_model(str(tmp_path / "rm"), ModelArguments(model_name_or_path=tiny_model_dir))
    pairs = build_preference_splits(load_splits(data_args(valid), to_preference), tokenizer,
                                    resolve_template(tokenizer, None))["train"]
    result = reward_model_accuracy(reloaded, pairs, tokenizer.pad_token_id)
    assert result["accuracy"] == metrics["eval_accuracy"]
    assert result["margin"] == pytest.approx(metrics["eval_margin"], abs=1e-4)


def test_dpo_with_lora_has_no_reference_copy_and_learns(tiny_model_dir, tmp_path, monkeypatch):
    built = capture(monkeypatch, dpo_training, "TokenizedDPOTrainer")
    out = tmp_path / "dpo"
    dpo_training.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(out), *PAIRS, *FAST,
                       "--max_steps", "12", "--learning_rate", "5e-3", "--beta", "0.5",
                       "--precompute_ref_log_probs", "True"])
    trainer = built[0]
    assert trainer.ref_model is None and trainer.model.peft_config  # reference = adapter disabled
    history = losses(out)
    assert history[0] == pytest.approx(0.6931, abs=1e-3) and sum(history[-3:]) / 3 < 0.6


def test_dpo_trains_on_the_answers_of_pairs_longer_than_max_length(tiny_model_dir, tmp_path, monkeypatch):
    built = capture(monkeypatch, dpo_training, "TokenizedDPOTrainer")
    (tmp_path / "train").mkdir()
    (tmp_path / "train/pairs.jsonl").write_text("".join(json.dumps(long_pair(i), ensure_ascii=False) + "\n"
                                                        for i in range(8)))
    dpo_training.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "out"), *FAST,
                       "--train_file_dir", str(tmp_path / "train"), "--validation_split_percentage", "0",
                       "--max_length", "160", "--max_steps", "1"])
    trainer = built[0]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    assert len(trainer.train_dataset) == 8
    assert batch["completion_mask"].sum(dim=1).min() > 80  # loss-bearing answer tokens in every row


def test_dpo_compact_head_on_cpu_gives_trls_fused_head_outputs_and_gradients(tiny_model_dir):
    from trl.trainer.utils import add_fused_lm_head

    from medicalgpt.trainers import add_compact_lm_head

    ids = torch.randint(3, 200, (4, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = mask[3, 7:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :4] = IGNORE_INDEX  # the prompt
    results = []
    for add_head in (lambda model: add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1")),
                     add_compact_lm_head):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
        add_head(model)
        output = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        output.loss.backward()
        results.append([output.loss, output.log_probs, output.entropy, output.mean_logits, output.is_top1,
                        output.label_mask, model.model.embed_tokens.weight.grad])
    for theirs, ours in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    plain = model(input_ids=ids, attention_mask=mask, labels=labels)  # without fused_lm_head: the model's own
    assert plain.logits.shape == (4, 12, model.config.vocab_size)


def test_full_dpo_keeps_a_frozen_reference(tiny_model_dir, tmp_path, monkeypatch):
    built = capture(monkeypatch, dpo_training, "TokenizedDPOTrainer")
    dpo_training.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path), *PAIRS, *FAST,
                       "--use_peft", "False", "--max_steps", "2", "--learning_rate", "1e-3",
                       "--loss_type", "ipo"])
    trainer = built[0]
    reference, initial = trainer.ref_model, AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert reference is not None and reference is not trainer.model
    pairs = list(zip(trainer.model.parameters(), reference.parameters(), initial.parameters(), strict=True))
    assert all(torch.equal(ref, start) for _, ref, start in pairs)  # the reference stayed the starting model
    assert any(not torch.equal(policy, start) for policy, _, start in pairs)  # while the policy trained


def test_orpo_loss_is_answer_nll_plus_log_odds_ratio(tiny_model_dir, tmp_path, monkeypatch):
    built = capture(monkeypatch, orpo_training, "TokenizedORPOTrainer")
    orpo_training.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path), *PAIRS, *FAST,
                        "--max_steps", "1", "--beta", "0.25"])
    trainer = built[0]
    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator(rows)
    model = trainer.model.eval()
    with torch.no_grad():
        loss, _ = trainer.get_batch_loss_metrics(model, batch, train_eval="eval")
        nll_terms, mean_logps = [], {}
        for side in ("chosen", "rejected"):
            per_row = []
            for row in rows:
                ids = torch.tensor([row[f"{side}_input_ids"]])
                labels = torch.tensor(row[f"{side}_labels"][1:])
                logp = F.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
                token_logps = logp[labels != IGNORE_INDEX].gather(1, labels[labels != IGNORE_INDEX, None])[:, 0]
                per_row.append(token_logps)
            mean_logps[side] = torch.stack([t.mean() for t in per_row])
            if side == "chosen":
                nll_terms = torch.cat(per_row)
    log_odds = (mean_logps["chosen"] - mean_logps["rejected"]) - (
        torch.log1p(-mean_logps["chosen"].exp()) - torch.log1p(-mean_logps["rejected"].exp()))
    expected = -nll_terms.mean() - 0.25 * F.logsigmoid(log_odds).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("stage, flags", [
    (cpo_training, ["--loss_type", "simpo", "--cpo_alpha", "0", "--beta", "2.0"]),
    (kto_training, ["--beta", "0.5"]),
    (orpo_training, ["--beta", "0.1"]),
])
def test_stage_lowers_its_loss(stage, flags, tiny_model_dir, tmp_path):
    out, train = tmp_path / "out", write_separable_pairs(tmp_path / "train", 64)
    # Full fine-tuning: LoRA on a randomly initialised model barely moves in a few steps.
    stage.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(out), "--train_file_dir", train, *FAST,
                "--use_peft", "False", "--max_steps", "16", "--learning_rate", "2e-3", *flags])
    history = losses(out)
    assert sum(history[-3:]) / 3 < 0.8 * sum(history[:3]) / 3

"""PT and SFT stages end to end on the tiny model: CLI, learning, packing isolation, adapters, resume."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM

import pretraining
import supervised_finetuning
from evaluate_model import main as evaluate_main
from evaluate_model import text_perplexity
from medicalgpt.args import LoraArguments, ModelArguments, SFTDataArguments, parse_args
from medicalgpt.data import build_sft_splits, pack_sft_splits
from medicalgpt.data.collators import PackedRowsCollator
from medicalgpt.data.processors import prompt_and_response
from medicalgpt.errors import UsageError, run_cli
from medicalgpt.generation import generate
from medicalgpt.modeling import load_for_inference, load_tokenizer
from medicalgpt.templates import IGNORE_INDEX, get_template

FAST = ["--report_to", "none", "--logging_steps", "5", "--save_strategy", "no", "--disable_tqdm", "True",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8"]
PT_DATA = ["--train_file_dir", "data/pretrain/train", "--validation_file_dir", "data/pretrain/validation",
           "--max_eval_samples", "200", "--block_size", "128"]
SFT_DATA = ["--train_file_dir", "data/sft/train", "--validation_file_dir", "data/sft/validation",
            "--max_train_samples", "800", "--max_eval_samples", "40", "--max_length", "256"]


@pytest.fixture(scope="module")
def pt_model(tiny_model_dir, tmp_path_factory) -> tuple[str, dict]:
    """The tiny model after a short full-parameter pretraining run, and that run's metrics."""
    out = tmp_path_factory.mktemp("pt")
    metrics = pretraining.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(out), *PT_DATA, *FAST,
                                "--use_peft", "False", "--max_steps", "60", "--learning_rate", "3e-3"])
    return str(out), metrics


def test_unknown_or_abbreviated_flag_is_an_error(capsys):
    for argv in (["--no_such_flag", "1"], ["--lora_ran", "4"]):  # (--lora_r is MedicalGPT's spelling: an alias)
        with pytest.raises(SystemExit) as exit_info:
            supervised_finetuning.main(argv)
        assert exit_info.value.code == 2
    assert "unrecognized arguments: --lora_ran 4 (did you mean --lora_ran -> --lora_rank?)" in capsys.readouterr().err


def test_config_file_with_cli_override(tmp_path, capsys):
    config = tmp_path / "sft.yaml"
    config.write_text("lora_rank: 4\ntemplate_name: qwen\n")
    types = (ModelArguments, LoraArguments, SFTDataArguments)
    _, lora_args, data_args = parse_args(types, [str(config), "--lora_rank", "16"])
    assert (lora_args.lora_rank, data_args.template_name) == (16, "qwen")
    config.write_text("lora_rnak: 4\n")
    with pytest.raises(SystemExit):
        parse_args(types, [str(config)])
    assert "unknown arguments: lora_rnak" in capsys.readouterr().err


def test_pretraining_lowers_held_out_perplexity(pt_model, tiny_model_dir):
    out, metrics = pt_model
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=tiny_model_dir))
    before = text_perplexity(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer,
                             "data/pretrain/validation", 128, 8)
    assert metrics["eval_perplexity"] < 0.5 * before
    assert (Path(out) / "loss.png").stat().st_size > 0 and (Path(out) / "model.safetensors").exists()


def test_sft_full_finetuning_lowers_loss_and_saves_template(pt_model, tmp_path):
    out = tmp_path / "sft"
    metrics = supervised_finetuning.main(["--model_name_or_path", pt_model[0], "--output_dir", str(out), *SFT_DATA,
                                          *FAST, "--use_peft", "False", "--max_steps", "40", "--learning_rate", "2e-3",
                                          "--packing", "True", "--eval_on_start", "True"])
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    initial = next(entry for entry in history if "eval_loss" in entry)  # held-out, before the first step
    assert metrics["eval_loss"] < 0.85 * initial["eval_loss"]
    assert metrics["eval_mean_token_accuracy"] > initial["eval_mean_token_accuracy"] + 0.05
    assert (out / "chat_template.jinja").read_text() == get_template("chatml").jinja
    generation_config = json.loads((out / "generation_config.json").read_text())
    im_end = load_tokenizer(ModelArguments(model_name_or_path=str(out))).convert_tokens_to_ids("<|im_end|>")
    assert im_end in generation_config["eos_token_id"]


def test_lora_adapter_reloads_and_generates(pt_model, tmp_path):
    out = tmp_path / "lora"
    supervised_finetuning.main(["--model_name_or_path", pt_model[0], "--output_dir", str(out), *SFT_DATA, *FAST,
                                "--max_steps", "5", "--learning_rate", "1e-2", "--lora_rank", "4",
                                "--neftune_noise_alpha", "5", "--activation_checkpointing", "True"])
    assert (out / "adapter_model.safetensors").exists() and (out / "tokenizer.json").exists()
    model_args = ModelArguments(model_name_or_path=pt_model[0])
    model = load_for_inference(model_args, str(out))
    base = AutoModelForCausalLM.from_pretrained(pt_model[0])
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(out)))
    prompt = get_template("chatml").encode_prompt(tokenizer, [{"role": "user", "content": "高血压用什么药？"}])
    with torch.no_grad():
        tuned, original = model(torch.tensor([prompt])).logits, base(torch.tensor([prompt])).logits
    assert not torch.allclose(tuned, original, atol=1e-4)  # the adapter was trained and is applied
    answers = generate(model, tokenizer, [prompt, prompt[:5]], max_new_tokens=8)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def _tiny_conversations(tokenizer, texts: list[tuple[str, str]]) -> DatasetDict:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "tools": ""}
            for q, a in texts]
    return build_sft_splits(DatasetDict({"train": Dataset.from_list(rows)}), tokenizer, get_template("chatml"), 128)


def test_packed_samples_do_not_attend_to_each_other(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    samples = _tiny_conversations(tokenizer, [("哮喘用什么检查？", "肺功能检查。"), ("Dose of metformin?", "500 mg.")])
    packed = pack_sft_splits(samples, max_length=128)["train"]
    assert len(packed) == 1 and len(packed[0]["seq_lengths"]) == 2
    batch = PackedRowsCollator(tokenizer.pad_token_id)([packed[0]])
    assert "attention_mask" not in batch
    first_len = packed[0]["seq_lengths"][0]
    second = torch.tensor([packed[0]["input_ids"][first_len:]])
    with torch.no_grad():  # use_cache=False as in training: a KV cache switches packed-sequence masking off
        packed_logits = model(**batch, use_cache=False).logits
        alone_logits = model(input_ids=second, use_cache=False).logits
        leaky_logits = model(input_ids=batch["input_ids"], use_cache=False).logits  # control: no position restart
    span = slice(first_len, first_len + second.shape[1])
    torch.testing.assert_close(packed_logits[0, span], alone_logits[0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(leaky_logits[0, span], alone_logits[0], atol=1e-3)


def test_packed_attention_equals_masked_sdpa_with_padding_and_falls_back_under_a_mask(tiny_model_dir, tokenizer):
    from medicalgpt.packed_attention import enable_packed_attention

    samples = _tiny_conversations(tokenizer, [("哮喘用什么检查？", "肺功能检查。"), ("Dose of metformin?", "500 mg."),
                                              ("发烧挂什么科？", "发热门诊。")])
    packed = pack_sft_splits(samples, max_length=128)["train"]
    rows = [packed[0], {"input_ids": samples["train"][0]["input_ids"], "labels": samples["train"][0]["labels"],
                        "seq_lengths": [len(samples["train"][0]["input_ids"])]}]
    batch = PackedRowsCollator(tokenizer.pad_token_id)(rows)  # row 1 is right-padded
    lengths = torch.tensor([sum(row["seq_lengths"]) for row in rows])
    real = torch.arange(batch["input_ids"].shape[1]) < lengths[:, None]
    padded_batch = tokenizer.pad({"input_ids": [samples["train"][0]["input_ids"]]}, return_tensors="pt")
    results = []
    for packed_attention in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").train()
        if packed_attention:
            assert enable_packed_attention(model, 128)
        output = model(**batch, use_cache=False)
        output.loss.backward()
        with torch.no_grad():  # a 2D padding mask: transformers' sdpa path, in both cases
            masked = model(**padded_batch).logits
        results.append((output.logits[real], output.loss, model.model.embed_tokens.weight.grad, masked))
    for reference, ours in zip(*results, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


def test_cpu_training_loss_and_gradients_through_the_compact_head_equal_trls_fused_head(tiny_model_dir, tokenizer,
                                                                                      tmp_path):
    from trl import SFTConfig, SFTTrainer

    from medicalgpt.trainers import CPUFriendlySFTTrainer

    samples = pack_sft_splits(_tiny_conversations(tokenizer, [("哮喘用什么检查？", "肺功能检查。"),
                                                              ("Dose of metformin?", "500 mg.")]), 128)["train"]
    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", packing=False)
    results = []
    for trainer_class in (SFTTrainer, CPUFriendlySFTTrainer):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
        trainer = trainer_class(model=model, args=args, processing_class=tokenizer, train_dataset=samples,
                                data_collator=PackedRowsCollator(tokenizer.pad_token_id))
        batch = trainer.data_collator([samples[0]])
        trained_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(trained_tokens))
        loss.backward()
        results.append((loss.detach(), trainer.model.model.embed_tokens.weight.grad.clone(),
                        trainer.model.forward.__func__.__code__.co_qualname))
    (trl_loss, trl_grad, trl_head), (our_loss, our_grad, our_head) = results
    assert "add_fused_lm_head" in trl_head and "add_compact_lm_head" in our_head
    torch.testing.assert_close(our_loss, trl_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_grad, trl_grad, atol=1e-6, rtol=1e-4)


def test_packed_labels_keep_the_assistant_mask(tokenizer):
    samples = _tiny_conversations(tokenizer, [("Q1?", "Answer one."), ("Q2?", "Answer two.")])
    row = pack_sft_splits(samples, max_length=128)["train"][0]
    trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]
    assert sorted(tokenizer.decode(trained).split("<|im_end|>")[:2]) == ["Answer one.", "Answer two."]


def test_resume_from_checkpoint_auto(tiny_model_dir, tmp_path, caplog):
    args = ["--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path), *PT_DATA, *FAST,
            "--max_train_samples", "100", "--save_strategy", "steps", "--save_steps", "4", "--learning_rate", "1e-3"]
    pretraining.main([*args, "--max_steps", "4"])
    assert (tmp_path / "checkpoint-4").is_dir()
    pretraining.main([*args, "--max_steps", "6", "--resume_from_checkpoint", "auto"])
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and f"Resuming from {tmp_path / 'checkpoint-4'}" in caplog.text


def test_early_stopping_saves_the_best_checkpoint(tiny_model_dir, tmp_path):
    """A large learning rate on a few blocks overfits: training stops --early_stopping_patience evaluations after
    the lowest held-out loss, and the saved model is that checkpoint's, not the last step's."""
    metrics = pretraining.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path), *PT_DATA,
                                *FAST, "--use_peft", "False", "--max_train_samples", "40", "--learning_rate", "1e-2",
                                "--max_steps", "60", "--eval_strategy", "steps", "--eval_steps", "3",
                                "--save_strategy", "steps", "--save_steps", "3", "--save_total_limit", "1",
                                "--load_best_model_at_end", "True", "--early_stopping_patience", "2"])
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    losses = {log["step"]: log["eval_loss"] for log in state["log_history"] if "eval_loss" in log}
    best_step = min(losses, key=losses.get)
    assert state["global_step"] < 60 and state["global_step"] == best_step + 2 * 3  # stopped 2 evaluations later
    assert max(losses.values()) > losses[best_step]  # held-out loss did rise after the best point
    assert metrics["eval_loss"] == pytest.approx(losses[best_step], rel=1e-4)  # the best weights were saved
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best_step}")


def test_early_stopping_without_the_best_checkpoint_is_refused(tmp_path):
    with pytest.raises(UsageError, match="needs --load_best_model_at_end True"):
        pretraining.main(["--output_dir", str(tmp_path), *PT_DATA, "--early_stopping_patience", "2"])


def test_qlora_4bit_trains_on_cpu(tiny_model_dir, tmp_path):
    metrics = supervised_finetuning.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path),
                                          *SFT_DATA, *FAST, "--load_in_4bit", "--dtype", "bfloat16",
                                          "--max_steps", "2", "--max_eval_samples", "8"])
    assert metrics["train_loss"] > 0 and (tmp_path / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("flags, message", [
    (["--load_in_4bit", "--use_peft", "False"], "cannot be fully fine-tuned"),
    (["--load_in_4bit", "--load_in_8bit"], "exclusive"),
    (["--attn_implementation", "flash_attention_2"], "needs a CUDA GPU"),
])
def test_impossible_options_fail_before_any_work(flags, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        supervised_finetuning.main(["--output_dir", str(tmp_path), *SFT_DATA, *flags])


def test_cli_reports_bad_data_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}\n{"oops"\n')
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: supervised_finetuning.main(["--train_file_dir", str(bad), "--output_dir", str(tmp_path)]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err  # the reading progress bar, then the error on one line: no traceback
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (f"error: {bad}:2: invalid JSON: Expecting ':' delimiter (column 8); "
                                    "fix the record, or pass --skip_bad_records to skip bad records")


def test_evaluate_appends_rows_and_prints_the_table(tiny_model_dir, tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    common = ["--model_name_or_path", tiny_model_dir, "--results_file", str(results), "--max_new_tokens", "4"]
    evaluate_main([*common, "--name", "first", "--perplexity_files", "data/pretrain/validation"])
    row = evaluate_main([*common, "--name", "second", "--questions_file", "data/sft/validation",
                         "--num_questions", "2"])
    assert [json.loads(line)["name"] for line in results.read_text().splitlines()] == ["first", "second"]
    assert len(row["samples"]) == 2 and row["samples"][0]["reference"]
    out = capsys.readouterr().out
    assert "| first | " in out and "| second | " in out and "reference: " in out


def test_held_out_reward_scores_the_answers_and_the_references(tiny_model_dir, tmp_path, monkeypatch):
    """--reward_file: the reward model's mean score of the model's greedy answers and of the reference answers, and
    the answers' length. With a reward model that scores a sequence by its length, the tiny model's answers (cut at
    4 tokens) score below the long references."""
    import evaluate_model

    class LengthReward(torch.nn.Module):
        device = torch.device("cpu")

        def forward(self, input_ids, attention_mask):
            return SimpleNamespace(logits=attention_mask.sum(1, keepdim=True).float())

    monkeypatch.setattr(evaluate_model, "load_reward_model", lambda path, model_args: LengthReward())
    common = ["--model_name_or_path", tiny_model_dir, "--max_new_tokens", "4"]
    with pytest.raises(UsageError, match="pass --reward_model too"):
        evaluate_main([*common, "--reward_file", "data/sft/validation"])
    metrics = evaluate_main([*common, "--reward_file", "data/sft/validation", "--reward_model", "rm"])["metrics"]
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=tiny_model_dir))
    template = get_template("chatml")
    conversations = [json.loads(line) for line in Path("data/sft/validation/sharegpt_medical.jsonl").open()]
    lengths = [sum(map(len, prompt_and_response(tokenizer, template, [{"role": "user", "content": c["conversations"][0][
        "value"]}], None, c["conversations"][1]["value"]))) for c in conversations]
    assert metrics["reference_reward"] == pytest.approx(sum(lengths) / len(lengths))
    assert metrics["answer_tokens"] <= 4 and metrics["heldout_reward"] < metrics["reference_reward"]

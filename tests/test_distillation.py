"""Distillation: on-policy distillation moves the student towards its teacher; mismatched tokenizers and a missing
teacher are refused up front; the offline recipe (teacher answers, then SFT) runs end to end."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import distillation_training
from medicalgpt.data import load_splits, to_conversation
from medicalgpt.data.processors import prompt_and_response
from medicalgpt.errors import UsageError
from medicalgpt.evaluation import teacher_kl
from medicalgpt.templates import resolve_template

REPO = Path(__file__).resolve().parents[1]
FAST = ["--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True", "--logging_steps", "5",
        "--validation_split_percentage", "0"]


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir, tmp_path_factory) -> str:
    """A teacher that predicts differently from the student: the tiny model with every weight perturbed and its
    final norm scaled up, so its next-token distributions are sharp where the student's are nearly flat."""
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5 * parameter.std())
        teacher.model.norm.weight.mul_(8)
    path = tmp_path_factory.mktemp("teacher")
    teacher.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return str(path)


def held_out_pairs(tokenizer, count: int = 24) -> list[tuple[list[int], list[int]]]:
    from medicalgpt.args import DataArguments

    records = load_splits(DataArguments(train_file_dir="data/sft/validation", validation_split_percentage=0),
                          to_conversation)["train"].select(range(count))
    template = resolve_template(tokenizer, None)
    return [prompt_and_response(tokenizer, template, record["messages"][:-1], None, record["messages"][-1]["content"])
            for record in records]


def test_on_policy_distillation_closes_the_gap_to_the_teacher(tiny_model_dir, teacher_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = held_out_pairs(tokenizer)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    before = teacher_kl(AutoModelForCausalLM.from_pretrained(tiny_model_dir), teacher, pairs)

    distillation_training.main([
        "--model_name_or_path", tiny_model_dir, "--teacher_model_name_or_path", teacher_dir,
        "--train_file_dir", "data/sft/train", "--max_train_samples", "128", "--output_dir", str(tmp_path),
        "--use_peft", "False", "--learning_rate", "5e-3", "--max_steps", "60", "--per_device_train_batch_size", "4",
        "--max_completion_length", "24", *FAST])

    after = teacher_kl(AutoModelForCausalLM.from_pretrained(tmp_path), teacher, pairs)
    # Measured on held-out answers, not on the student's own samples it trained on: 3.96 -> 2.50 nats per token.
    assert after < 0.75 * before, (before, after)


def test_a_teacher_with_another_vocabulary_is_refused_before_loading(tiny_model_dir, teacher_dir, tmp_path):
    other = tmp_path / "other-teacher"
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    tokenizer.add_tokens(["高血压"])
    tokenizer.save_pretrained(other)
    with pytest.raises(UsageError, match=r"the teacher's tokenizer differs from the student's .*1 entries differ.*"
                                         r"distil offline"):
        distillation_training.main(["--model_name_or_path", tiny_model_dir, "--teacher_model_name_or_path", str(other),
                                    "--train_file_dir", "data/sft/train", "--output_dir", str(tmp_path / "out"), *FAST])


def test_a_missing_teacher_is_a_usage_error(tiny_model_dir, tmp_path):
    with pytest.raises(UsageError, match="--teacher_model_name_or_path is required"):
        distillation_training.main(["--model_name_or_path", tiny_model_dir, "--train_file_dir", "data/sft/train",
                                    "--output_dir", str(tmp_path), *FAST])


def test_prompts_stop_at_the_last_user_turn():
    record = {"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                                {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}
    assert distillation_training.to_distillation_prompt(record) == {"prompt": [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]}
    assert json.dumps(distillation_training.to_distillation_prompt({"instruction": "q", "output": "a"}))


def test_offline_distillation_teacher_answers_become_an_sft_file_a_student_trains_on(tiny_model_dir, tmp_path,
                                                                                      capsys):
    import inference
    import supervised_finetuning

    prompts = tmp_path / "prompts.jsonl"
    lines = (REPO / "data/sft/validation/sharegpt_medical.jsonl").read_text(encoding="utf-8").splitlines()[:6]
    prompts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    answers = tmp_path / "teacher_sft.jsonl"
    inference.main(["--base_model", tiny_model_dir, "--data_file", str(prompts), "--output_file", str(answers),
                    "--output_format", "sft", "--max_new_tokens", "8", "--temperature", "1"])

    records = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()]
    empty = re.search(r"Left out (\d+) of 6 prompts whose answer was empty", capsys.readouterr().out)
    assert len(records) + (int(empty[1]) if empty else 0) == len(lines) and records
    prompts_asked = [to_conversation(json.loads(line))["messages"][:-1] for line in lines]
    for record in records:  # each is an SFT record: one of the prompts, with the teacher's answer as the last turn
        assert to_conversation(record)["messages"][:-1] in prompts_asked
        assert record["messages"][-1]["role"] == "assistant" and record["messages"][-1]["content"].strip()

    metrics = supervised_finetuning.main(["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(answers),
                                          "--output_dir", str(tmp_path / "student"), "--max_steps", "2",
                                          "--per_device_train_batch_size", "2", *FAST])
    assert metrics["train_loss"] > 0


def test_an_interrupted_run_resumes_to_the_uninterrupted_weights(tiny_model_dir, teacher_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    def run(output_dir, *extra):
        distillation_training.main([
            "--model_name_or_path", tiny_model_dir, "--teacher_model_name_or_path", teacher_dir,
            "--train_file_dir", "data/sft/train", "--max_train_samples", "32", "--output_dir", str(output_dir),
            "--use_peft", "False", "--learning_rate", "5e-3", "--per_device_train_batch_size", "4",
            "--max_completion_length", "8", "--report_to", "none", "--disable_tqdm", "True",
            "--validation_split_percentage", "0", "--save_strategy", "steps", "--save_steps", "2", *extra])

    run(tmp_path / "straight", "--max_steps", "4")
    interrupted, tampered = tmp_path / "interrupted", tmp_path / "tampered"
    for directory in (interrupted, tampered):  # as if stopped after step 2
        shutil.copytree(tmp_path / "straight" / "checkpoint-2", directory / "checkpoint-2")
    run(interrupted, "--max_steps", "4", "--resume_from_checkpoint", "auto")
    straight, resumed = (load_file(d / "model.safetensors") for d in (tmp_path / "straight", interrupted))
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=1e-6, rtol=0)

    # The checkpoint is what the run continues from (a fresh start would give the same weights as the straight run).
    weights = tampered / "checkpoint-2" / "model.safetensors"
    save_file({name: tensor + 0.01 for name, tensor in load_file(weights).items()}, weights)
    run(tampered, "--max_steps", "4", "--resume_from_checkpoint", "auto")
    assert not torch.allclose(load_file(tampered / "model.safetensors")["model.norm.weight"],
                              straight["model.norm.weight"])

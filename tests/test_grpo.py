"""GRPO: medical reward functions, GRPO records, option checks, and training that raises the reward."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import grpo_training
from medicalgpt import training
from medicalgpt.args import DataArguments
from medicalgpt.data import DataError, load_splits, to_grpo
from medicalgpt.errors import UsageError
from medicalgpt.plotting import metric_series
from medicalgpt.rewards import (
    THINK_ANSWER_PROMPT,
    answer_accuracy,
    answer_match,
    answer_overlap,
    answer_partial_credit,
    choice_accuracy,
    completion_text,
    format_reward,
    length_penalty,
    load_reward_functions,
    numeric_closeness,
    numeric_match,
)

FAST = ["--report_to", "none", "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "True",
        "--num_generations", "4", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "4",
        "--max_completion_length", "8"]
GRPO_DATA = ["--train_file_dir", "data/grpo/train", "--max_train_samples", "64"]

ROOT = Path(__file__).resolve().parents[1]


def chat(text: str) -> list[dict]:
    """A conversational completion, as TRL passes it to reward functions."""
    return [{"role": "assistant", "content": text}]


def scores(reward, completions: list[str], reference: str) -> list:
    return reward([chat(text) for text in completions], answer=[reference] * len(completions))


def han_fraction(completions: list, **kwargs) -> list[float]:
    """Toy reward the tiny random model can learn: the share of Chinese characters in the completion."""
    texts = [completion_text(completion) for completion in completions]
    return [sum("\u4e00" <= ch <= "\u9fff" for ch in text) / max(1, len(text)) for text in texts]


def always_one(completions: list, **kwargs) -> list[float]:
    """A reward that cannot tell completions apart."""
    return [1.0] * len(completions)


def rewards_logged(output_dir) -> list[float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["reward"] for entry in history if "reward" in entry]


# --- reward functions -----------------------------------------------------------------------------------------------

def test_format_reward_wants_think_then_answer_and_nothing_else():
    good = ["<think>Weight 28 kg.\n28 × 10 × 3 = 840.</think>\n<answer>840 mg</answer>",
            "  <think></think><answer>B</answer>\n"]
    bad = ["<answer>B</answer>", "<think>x</think>", "Sure! <think>x</think><answer>B</answer>",
           "<think>x</think><answer>B</answer> trailing", "<think>x</think><answer> </answer>",
           "<think>x</think><answer>B</answer><answer>C</answer>", "<think><think>x</think></think><answer>B</answer>"]
    assert format_reward([chat(text) for text in good + bad]) == [1.0] * len(good) + [0.0] * len(bad)
    assert format_reward(good) == [1.0, 1.0]  # plain-string completions (non-conversational prompts)


def test_choice_accuracy_reads_letters_from_the_answer():
    assert scores(choice_accuracy, ["<think>A and C are wrong</think><answer>B</answer>", "答案是B", "选B。",
                                    "The correct answer is (B).", "B. urology"], "B") == [1.0] * 5
    assert scores(choice_accuracy, ["<answer>C</answer>", "A和C", "B is wrong, the answer is C", ""], "B") == [0.0] * 4
    assert scores(choice_accuracy, ["AC", "A、C", "Answer: A, C", "A", "ABC"], "AC") == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert scores(choice_accuracy, ["B"], "眼压测量") == [None]  # not a multiple-choice reference


def test_answer_match_ignores_case_whitespace_and_punctuation():
    assert scores(answer_match, ["<answer>甲巯咪唑。</answer>", "甲巯咪唑", "首选甲巯咪唑治疗", "丙硫氧嘧啶"],
                  "甲巯咪唑") == [1.0, 1.0, 0.5, 0.0]
    assert scores(answer_match, ["X Ray of the Affected Joint!", "<answer>An x-ray of the affected joint</answer>",
                                 "MRI"], "X-ray of the affected joint") == [1.0, 0.5, 0.0]
    assert scores(answer_match, ["（眼压测量）", "眼压 测量，"], "眼压测量") == [1.0, 1.0]  # full-width punctuation


def test_answer_match_matches_numbers_as_whole_numbers():
    assert scores(answer_match, ["可能是4或者13", "3.5", "13", "约3次", "3", "共3.5天"], "3") == [
        0.0, 0.0, 0.0, 0.5, 1.0, 0.0]
    assert scores(answer_match, ["3.5天", "35天", "13.5天"], "3.5天") == [1.0, 0.0, 0.0]


def test_numeric_match_converts_units_within_one_percent():
    matches = ["<answer>840 mg</answer>", "840毫克", "0.84 g", "0.84克", "840000 mcg", "840000 µg", "846 mg",
               "<think>10 mg/kg × 28 kg × 3</think><answer>= 840 mg</answer>"]
    misses = ["850 mg", "840", "840 mL", "84 mg", "about a gram", "840 mg/kg"]
    assert scores(numeric_match, matches + misses, "840 mg") == [1.0] * len(matches) + [0.0] * len(misses)
    assert scores(numeric_match, ["1,600 mg", "1.6 g"], "1.6克") == [1.0, 1.0]
    assert scores(numeric_match, ["840 mg"], "methimazole") == [None]


def test_answer_accuracy_dispatches_on_the_reference_and_length_penalty():
    completions = [chat("<answer>D</answer>"), chat("<answer>0.36 g</answer>"), chat("<answer>眼压测量</answer>"),
                   chat("<answer>C</answer>")]
    assert answer_accuracy(completions, answer=["D", "360 mg", "眼压测量", "360 mg"]) == [1.0, 1.0, 1.0, 0.0]
    assert length_penalty(["x" * 1000, "x" * 1500, "x" * 9000]) == [0.0, -0.5, -1.0]


def test_partial_credit_ranks_near_misses_above_far_ones():
    assert scores(answer_overlap, ["serum TSH and free T4 test", "<answer>serum TSH test</answer>", "TSH", "MRI"],
                  "serum TSH and free T4 test") == pytest.approx([1.0, 2 / 3, 2 / 7, 0.0])
    assert scores(answer_overlap, ["奥美拉唑", "奥美", "阿莫西林"], "奥美拉唑") == pytest.approx([1.0, 2 / 3, 0.0])
    assert scores(numeric_closeness, ["0.84 g", "800 mg", "420 mg", "2000 mg", "840", "840 mL"], "840 mg") == \
        pytest.approx([1.0, 0.5 * (1 - 40 / 840), 0.25, 0.0, 0.0, 0.0])
    # Right answers score 1.0 as in answer_accuracy; letters stay all-or-nothing (no credit for hedging "AD").
    completions = [chat(text) for text in ("D", "AD", "360 mg", "300 mg", "眼压测量", "眼压")]
    references = ["D", "D", "360 mg", "360 mg", "眼压测量", "眼压测量"]
    assert answer_partial_credit(completions, answer=references) == pytest.approx([1.0, 0.0, 1.0, 0.5 * 5 / 6, 1.0,
                                                                                   2 / 3])
    assert answer_accuracy(completions, answer=references) == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]


def test_reward_functions_load_by_name_or_module_function():
    loaded = load_reward_functions(["format_reward", "medicalgpt.rewards:numeric_match", f"{__name__}:han_fraction"])
    assert loaded == [format_reward, numeric_match, han_fraction]
    for name, message in [("no_such_reward", "unknown reward function; use one of format_reward"),
                          ("no_such_module:f", "cannot import module 'no_such_module'"),
                          ("medicalgpt.rewards:missing", "module 'medicalgpt.rewards' has no function 'missing'")]:
        with pytest.raises(UsageError, match=message):
            load_reward_functions([name])


# --- data -----------------------------------------------------------------------------------------------------------

def test_to_grpo_normalises_every_record_shape():
    user = {"role": "user", "content": "First-line drug for gout flares?"}
    expected = {"prompt": [user], "answer": "colchicine"}
    assert to_grpo({"question": user["content"], "answer": "colchicine"}) == expected
    assert to_grpo({"messages": [user], "answer": "colchicine"}) == expected
    mcq = to_grpo({"question": "偏头痛通常由哪个科室诊治？", "options": {"A": "眼科", "B": "神经内科"}, "answer": "B"},
                  system_prompt=THINK_ANSWER_PROMPT)
    assert mcq["prompt"] == [{"role": "system", "content": THINK_ANSWER_PROMPT},
                             {"role": "user", "content": "偏头痛通常由哪个科室诊治？\nA. 眼科\nB. 神经内科"}]
    assert mcq["answer"] == "B"
    own_system = to_grpo({"messages": [{"role": "system", "content": "Be brief."}, user], "answer": 5},
                         system_prompt=THINK_ANSWER_PROMPT)
    assert own_system == {"prompt": [{"role": "system", "content": "Be brief."}, user], "answer": "5"}


def test_grpo_files_load_and_bad_records_name_file_and_line(tmp_path):
    assert len(load_splits(DataArguments(train_file_dir="data/grpo/train", validation_split_percentage=0),
                           to_grpo)["train"]) == 300
    bad = tmp_path / "grpo.jsonl"
    bad.write_text('{"question": "q1", "answer": "a"}\n{"question": "q2", "answer": " "}\n')
    with pytest.raises(DataError, match=r"grpo\.jsonl:2: answer: missing"):
        load_splits(DataArguments(train_file_dir=str(bad)), to_grpo)
    with pytest.raises(DataError, match="must end with a user turn"):
        to_grpo({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "answer": "a"})


# --- the stage ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    pytest.param(["--use_vllm", "True"], "--use_vllm needs a CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")),
    (["--reward_weights", "1,2,3"], "3 weights for 2 reward sources"),
    (["--reward_funcs", "answer_acuracy"], "unknown reward function"),
    (["--num_generations", "3"], "must be divisible by num_generations"),
    (["--num_generations", "8", "--per_device_eval_batch_size", "4"], r"eval batch \(4\) must hold whole groups of 8"),
])
def test_impossible_options_fail_before_any_work(flags, message, tmp_path):
    with pytest.raises(UsageError, match=message):  # a model load would fail otherwise: the path does not exist
        grpo_training.main(["--model_name_or_path", str(tmp_path / "none"), "--output_dir", str(tmp_path),
                            *GRPO_DATA, *FAST, *flags])


def test_full_finetuning_raises_a_learnable_reward(tiny_model_dir, tmp_path):
    grpo_training.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path), *GRPO_DATA, *FAST,
                        "--validation_split_percentage", "0", "--use_peft", "False", "--system_prompt", "",
                        "--reward_funcs", f"{__name__}:han_fraction", "--max_steps", "30", "--learning_rate", "2e-2",
                        "--lr_scheduler_type", "constant"])
    rewards = rewards_logged(tmp_path)
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert len(rewards) == 30 and last > first + 0.3, rewards


def test_rewards_that_never_differ_within_a_group_are_a_warning(tiny_model_dir, tmp_path, caplog, monkeypatch):
    plotted = []
    monkeypatch.setattr(training, "plot_metrics", lambda history, path, metrics, title: plotted.append(
        metric_series(history, metrics)))
    grpo_training.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path), *GRPO_DATA, *FAST,
                        "--validation_split_percentage", "0", "--reward_funcs", f"{__name__}:always_one",
                        "--max_steps", "2"])
    warnings = [r.getMessage() for r in caplog.records if "same reward for every completion" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("100% of the groups")
    assert "always_one 1.00" in warnings[0] and "--num_generations" in warnings[0]
    # loss.png shows the reward (here constant, with a zero loss) by its name, above the loss
    assert list(plotted[-1]) == ["reward", "loss"] and [r for _, r in plotted[-1]["reward"]["train"]] == [1.0, 1.0]


def test_the_final_evaluation_is_capped(tiny_model_dir, tmp_path, monkeypatch):
    evaluated = []
    monkeypatch.setattr(grpo_training.GRPOTrainer, "evaluate", lambda self: evaluated.append(len(self.eval_dataset))
                        or {"eval_reward": 0.0})
    grpo_training.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path), *GRPO_DATA, *FAST,
                        "--validation_file_dir", "data/grpo/validation", "--max_steps", "1"])
    cap = yaml.safe_load((ROOT / "configs" / "grpo.yaml").read_text())["max_eval_samples"]  # the stage's default
    assert evaluated == [cap] and cap < 120


def test_lora_with_rule_rewards_and_a_reward_model(tiny_model_dir, tmp_path):
    reward_dir = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).save_pretrained(reward_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(reward_dir)
    out = tmp_path / "out"
    metrics = grpo_training.main(["--model_name_or_path", tiny_model_dir, "--output_dir", str(out), *GRPO_DATA, *FAST,
                                  "--validation_file_dir", "data/grpo/validation", "--max_eval_samples", "4",
                                  "--reward_model", str(reward_dir), "--reward_weights", "1,1,0.1", "--max_steps", "2"])
    assert {"eval_rewards/format_reward/mean", "eval_rewards/answer_accuracy/mean", "eval_rewards/rm/mean"} <= set(
        metrics)
    assert (out / "adapter_model.safetensors").exists() and "<|im_start|>" in (out / "chat_template.jinja").read_text()

"""Generate the tool-calling sample data from the knowledge table: SFT conversations in MedicalGPT's ShareGPT
tool format (tools, function_call, observation) for the three sample medical tools of medicalgpt.sample_tools,
whose results (from knowledge.py) are what those tools return when they run.

Usage (from any directory)::

    python data/build_tool_data.py

Writes tools/train/medical_tools.jsonl (SFT conditions) and tools/validation/medical_tools.jsonl (held-out
conditions, as in build_sample_data.py: their drugs, exams and symptoms never appear in train), and the validation
split's first questions with their tools as tools/questions.jsonl (prompts for inference.py). Some questions need
no tool (the answer is plain text), so a model that calls a tool for everything is caught. Deterministic.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from build_sample_data import HELD_OUT_CONDITIONS, SFT_CONDITIONS, join_items
from knowledge import WEIGHT_BASED_DOSES

DATA_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(DATA_DIR.parent))

from medicalgpt.sample_tools import SAMPLE_TOOLS, call_sample_tool  # noqa: E402

SEED = 20241215
TRAIN_SIZE, VALIDATION_SIZE = 400, 40
NO_TOOL_RATE = 0.2

CHILD_DRUGS = {lang: sorted(d[f"drug_{lang}"] for d in WEIGHT_BASED_DOSES) for lang in ("en", "zh")}

QUESTIONS = {
    ("dose", "adult", "en"): ["What is the usual adult dose of {drug}?", "How much {drug} does an adult take?"],
    ("dose", "adult", "zh"): ["{drug}成人的常用剂量是多少？", "成人{drug}怎么用？"],
    ("dose", "child", "en"): ["What is the dose of {drug} for a child?", "How much {drug} can a child take?"],
    ("dose", "child", "zh"): ["儿童{drug}的剂量是多少？", "孩子用{drug}用多少量？"],
    ("department", "en"): ["I have {symptom}. Which department should I see?", "Which clinic treats {symptom}?"],
    ("department", "zh"): ["我有{symptom}，应该挂哪个科？", "{symptom}看哪个科室？"],
    ("exam", "en"): ["Which exam confirms {condition}?", "What test diagnoses {condition}?"],
    ("exam", "zh"): ["{condition}要做什么检查？", "确诊{condition}靠什么检查？"],
    ("none", "en"): ["What are the symptoms of {condition}?", "How does {condition} usually present?"],
    ("none", "zh"): ["{condition}有哪些症状？", "{condition}通常有什么表现？"],
}
ANSWERS = {
    ("dose", "en"): "The usual {population} dose of {drug} is {dose}.",
    ("dose", "zh"): "{drug}的{population}常用剂量：{dose}。",
    ("department", "en"): "For {symptom}, see {departments}.",
    ("department", "zh"): "{symptom}建议就诊：{departments}。",
    ("exam", "en"): "The key exam for {condition} is {exam}.",
    ("exam", "zh"): "{condition}的关键检查是{exam}。",
    ("none", "en"): "Typical symptoms of {condition} include {symptoms}.",
    ("none", "zh"): "{condition}的典型症状有{symptoms}。",
}
POPULATION_ZH = {"adult": "成人", "child": "儿童"}


def example(rng: random.Random, conditions: list[dict], kind: str, lang: str) -> dict:
    """One conversation: the question, the call and its result from the table, and the answer (or no call)."""
    condition = rng.choice(conditions)
    name = condition[f"name_{lang}"]
    if kind == "dose":
        population = rng.choice(["adult", "child"])
        drug = rng.choice(CHILD_DRUGS[lang]) if population == "child" else condition[f"drug_{lang}"]
        question = rng.choice(QUESTIONS[("dose", population, lang)]).format(drug=drug)
        arguments = {"drug": drug, "population": population}
        result = call_sample_tool("lookup_drug_dose", arguments)
        answer = ANSWERS[("dose", lang)].format(drug=drug, dose=result["dose"], population=population if lang == "en"
                                                else POPULATION_ZH[population])
    elif kind == "department":
        symptom = rng.choice(condition[f"symptoms_{lang}"])
        question = rng.choice(QUESTIONS[("department", lang)]).format(symptom=symptom)
        arguments = {"symptom": symptom}
        result = call_sample_tool("find_department", arguments)
        answer = ANSWERS[("department", lang)].format(symptom=symptom,
                                                      departments=join_items(result["departments"], lang))
    elif kind == "exam":
        question = rng.choice(QUESTIONS[("exam", lang)]).format(condition=name)
        arguments = {"condition": name}
        result = call_sample_tool("recommend_exam", arguments)
        answer = ANSWERS[("exam", lang)].format(condition=name, exam=result["exam"])
    else:  # a question the model answers itself
        question = rng.choice(QUESTIONS[("none", lang)]).format(condition=name)
        answer = ANSWERS[("none", lang)].format(condition=name,
                                                symptoms=join_items(condition[f"symptoms_{lang}"], lang))
        return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
                "tools": SAMPLE_TOOLS}
    call = {"name": {"dose": "lookup_drug_dose", "department": "find_department", "exam": "recommend_exam"}[kind],
            "arguments": arguments}
    return {"conversations": [
        {"from": "human", "value": question},
        {"from": "function_call", "value": json.dumps(call, ensure_ascii=False)},
        {"from": "observation", "value": json.dumps(result, ensure_ascii=False)},
        {"from": "gpt", "value": answer}], "tools": SAMPLE_TOOLS}


def build(conditions: list[dict], size: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    kinds = ["dose", "department", "exam"]
    return [example(rng, conditions, "none" if rng.random() < NO_TOOL_RATE else rng.choice(kinds),
                    rng.choice(["en", "zh"])) for _ in range(size)]


def write(records: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(f"{path.relative_to(DATA_DIR)}: {len(records)} records")


def main() -> None:
    write(build(SFT_CONDITIONS, TRAIN_SIZE, SEED), DATA_DIR / "tools" / "train" / "medical_tools.jsonl")
    validation = build(HELD_OUT_CONDITIONS, VALIDATION_SIZE, SEED + 1)
    write(validation, DATA_DIR / "tools" / "validation" / "medical_tools.jsonl")
    write([{"conversations": r["conversations"][:1], "tools": r["tools"]} for r in validation],
          DATA_DIR / "tools" / "questions.jsonl")


if __name__ == "__main__":
    main()

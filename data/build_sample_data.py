"""Generate every MedicalGPT sample dataset from the hand-written table in knowledge.py.

Usage (from any directory)::

    python data/build_sample_data.py

Output is deterministic: each dataset uses its own fixed-seed ``random.Random``,
so running the script twice produces byte-identical files. The conditions are
split into SFT_CONDITIONS (~70%) and HELD_OUT_CONDITIONS (~30%): every fact is
in the pretraining corpus, but held-out conditions never appear in SFT training
data, so later stages can test whether SFT unlocks knowledge from pretraining.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import NamedTuple

from knowledge import CONDITIONS, WEIGHT_BASED_DOSES

DATA_DIR = Path(__file__).resolve().parent
SEED = 20240601
LANGS = ("en", "zh")
FACT_TYPES = ("symptoms", "exam", "drug", "dose", "department")
LETTERS = "ABCD"
HELD_OUT_FRACTION = 0.3

SHAREGPT_SINGLE_TURN = 850
SHAREGPT_MULTI_TURN = 150
SHAREGPT_SYSTEM_RATE = 0.1
SFT_VALIDATION_SIZE = 150
ALPACA_PLAIN, ALPACA_QUESTION_INPUT, ALPACA_TREATMENT_INPUT, ALPACA_HISTORY = 60, 15, 15, 10
OPENAI_SINGLE_TURN, OPENAI_MULTI_TURN, OPENAI_SYSTEM_RATE = 70, 30, 0.3
PREFERENCE_TRAIN_SIZE, PREFERENCE_VALIDATION_SIZE = 400, 80
GRPO_TRAIN_MIX = {"short_answer": 130, "multiple_choice": 100, "dose_calculation": 70}
GRPO_VALIDATION_MIX = {"short_answer": 48, "multiple_choice": 40, "dose_calculation": 32}
EXAM_STYLE_SFT_MIX = {"short_answer": 100, "multiple_choice": 100, "dose_calculation": 50}
TRAIN_WEIGHTS_KG = range(10, 41, 2)  # even weights; validation uses odd ones, so no
VALIDATION_WEIGHTS_KG = range(11, 40, 2)  # dose question appears in both splits

# Pretraining sentence templates. Validation templates are never used in train.
PRETRAIN_TRAIN_TEMPLATES = {
    "en": {
        "symptoms": [
            "Typical symptoms of {name} include {symptoms}.",
            "People with {name} often experience {symptoms}.",
            "{Name} commonly presents with {symptoms}.",
            "The main clinical features of {name} are {symptoms}.",
            "Patients who have {name} frequently report {symptoms}.",
            "Common signs of {name} are {symptoms}.",
            "{Name} is usually recognised by {symptoms}.",
        ],
        "exam": [
            "The key diagnostic test for {name} is {exam}.",
            "{Name} is usually confirmed by {exam}.",
            "Doctors rely on {exam} to diagnose {name}.",
            "To establish a diagnosis of {name}, clinicians order {exam}.",
            "The most useful investigation in suspected {name} is {exam}.",
            "{Exam} is the main examination used to diagnose {name}.",
            "A diagnosis of {name} is best made with {exam}.",
        ],
        "drug": [
            "The first-line drug for {name} is {drug}.",
            "{Name} is usually treated with {drug}.",
            "{Drug} is a standard first-line medicine for {name}.",
            "Guidelines recommend {drug} as initial drug therapy for {name}.",
            "A common first choice of medication in {name} is {drug}.",
            "Treatment of {name} usually starts with {drug}.",
            "Doctors commonly prescribe {drug} first for {name}.",
        ],
        "dose": [
            "The usual adult dose of {drug} for {name} is {dose}.",
            "For {name}, {drug} is usually given to adults as {dose}.",
            "{Drug} for {name} is generally dosed in adults as {dose}.",
            "A typical adult regimen of {drug} in {name} is {dose}.",
            "When {drug} is used for {name}, the standard adult dose is {dose}.",
            "Adults with {name} usually receive {drug} as {dose}.",
            "The recommended adult dosing of {drug} for {name} is {dose}.",
        ],
        "department": [
            "{Name} is usually managed in the {department} department.",
            "Patients with {name} are typically seen by {department} specialists.",
            "The appropriate department for {name} is {department}.",
            "People with {name} should usually attend the {department} clinic.",
            "In hospital, {name} falls under the care of the {department} team.",
            "{Department} is the department that usually treats {name}.",
            "A patient with {name} is normally referred to {department}.",
        ],
    },
    "zh": {
        "symptoms": [
            "{name}的典型症状包括{symptoms}。",
            "{name}患者常出现{symptoms}。",
            "{name}的主要临床表现为{symptoms}。",
            "患有{name}的人往往会有{symptoms}等症状。",
            "{name}常见的症状有{symptoms}。",
            "{name}通常表现为{symptoms}。",
            "{name}起病后多见{symptoms}。",
        ],
        "exam": [
            "诊断{name}的关键检查是{exam}。",
            "{name}通常通过{exam}来确诊。",
            "医生主要依靠{exam}诊断{name}。",
            "怀疑{name}时，首选的检查是{exam}。",
            "{exam}是确诊{name}最重要的检查。",
            "确诊{name}一般需要进行{exam}。",
            "对于疑似{name}的患者，应安排{exam}。",
        ],
        "drug": [
            "{name}的一线治疗药物是{drug}。",
            "{name}通常使用{drug}治疗。",
            "{drug}是治疗{name}的标准一线药物。",
            "指南推荐{drug}作为{name}的初始药物治疗。",
            "治疗{name}时，常首选{drug}。",
            "{name}的药物治疗一般从{drug}开始。",
            "医生通常首先为{name}患者开具{drug}。",
        ],
        "dose": [
            "{drug}治疗{name}的成人常用剂量为{dose}。",
            "成人{name}患者使用{drug}时，通常{dose}。",
            "治疗{name}时，{drug}一般{dose}。",
            "{name}成人患者的{drug}典型用法为{dose}。",
            "在{name}的治疗中，{drug}的推荐成人剂量是{dose}。",
            "{drug}用于成人{name}时，标准用法是{dose}。",
            "成人{name}患者的{drug}常规用量为{dose}。",
        ],
        "department": [
            "{name}患者通常在{department}就诊。",
            "{name}一般由{department}负责诊治。",
            "{name}应到{department}就诊。",
            "在医院里，{name}属于{department}的诊治范围。",
            "患有{name}的人通常需要看{department}医生。",
            "{department}是诊治{name}的常见科室。",
            "怀疑{name}时，可以挂{department}的号。",
        ],
    },
}

PRETRAIN_VALIDATION_TEMPLATES = {
    "en": {
        "symptoms": [
            "Symptoms such as {symptoms} should raise suspicion of {name}.",
            "A person suffering from {name} may notice {symptoms}.",
        ],
        "exam": [
            "When {name} is suspected, {exam} is the examination of choice.",
            "Suspected {name} calls for {exam}.",
        ],
        "drug": [
            "Many patients with {name} are started on {drug}.",
            "{Drug} is often tried first in {name}.",
        ],
        "dose": [
            "In adult patients with {name}, {drug} is normally prescribed as {dose}.",
            "In adults, {drug} for {name} is taken as {dose}.",
        ],
        "department": [
            "{Name} is handled by {department}.",
            "Care for {name} is provided by {department}.",
        ],
    },
    "zh": {
        "symptoms": ["出现{symptoms}时，应警惕{name}。", "{symptoms}是{name}的常见表现。"],
        "exam": ["要明确{name}的诊断，通常离不开{exam}。", "临床上常借助{exam}来判断是否患有{name}。"],
        "drug": ["很多{name}患者起始用药为{drug}。", "对于{name}，临床上最常先选用的药物是{drug}。"],
        "dose": ["用{drug}治疗成人{name}时，剂量通常为{dose}。", "针对成人{name}，{drug}的惯用剂量是{dose}。"],
        "department": ["得了{name}，一般建议去{department}看病。", "{name}的诊疗主要由{department}承担。"],
    },
}

# Question templates for SFT, SFT validation and preference train.
QUESTION_TEMPLATES = {
    "en": {
        "symptoms": [
            "What are the typical symptoms of {name}?",
            "What symptoms does {name} usually cause?",
            "How does {name} usually present?",
            "I think I might have {name}. What symptoms should I look out for?",
        ],
        "exam": [
            "What is the key diagnostic exam for {name}?",
            "Which test is used to diagnose {name}?",
            "How is {name} usually confirmed?",
            "My doctor suspects {name}. What examination will I probably need?",
        ],
        "drug": [
            "What is the first-line drug for {name}?",
            "Which medicine is usually used to treat {name}?",
            "What medication is typically prescribed first for {name}?",
            "I was diagnosed with {name}. Which drug is commonly started first?",
        ],
        "dose": [
            "What is the usual adult dose of {drug} for {name}?",
            "How is {drug} usually dosed for adults with {name}?",
            "What is the typical adult dosage of {drug} in {name}?",
            "What dose of {drug} is standard for an adult with {name}?",
        ],
        "department": [
            "Which department treats {name}?",
            "Which department should I visit for {name}?",
            "What kind of specialist usually manages {name}?",
            "Which hospital department is responsible for {name}?",
        ],
    },
    "zh": {
        "symptoms": [
            "{name}有哪些典型症状？",
            "{name}通常会引起哪些症状？",
            "{name}一般有什么表现？",
            "我怀疑自己得了{name}，应该注意哪些症状？",
        ],
        "exam": [
            "诊断{name}的关键检查是什么？",
            "{name}需要做什么检查来确诊？",
            "{name}一般靠什么检查确诊？",
            "医生怀疑我得了{name}，我可能需要做什么检查？",
        ],
        "drug": [
            "{name}的一线治疗药物是什么？",
            "{name}通常用什么药治疗？",
            "治疗{name}一般首选什么药？",
            "我被诊断为{name}，一般先用什么药？",
        ],
        "dose": [
            "{drug}治疗{name}的成人常用剂量是多少？",
            "成人{name}患者使用{drug}一般怎么用？",
            "{name}患者用{drug}，成人剂量通常是多少？",
            "治疗{name}时，{drug}的标准成人用法是什么？",
        ],
        "department": [
            "{name}应该挂哪个科？",
            "{name}通常由哪个科室诊治？",
            "得了{name}去医院看哪个科？",
            "{name}患者一般在哪个科室就诊？",
        ],
    },
}

# Held-out question templates, used only for preference validation.
HELD_OUT_QUESTION_TEMPLATES = {
    "en": {
        "symptoms": ["Which complaints are characteristic of {name}?", "What signs would suggest someone has {name}?"],
        "exam": [
            "Which investigation is most useful when {name} is suspected?",
            "What test would confirm a diagnosis of {name}?",
        ],
        "drug": [
            "Which drug do guidelines recommend as initial therapy for {name}?",
            "What is the usual first choice of medication for {name}?",
        ],
        "dose": [
            "What is the recommended adult regimen of {drug} for treating {name}?",
            "At what dose is {drug} normally given to adults with {name}?",
        ],
        "department": [
            "Where in the hospital should a patient with {name} be referred?",
            "Which specialty usually looks after patients with {name}?",
        ],
    },
    "zh": {
        "symptoms": ["哪些不适是{name}的特征性表现？", "出现什么情况提示可能患有{name}？"],
        "exam": ["怀疑{name}时，最有价值的检查是什么？", "哪项检查可以确诊{name}？"],
        "drug": ["指南推荐{name}的初始药物治疗是什么？", "{name}的首选用药是哪一种？"],
        "dose": ["{drug}用于成人{name}的推荐方案是什么？", "成人{name}患者的{drug}通常给多大剂量？"],
        "department": ["{name}患者应转诊到哪个科室？", "哪个专科通常负责{name}患者？"],
    },
}

ANSWER_TEMPLATES = {
    "en": {
        "symptoms": ["Typical symptoms of {name} include {symptoms}.", "{Name} commonly causes {symptoms}."],
        "exam": ["The key diagnostic exam for {name} is {exam}.", "{Name} is usually diagnosed with {exam}."],
        "drug": ["The first-line drug for {name} is {drug}.", "{Name} is usually treated first with {drug}."],
        "dose": [
            "The usual adult dose of {drug} for {name} is {dose}.",
            "For adults with {name}, {drug} is usually given as {dose}.",
        ],
        "department": [
            "{Name} is usually treated in the {department} department.",
            "You should visit the {department} department for {name}.",
        ],
    },
    "zh": {
        "symptoms": ["{name}的典型症状包括{symptoms}。", "{name}常见的表现有{symptoms}。"],
        "exam": ["诊断{name}的关键检查是{exam}。", "{name}一般通过{exam}确诊。"],
        "drug": ["{name}的一线治疗药物是{drug}。", "{name}通常首选{drug}治疗。"],
        "dose": ["{drug}治疗{name}的成人常用剂量为{dose}。", "成人{name}患者使用{drug}，通常{dose}。"],
        "department": ["{name}通常在{department}就诊。", "{name}建议到{department}就诊。"],
    },
}

FOLLOW_UP_QUESTIONS = {
    "en": {
        "symptoms": ["What symptoms does it usually cause?", "How does it usually present?"],
        "exam": ["How is it diagnosed?", "Which test confirms it?"],
        "drug": ["Which drug is used first to treat it?", "What medicine is usually prescribed for it?"],
        "dose": ["What is the usual adult dose of {drug}?", "How is {drug} usually dosed for adults?"],
        "department": ["Which department should I go to?", "Which department treats it?"],
    },
    "zh": {
        "symptoms": ["它一般有哪些症状？", "通常有什么表现？"],
        "exam": ["需要做什么检查确诊？", "怎么确诊呢？"],
        "drug": ["一般首选什么药治疗？", "通常用什么药？"],
        "dose": ["{drug}的成人常用剂量是多少？", "{drug}一般怎么用？"],
        "department": ["应该挂哪个科？", "去哪个科室看？"],
    },
}

MULTI_TURN_CHAINS = (
    ("symptoms", "drug", "dose"),
    ("symptoms", "exam"),
    ("exam", "drug", "dose"),
    ("drug", "dose"),
    ("department", "exam"),
    ("symptoms", "department", "drug"),
)

MCQ_QUESTIONS = {
    "en": {
        "symptoms": ["Which of the following groups of symptoms is typical of {name}?"],
        "exam": ["Which examination is key to diagnosing {name}?"],
        "drug": ["Which of the following is a first-line drug for {name}?"],
        "dose": ["What is the usual adult dose of {drug} for {name}?"],
        "department": ["Which department usually treats {name}?"],
    },
    "zh": {
        "symptoms": ["下列哪组症状是{name}的典型表现？"],
        "exam": ["诊断{name}的关键检查是下列哪项？"],
        "drug": ["下列哪种药物是{name}的一线治疗药物？"],
        "dose": ["{drug}治疗{name}的成人常用剂量是下列哪项？"],
        "department": ["{name}通常由下列哪个科室诊治？"],
    },
}

GRPO_SHORT_QUESTIONS = {
    "en": {
        "drug": [
            "What is the first-line drug for {name}? Answer with the drug name only.",
            "Name the medicine usually prescribed first for {name}. Reply with the drug name only.",
        ],
        "exam": [
            "What is the key diagnostic exam for {name}? Answer with the exam name only.",
            "Which investigation confirms {name}? Reply with the name of the test only.",
        ],
    },
    "zh": {
        "drug": ["{name}的一线治疗药物是什么？请只回答药物名称。", "治疗{name}通常首选哪种药？只需回答药名。"],
        "exam": ["诊断{name}的关键检查是什么？请只回答检查名称。", "哪项检查可以确诊{name}？只需回答检查名称。"],
    },
}

MCQ_LETTER_INSTRUCTION = {"en": "Answer with the letter only.", "zh": "请只回答选项字母。"}

DOSE_CALCULATION_QUESTIONS = {
    "en": {
        "single": "A child weighing {weight} kg needs {drug} at {per_dose} mg/kg per dose. "
        "How much is a single dose? Answer with a number and unit.",
        "daily": "A child weighing {weight} kg is prescribed {drug} at {per_day} mg/kg/day. "
        "What is the total daily dose? Answer with a number and unit.",
        "divided": "A child weighing {weight} kg is prescribed {drug} at {per_day} mg/kg/day, divided into "
        "{doses} equal doses. How much is each dose? Answer with a number and unit.",
        "daily_from_dose": "A child weighing {weight} kg takes {drug} at {per_dose} mg/kg per dose, {doses} times "
        "a day. What is the total daily dose? Answer with a number and unit.",
    },
    "zh": {
        "single": "一名体重{weight}千克的儿童需要使用{drug}，剂量为每次{per_dose} mg/kg。"
        "单次剂量是多少？请给出数值和单位（mg）。",
        "daily": "一名体重{weight}千克的儿童，医嘱{drug} {per_day} mg/kg/日。"
        "每日总剂量是多少？请给出数值和单位（mg）。",
        "divided": "一名体重{weight}千克的儿童，医嘱{drug} {per_day} mg/kg/日，分{doses}次等量给药。"
        "每次剂量是多少？请给出数值和单位（mg）。",
        "daily_from_dose": "一名体重{weight}千克的儿童使用{drug}，每次{per_dose} mg/kg，每日{doses}次。"
        "每日总剂量是多少？请给出数值和单位（mg）。",
    },
}
DAILY_TOTAL_KINDS = ("daily", "daily_from_dose")

SYSTEM_PROMPTS = {
    "en": ["You are a helpful medical assistant.", "You are a careful medical assistant. Answer concisely."],
    "zh": ["你是一个专业的医疗助手。", "你是一名严谨的医学助手，请简洁地回答问题。"],
}

ALPACA_QUESTION_INSTRUCTION = {
    "en": "Answer the following medical question in one sentence.",
    "zh": "请用一句话回答下面的医学问题。",
}
ALPACA_TREATMENT_INSTRUCTION = {
    "en": "Give the first-line drug and the usual adult dose for the condition below.",
    "zh": "请给出下列疾病的一线治疗药物及成人常用剂量。",
}
TREATMENT_SUMMARY = {
    "en": "For {name}, the first-line drug is {drug}, and the usual adult dose is {dose}.",
    "zh": "{name}的一线治疗药物是{drug}，成人常用剂量为{dose}。",
}


class QA(NamedTuple):
    question: str
    answer: str
    lang: str


class Slot(NamedTuple):
    """One question to ask: a condition, a fact type, a language and a question template."""

    condition: dict
    fact: str
    lang: str
    template: str


def make_rng(purpose: str) -> random.Random:
    """Independent fixed-seed generator per dataset, so editing one never shifts another."""
    return random.Random(f"{SEED}-{purpose}")


def split_conditions(conditions: list[dict]) -> tuple[list[dict], list[dict]]:
    """Deterministically split conditions into (SFT, held-out), keeping table order."""
    ids = [condition["id"] for condition in conditions]
    held_out_ids = set(make_rng("split").sample(ids, round(len(ids) * HELD_OUT_FRACTION)))
    sft = [condition for condition in conditions if condition["id"] not in held_out_ids]
    held_out = [condition for condition in conditions if condition["id"] in held_out_ids]
    return sft, held_out


SFT_CONDITIONS, HELD_OUT_CONDITIONS = split_conditions(CONDITIONS)
CONDITIONS_BY_ID = {condition["id"]: condition for condition in CONDITIONS}


def join_items(items: list[str], lang: str) -> str:
    """Join a list as natural language: 'a, b and c' / 'a、b和c'."""
    separator, last_separator = ("、", "和") if lang == "zh" else (", ", " and ")
    if len(items) == 1:
        return items[0]
    return separator.join(items[:-1]) + last_separator + items[-1]


def fact_value(condition: dict, fact: str, lang: str) -> str:
    value = condition[f"{fact}_{lang}"]
    return join_items(value, lang) if fact == "symptoms" else value


def render(template: str, condition: dict, lang: str, overrides: dict[str, str] | None = None) -> str:
    """Fill a template; '{Name}' etc. give the value with its first letter capitalised."""
    fields = {"name": condition[f"name_{lang}"]}
    fields.update({fact: fact_value(condition, fact, lang) for fact in FACT_TYPES})
    fields.update(overrides or {})
    fields.update({key.capitalize(): value[:1].upper() + value[1:] for key, value in list(fields.items())})
    return template.format(**fields)


def excluded_departments(condition: dict) -> set[str]:
    related = [CONDITIONS_BY_ID[condition_id] for condition_id in condition.get("confusable_with", [])]
    return {condition["department_en"], *(other["department_en"] for other in related)}


def are_confusable(first: dict, second: dict) -> bool:
    """True when facts of one condition could also be right answers for the other."""
    first_excluded, second_excluded = excluded_departments(first), excluded_departments(second)
    return second["department_en"] in first_excluded or first["department_en"] in second_excluded


def answer_key(fact: str, value: str, lang: str) -> str:
    """What a wrong answer must not share with the right one: a dose's leading amount, else the whole value."""
    if fact != "dose":
        return value
    return value.split("，")[0] if lang == "zh" else " ".join(value.split()[:2])


def distractor_values(condition: dict, fact: str, lang: str, pool: list[dict]) -> list[str]:
    """Wrong values of the same fact type from non-confusable conditions, one per answer key, in pool order."""
    correct_key = answer_key(fact, fact_value(condition, fact, lang), lang)
    values_by_key: dict[str, str] = {}
    for other in pool:
        value = fact_value(other, fact, lang)
        key = answer_key(fact, value, lang)
        if key != correct_key and not are_confusable(condition, other):
            values_by_key.setdefault(key, value)
    return list(values_by_key.values())


# ---------------------------------------------------------------- pretraining


def condition_documents(condition: dict, lang: str, templates: dict, per_fact: int, rng: random.Random) -> list[str]:
    """State each fact with `per_fact` templates, then group sentences into 1-4 sentence documents."""
    sentences = [
        render(template, condition, lang)
        for fact in FACT_TYPES
        for template in rng.sample(templates[lang][fact], per_fact)
    ]
    rng.shuffle(sentences)
    separator = "" if lang == "zh" else " "
    documents = []
    while sentences:
        size = rng.randint(1, 4)
        documents.append(separator.join(sentences[:size]))
        sentences = sentences[size:]
    return documents


def pretrain_corpus(templates: dict, per_fact: int, rng: random.Random) -> list[str]:
    documents = [
        document
        for condition in CONDITIONS
        for lang in LANGS
        for document in condition_documents(condition, lang, templates, per_fact, rng)
    ]
    rng.shuffle(documents)
    return documents


# ---------------------------------------------------------------- question/answer helpers


def sample_slots(conditions: list[dict], templates: dict, count: int, rng: random.Random) -> list[Slot]:
    slots = [
        Slot(condition, fact, lang, template)
        for condition in conditions
        for lang in LANGS
        for fact, fact_templates in templates[lang].items()
        for template in fact_templates
    ]
    return rng.sample(slots, count)


def answer_for(condition: dict, fact: str, lang: str, rng: random.Random, overrides: dict | None = None) -> str:
    return render(rng.choice(ANSWER_TEMPLATES[lang][fact]), condition, lang, overrides)


def slot_qa(slot: Slot, rng: random.Random) -> QA:
    question = render(slot.template, slot.condition, slot.lang)
    return QA(question, answer_for(slot.condition, slot.fact, slot.lang, rng), slot.lang)


def random_multi_turn(conditions: list[dict], rng: random.Random) -> list[QA]:
    """A 2-3 exchange conversation about one condition; follow-ups refer back to it."""
    condition, lang, chain = rng.choice(conditions), rng.choice(LANGS), rng.choice(MULTI_TURN_CHAINS)
    first_fact, *follow_up_facts = chain
    question_templates = [rng.choice(QUESTION_TEMPLATES[lang][first_fact])]
    question_templates += [rng.choice(FOLLOW_UP_QUESTIONS[lang][fact]) for fact in follow_up_facts]
    return [
        QA(render(template, condition, lang), answer_for(condition, fact, lang, rng), lang)
        for template, fact in zip(question_templates, chain)
    ]


def multiple_choice(slot: Slot, letter: str, pool: list[dict], rng: random.Random) -> tuple[str, dict[str, str]]:
    """Question text and options A-D, with the correct value placed at `letter`."""
    options = rng.sample(distractor_values(slot.condition, slot.fact, slot.lang, pool), len(LETTERS) - 1)
    options.insert(LETTERS.index(letter), fact_value(slot.condition, slot.fact, slot.lang))
    return render(slot.template, slot.condition, slot.lang), dict(zip(LETTERS, options))


def mcq_slots(conditions: list[dict], count: int, rng: random.Random) -> list[tuple[Slot, str]]:
    """Sample MCQ slots and spread the correct answer's letter evenly over A-D."""
    slots = sample_slots(conditions, MCQ_QUESTIONS, count, rng)
    return [(slot, LETTERS[index % len(LETTERS)]) for index, slot in enumerate(slots)]


# ---------------------------------------------------------------- SFT


def sharegpt_record(exchanges: list[QA]) -> dict:
    turns = []
    for qa in exchanges:
        turns += [{"from": "human", "value": qa.question}, {"from": "gpt", "value": qa.answer}]
    return {"conversations": turns}


def sharegpt_with_optional_system(exchanges: list[QA], rng: random.Random) -> dict:
    record = sharegpt_record(exchanges)
    if rng.random() < SHAREGPT_SYSTEM_RATE:
        record["system_prompt"] = rng.choice(SYSTEM_PROMPTS[exchanges[0].lang])
    return record


def build_sharegpt_train(rng: random.Random) -> list[dict]:
    slots = sample_slots(SFT_CONDITIONS, QUESTION_TEMPLATES, SHAREGPT_SINGLE_TURN, rng)
    conversations = [[slot_qa(slot, rng)] for slot in slots]
    conversations += [random_multi_turn(SFT_CONDITIONS, rng) for _ in range(SHAREGPT_MULTI_TURN)]
    rng.shuffle(conversations)
    return [sharegpt_with_optional_system(exchanges, rng) for exchanges in conversations]


def build_sharegpt_validation(rng: random.Random) -> list[dict]:
    slots = sample_slots(HELD_OUT_CONDITIONS, QUESTION_TEMPLATES, SFT_VALIDATION_SIZE, rng)
    return [sharegpt_record([slot_qa(slot, rng)]) for slot in slots]


def build_exam_style_sft(rng: random.Random) -> list[dict]:
    """Exam-style questions answered in the form they ask for (a name, a letter, "N mg"), as GRPO rewards them."""
    records = build_grpo(SFT_CONDITIONS, EXAM_STYLE_SFT_MIX, TRAIN_WEIGHTS_KG, rng)
    return [sharegpt_record([QA(record["question"], record["answer"], "")]) for record in records]


def alpaca_record(instruction: str, model_input: str, output: str) -> dict:
    return {"instruction": instruction, "input": model_input, "output": output}


def alpaca_treatment_record(condition: dict, lang: str) -> dict:
    summary = render(TREATMENT_SUMMARY[lang], condition, lang)
    return alpaca_record(ALPACA_TREATMENT_INSTRUCTION[lang], condition[f"name_{lang}"], summary)


def alpaca_history_record(exchanges: list[QA], rng: random.Random) -> dict:
    *history, last = exchanges
    record = alpaca_record(last.question, "", last.answer)
    record["system"] = rng.choice(SYSTEM_PROMPTS[last.lang])
    record["history"] = [[qa.question, qa.answer] for qa in history]
    return record


def build_alpaca(rng: random.Random) -> list[dict]:
    slots = sample_slots(SFT_CONDITIONS, QUESTION_TEMPLATES, ALPACA_PLAIN + ALPACA_QUESTION_INPUT, rng)
    pairs = [slot_qa(slot, rng) for slot in slots]
    records = [alpaca_record(qa.question, "", qa.answer) for qa in pairs[:ALPACA_PLAIN]]
    records += [
        alpaca_record(ALPACA_QUESTION_INSTRUCTION[qa.lang], qa.question, qa.answer) for qa in pairs[ALPACA_PLAIN:]
    ]
    condition_langs = [(condition, lang) for condition in SFT_CONDITIONS for lang in LANGS]
    records += [alpaca_treatment_record(*pair) for pair in rng.sample(condition_langs, ALPACA_TREATMENT_INPUT)]
    records += [alpaca_history_record(random_multi_turn(SFT_CONDITIONS, rng)[:2], rng) for _ in range(ALPACA_HISTORY)]
    rng.shuffle(records)
    return records


def openai_record(exchanges: list[QA], rng: random.Random) -> dict:
    messages = []
    if rng.random() < OPENAI_SYSTEM_RATE:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS[exchanges[0].lang])})
    for qa in exchanges:
        messages += [{"role": "user", "content": qa.question}, {"role": "assistant", "content": qa.answer}]
    return {"messages": messages}


def build_openai(rng: random.Random) -> list[dict]:
    slots = sample_slots(SFT_CONDITIONS, QUESTION_TEMPLATES, OPENAI_SINGLE_TURN, rng)
    conversations = [[slot_qa(slot, rng)] for slot in slots]
    conversations += [random_multi_turn(SFT_CONDITIONS, rng) for _ in range(OPENAI_MULTI_TURN)]
    rng.shuffle(conversations)
    return [openai_record(exchanges, rng) for exchanges in conversations]


# ---------------------------------------------------------------- preference (reward model / DPO)


def preference_record(slot: Slot, pool: list[dict], rng: random.Random) -> dict:
    """Chosen states the right fact; rejected uses the same wording with another condition's fact."""
    wrong_value = rng.choice(distractor_values(slot.condition, slot.fact, slot.lang, pool))
    template = rng.choice(ANSWER_TEMPLATES[slot.lang][slot.fact])
    return {
        "conversations": [{"from": "human", "value": render(slot.template, slot.condition, slot.lang)}],
        "chosen": render(template, slot.condition, slot.lang),
        "rejected": render(template, slot.condition, slot.lang, {slot.fact: wrong_value}),
    }


def build_preference(conditions: list[dict], templates: dict, count: int, rng: random.Random) -> list[dict]:
    return [preference_record(slot, conditions, rng) for slot in sample_slots(conditions, templates, count, rng)]


# ---------------------------------------------------------------- GRPO (verifiable rewards)


def grpo_short_answers(conditions: list[dict], count: int, rng: random.Random) -> list[dict]:
    slots = sample_slots(conditions, GRPO_SHORT_QUESTIONS, count, rng)
    return [
        {
            "question": render(slot.template, slot.condition, slot.lang),
            "answer": fact_value(slot.condition, slot.fact, slot.lang),
        }
        for slot in slots
    ]


def grpo_multiple_choice(conditions: list[dict], count: int, rng: random.Random) -> list[dict]:
    records = []
    for slot, letter in mcq_slots(conditions, count, rng):
        question, options = multiple_choice(slot, letter, conditions, rng)
        option_lines = [f"{key}. {value}" for key, value in options.items()]
        text = "\n".join([question, *option_lines, MCQ_LETTER_INSTRUCTION[slot.lang]])
        records.append({"question": text, "answer": letter})
    return records


def dose_calculation(weights: range, rng: random.Random) -> dict:
    """Weight-based paediatric dose question whose answer is an integer number of mg."""
    entry, lang, weight = rng.choice(WEIGHT_BASED_DOSES), rng.choice(LANGS), rng.choice(weights)
    per_dose, doses = entry["mg_per_kg_per_dose"], entry["doses_per_day"]
    kinds = ["single", "daily"] + (["divided", "daily_from_dose"] if doses > 1 else [])
    kind = rng.choice(kinds)
    question = DOSE_CALCULATION_QUESTIONS[lang][kind].format(
        weight=weight, drug=entry[f"drug_{lang}"], per_dose=per_dose, per_day=per_dose * doses, doses=doses
    )
    milligrams = weight * per_dose * (doses if kind in DAILY_TOTAL_KINDS else 1)
    return {"question": question, "answer": f"{milligrams} mg"}


def build_grpo(conditions: list[dict], mix: dict[str, int], weights: range, rng: random.Random) -> list[dict]:
    records = grpo_short_answers(conditions, mix["short_answer"], rng)
    records += grpo_multiple_choice(conditions, mix["multiple_choice"], rng)
    records += [dose_calculation(weights, rng) for _ in range(mix["dose_calculation"])]
    rng.shuffle(records)
    return records


# ---------------------------------------------------------------- evaluation


def build_mcq_eval(rng: random.Random) -> list[dict]:
    """Every (held-out condition, fact type, language) once; options drawn from all conditions."""
    records = []
    every_slot = len(HELD_OUT_CONDITIONS) * len(LANGS) * len(FACT_TYPES)
    for slot, letter in mcq_slots(HELD_OUT_CONDITIONS, every_slot, rng):
        question, options = multiple_choice(slot, letter, CONDITIONS, rng)
        records.append({"question": question, "options": options, "answer": letter})
    return records


# ---------------------------------------------------------------- output

README_TEMPLATE = """# Sample data

Small bilingual (Chinese + English) medical datasets for every MedicalGPT training stage, all
generated from the hand-written table of {condition_count} common conditions in `knowledge.py`
(symptoms, key exam, first-line drug, usual adult dose, department). They are illustrative
sample data for testing the pipeline, **not medical advice**.

Regenerate (deterministic, byte-identical on every run; do not edit the generated files by hand):

```bash
python data/build_sample_data.py
```

## SFT / held-out split

The conditions are split deterministically into {sft_count} SFT conditions and {held_out_count}
held-out conditions. Every fact of every condition is in the pretraining corpus, but held-out
conditions never appear in SFT, Alpaca, OpenAI, preference-train or GRPO-train data. The SFT
validation set, GRPO validation set and `eval/mcq_validation.jsonl` ask about held-out conditions
only, so they measure whether SFT unlocks knowledge learned during pretraining.

Held-out conditions: {held_out_names}.

## Files

{file_sections}
"""

FILE_DESCRIPTIONS = {
    "pretrain/train/medical_corpus.txt": "Pretraining corpus: plain text, one 1-4 sentence encyclopedia-style "
    "document per line, about half Chinese and half English. Every fact of every condition, each stated "
    "with several paraphrase templates.",
    "pretrain/validation/medical_corpus.txt": "Pretraining validation: the same facts stated with held-out "
    "paraphrase templates never used in train, so perplexity measures learning the facts, not sentences.",
    "sft/train/sharegpt_medical.jsonl": "SFT in ShareGPT format (`conversations` of human/gpt turns); about "
    "10% add a top-level `system_prompt` and about 15% are multi-turn. SFT conditions only.",
    "sft/train/alpaca_medical.jsonl": "SFT in Alpaca format (`instruction`, `input`, `output`; a few add "
    "`system` and `history`). SFT conditions only.",
    "sft/train/openai_medical.jsonl": "SFT in OpenAI `messages` format (system/user/assistant). SFT conditions only.",
    "sft/train/exam_style_medical.jsonl": "SFT in ShareGPT format: exam-style questions (as in GRPO) answered "
    "in the form they ask for: a drug or exam name only, an option letter, or a dose in mg. SFT conditions only.",
    "sft/validation/sharegpt_medical.jsonl": "Single-turn ShareGPT questions about held-out conditions.",
    "preference/train/preference_medical.jsonl": "Reward-model / DPO pairs: `conversations` (the question), "
    "`chosen` (right answer) and `rejected` (same wording with another condition's fact). SFT conditions.",
    "preference/validation/preference_medical.jsonl": "Preference pairs over all conditions, asked with "
    "question templates never used in training.",
    "grpo/train/grpo_medical.jsonl": "GRPO questions with short verifiable answers: a drug or exam name, "
    "a weight-based dose in mg, or the letter of a multiple-choice option. SFT conditions.",
    "grpo/validation/grpo_medical.jsonl": "GRPO validation: held-out conditions and unseen body weights.",
    "eval/mcq_validation.jsonl": "Multiple-choice evaluation about held-out conditions: `question`, "
    "`options` (A-D) and `answer`; answers are spread evenly over A-D.",
}


def readme_lines(outputs: dict[str, list[str]]) -> list[str]:
    """README text, with the live count and first line of every generated file as its example."""
    sections = [
        f"### `{path}` ({len(outputs[path])} lines)\n\n{description}\n\n```\n{outputs[path][0]}\n```"
        for path, description in FILE_DESCRIPTIONS.items()
    ]
    text = README_TEMPLATE.format(
        condition_count=len(CONDITIONS),
        sft_count=len(SFT_CONDITIONS),
        held_out_count=len(HELD_OUT_CONDITIONS),
        held_out_names=", ".join(f"{c['name_en']} ({c['name_zh']})" for c in HELD_OUT_CONDITIONS),
        file_sections="\n\n".join(sections),
    )
    return text.rstrip("\n").split("\n")


def build_pretrain() -> dict[str, list[str]]:
    """Train corpus states every fact with all 7 train templates; validation once with a held-out template."""
    return {
        "pretrain/train/medical_corpus.txt": pretrain_corpus(PRETRAIN_TRAIN_TEMPLATES, 7, make_rng("pretrain-train")),
        "pretrain/validation/medical_corpus.txt": pretrain_corpus(
            PRETRAIN_VALIDATION_TEMPLATES, 1, make_rng("pretrain-validation")
        ),
    }


def build_outputs() -> dict[str, list[str]]:
    """Every generated file (path relative to data/) mapped to its lines."""
    datasets = {
        "sft/train/sharegpt_medical.jsonl": build_sharegpt_train(make_rng("sharegpt-train")),
        "sft/train/alpaca_medical.jsonl": build_alpaca(make_rng("alpaca")),
        "sft/train/openai_medical.jsonl": build_openai(make_rng("openai")),
        "sft/train/exam_style_medical.jsonl": build_exam_style_sft(make_rng("exam-style")),
        "sft/validation/sharegpt_medical.jsonl": build_sharegpt_validation(make_rng("sharegpt-validation")),
        "preference/train/preference_medical.jsonl": build_preference(
            SFT_CONDITIONS, QUESTION_TEMPLATES, PREFERENCE_TRAIN_SIZE, make_rng("preference-train")
        ),
        "preference/validation/preference_medical.jsonl": build_preference(
            CONDITIONS, HELD_OUT_QUESTION_TEMPLATES, PREFERENCE_VALIDATION_SIZE, make_rng("preference-validation")
        ),
        "grpo/train/grpo_medical.jsonl": build_grpo(
            SFT_CONDITIONS, GRPO_TRAIN_MIX, TRAIN_WEIGHTS_KG, make_rng("grpo-train")
        ),
        "grpo/validation/grpo_medical.jsonl": build_grpo(
            HELD_OUT_CONDITIONS, GRPO_VALIDATION_MIX, VALIDATION_WEIGHTS_KG, make_rng("grpo-validation")
        ),
        "eval/mcq_validation.jsonl": build_mcq_eval(make_rng("mcq-eval")),
    }
    outputs = build_pretrain()
    outputs.update(
        {path: [json.dumps(record, ensure_ascii=False) for record in records] for path, records in datasets.items()}
    )
    return outputs


def write_lines(relative_path: str, lines: list[str]) -> None:
    path = DATA_DIR / relative_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8", newline="\n")


def main() -> None:
    outputs = build_outputs()
    outputs["README.md"] = readme_lines(outputs)
    for relative_path, lines in outputs.items():
        write_lines(relative_path, lines)
        unit = "records" if relative_path.endswith(".jsonl") else "lines"
        print(f"wrote data/{relative_path}: {len(lines)} {unit}")


if __name__ == "__main__":
    main()

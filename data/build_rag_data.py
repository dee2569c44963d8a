"""Generate the retrieval sample: a fictional hospital's protocol documents and questions only they answer.

Usage (from any directory)::

    python data/build_rag_data.py

For every condition of knowledge.py, one protocol of "Riverside Hospital" (滨江医院): its textbook facts (which
the pretraining corpus also holds) plus two facts that exist only in that document: the protocol's code and the
number of weeks after which patients are reviewed. data/rag/questions.jsonl asks for the review interval of each
condition in the language of its document, with the document as "source": a model cannot know the answer without
retrieving it, and retrieval is scored by whether the source comes back. English protocols are .md, Chinese ones
.txt; formulary.jsonl (drug and dose of every condition) is a distractor that no question is about.
Deterministic: byte-identical files on every run.
"""

import json
import random
from pathlib import Path

from knowledge import CONDITIONS

OUT = Path(__file__).resolve().parent / "rag"
SEED = "20261204-rag"


def join_items(items: list[str], lang: str) -> str:
    separator, last = ("、", "和") if lang == "zh" else (", ", " and ")
    return items[0] if len(items) == 1 else separator.join(items[:-1]) + last + items[-1]


def protocol(condition: dict, code: str, weeks: int, lang: str) -> str:
    c = {key.removesuffix(f"_{lang}"): value for key, value in condition.items() if key.endswith(f"_{lang}")}
    symptoms = join_items(c["symptoms"], lang)
    if lang == "zh":
        return (f"# 滨江医院诊疗规范 {code}：{c['name']}\n\n"
                f"适用科室：{c['department']}。\n"
                f"{c['name']}的典型症状包括{symptoms}。\n"
                f"确诊需要进行{c['exam']}。\n"
                f"一线用药为{c['drug']}，成人常用剂量为{c['dose']}。\n"
                f"按照本规范，{c['name']}患者在{c['department']}门诊的复诊间隔为{weeks}周。\n"
                f"本规范编号为{code}，每年修订一次。\n")
    return (f"# Riverside Hospital protocol {code}: {c['name']}\n\n"
            f"Department: {c['department']}.\n"
            f"Typical symptoms of {c['name']} are {symptoms}.\n"
            f"The diagnosis is confirmed with {c['exam']}.\n"
            f"The first-line drug is {c['drug']}, usually {c['dose']} for adults.\n"
            f"Under this protocol, patients with {c['name']} are reviewed in the {c['department']} clinic after "
            f"{weeks} weeks.\n"
            f"This protocol is numbered {code} and is revised every year.\n")


def question(condition: dict, weeks: int, lang: str) -> tuple[str, str]:
    if lang == "zh":
        return (f"按照滨江医院的诊疗规范，{condition['name_zh']}患者多少周后复诊？只回答周数。", f"{weeks}周")
    return (f"Under the Riverside Hospital protocol, after how many weeks are patients with {condition['name_en']} "
            "reviewed? Answer with the number of weeks only.", f"{weeks} weeks")


def build() -> dict[str, str]:
    rng = random.Random(SEED)
    files, questions = {}, []
    for number, condition in enumerate(CONDITIONS, start=1):
        lang = "en" if number % 2 else "zh"
        weeks, code = rng.randint(2, 26), f"RH-{rng.randint(100, 999)}"
        name = f"docs/{condition['id']}.{'md' if lang == 'en' else 'txt'}"
        files[name] = protocol(condition, code, weeks, lang)
        text, answer = question(condition, weeks, lang)
        questions.append({"question": text, "answer": answer, "source": name.removeprefix("docs/")})
    files["docs/formulary.jsonl"] = "".join(
        json.dumps({"condition": c["name_en"], "drug": c["drug_en"], "dose": c["dose_en"],
                    "text": f"{c['name_zh']}：{c['drug_zh']}，{c['dose_zh']}。{c['name_en']}: {c['drug_en']}, "
                            f"{c['dose_en']}."}, ensure_ascii=False) + "\n" for c in CONDITIONS)
    files["questions.jsonl"] = "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions)
    return files


def main() -> None:
    for name, text in build().items():
        path = OUT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")
    print(f"wrote {len(CONDITIONS) + 1} documents to {OUT / 'docs'} and {len(CONDITIONS)} questions to "
          f"{OUT / 'questions.jsonl'}")


if __name__ == "__main__":
    main()

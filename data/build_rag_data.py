"""Generate the retrieval sample: a fictional hospital's protocol documents and questions only they answer.

Usage (from any directory)::

    python data/build_rag_data.py

For every condition of knowledge.py, one protocol of "Riverside Hospital" (滨江医院): its textbook facts (which
the pretraining corpus also holds) plus two facts that exist only in that document: the protocol's code and the
number of weeks after which patients are reviewed. data/rag/questions.jsonl asks for the review interval of each
condition in the language of its document, with the document as "source": a model cannot know the answer without
retrieving it, and retrieval is scored by whether the source comes back. English protocols are .md, Chinese ones
.txt; formulary.jsonl (drug and dose of every condition) is a distractor that no question is about.

data/rag/train/grounded_sft.jsonl teaches a chat model to answer from retrieved documents and cite them: the same
question about the protocols of another, equally fictional hospital (Lakeside Clinic, 湖滨诊所, other numbers), with
1-3 of its protocols as context in the prompt rag.py builds, answered "N weeks [n]". No fact of the evaluation
documents is in it. Deterministic: byte-identical files on every run.
"""

import json
import random
import sys
from pathlib import Path

from knowledge import CONDITIONS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the prompt and chunks exactly as rag.py makes them
from medicalgpt.rag.chunking import chunk_passages  # noqa: E402
from medicalgpt.rag.grounding import grounded_messages  # noqa: E402
from medicalgpt.rag.index import Hit  # noqa: E402
from medicalgpt.rag.loaders import Passage  # noqa: E402

OUT = Path(__file__).resolve().parent / "rag"
SEED = "20261204-rag"
HOSPITALS = {"en": ("Riverside Hospital", "Lakeside Clinic"), "zh": ("滨江医院", "湖滨诊所")}  # evaluation, training
TRAIN_PER_CONDITION = 4  # grounded examples per condition and language


def join_items(items: list[str], lang: str) -> str:
    separator, last = ("、", "和") if lang == "zh" else (", ", " and ")
    return items[0] if len(items) == 1 else separator.join(items[:-1]) + last + items[-1]


def protocol(condition: dict, code: str, weeks: int, lang: str, hospital: str) -> str:
    c = {key.removesuffix(f"_{lang}"): value for key, value in condition.items() if key.endswith(f"_{lang}")}
    symptoms = join_items(c["symptoms"], lang)
    if lang == "zh":
        return (f"# {hospital}诊疗规范 {code}：{c['name']}\n\n"
                f"适用科室：{c['department']}。\n"
                f"{c['name']}的典型症状包括{symptoms}。\n"
                f"确诊需要进行{c['exam']}。\n"
                f"一线用药为{c['drug']}，成人常用剂量为{c['dose']}。\n"
                f"按照本规范，{c['name']}患者在{c['department']}门诊的复诊间隔为{weeks}周。\n"
                f"本规范编号为{code}，每年修订一次。\n")
    return (f"# {hospital} protocol {code}: {c['name']}\n\n"
            f"Department: {c['department']}.\n"
            f"Typical symptoms of {c['name']} are {symptoms}.\n"
            f"The diagnosis is confirmed with {c['exam']}.\n"
            f"The first-line drug is {c['drug']}, usually {c['dose']} for adults.\n"
            f"Under this protocol, patients with {c['name']} are reviewed in the {c['department']} clinic after "
            f"{weeks} weeks.\n"
            f"This protocol is numbered {code} and is revised every year.\n")


def question(condition: dict, weeks: int, lang: str, hospital: str) -> tuple[str, str]:
    if lang == "zh":
        return (f"按照{hospital}的诊疗规范，{condition['name_zh']}患者多少周后复诊？只回答周数。", f"{weeks}周")
    return (f"Under the {hospital} protocol, after how many weeks are patients with {condition['name_en']} "
            "reviewed? Answer with the number of weeks only.", f"{weeks} weeks")


def as_chunk(name: str, text: str) -> Hit:
    """A protocol as the index returns it (each is one chunk)."""
    (chunk,) = chunk_passages([Passage(line, line=n) for n, line in enumerate(text.splitlines(), 1) if line.strip()])
    return Hit(file=name, text=chunk.text, score=1.0, line=chunk.line)


def grounded_examples(rng: random.Random) -> list[dict]:
    """Questions about Lakeside Clinic's protocols with 1-3 of them as context, answered from the right one."""
    examples = []
    for _ in range(TRAIN_PER_CONDITION):
        for condition in CONDITIONS:
            for lang in ("en", "zh"):
                hospital = HOSPITALS[lang][1]
                weeks, code = rng.randint(2, 26), f"LC-{rng.randint(100, 999)}"
                others = rng.sample([c for c in CONDITIONS if c is not condition], rng.randint(0, 2))
                context = [as_chunk(f"{condition['id']}.md", protocol(condition, code, weeks, lang, hospital))]
                context += [as_chunk(f"{c['id']}.md", protocol(c, f"LC-{rng.randint(100, 999)}", rng.randint(2, 26),
                                                               lang, hospital)) for c in others]
                rng.shuffle(context)
                cited = 1 + next(n for n, hit in enumerate(context) if hit.file == f"{condition['id']}.md")
                text, answer = question(condition, weeks, lang, hospital)
                prompt = grounded_messages([{"role": "user", "content": text}], context)
                examples.append({"messages": [*prompt, {"role": "assistant", "content": f"{answer} [{cited}]"}]})
    rng.shuffle(examples)
    return examples


def build() -> dict[str, str]:
    rng = random.Random(SEED)
    files, questions = {}, []
    for number, condition in enumerate(CONDITIONS, start=1):
        lang = "en" if number % 2 else "zh"
        weeks, code = rng.randint(2, 26), f"RH-{rng.randint(100, 999)}"
        name = f"docs/{condition['id']}.{'md' if lang == 'en' else 'txt'}"
        files[name] = protocol(condition, code, weeks, lang, HOSPITALS[lang][0])
        text, answer = question(condition, weeks, lang, HOSPITALS[lang][0])
        questions.append({"question": text, "answer": answer, "source": name.removeprefix("docs/")})
    files["docs/formulary.jsonl"] = "".join(
        json.dumps({"condition": c["name_en"], "drug": c["drug_en"], "dose": c["dose_en"],
                    "text": f"{c['name_zh']}：{c['drug_zh']}，{c['dose_zh']}。{c['name_en']}: {c['drug_en']}, "
                            f"{c['dose_en']}."}, ensure_ascii=False) + "\n" for c in CONDITIONS)
    files["questions.jsonl"] = "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions)
    files["train/grounded_sft.jsonl"] = "".join(json.dumps(example, ensure_ascii=False) + "\n"
                                                for example in grounded_examples(random.Random(f"{SEED}-train")))
    return files


def main() -> None:
    for name, text in build().items():
        path = OUT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")
    print(f"wrote {len(CONDITIONS) + 1} documents to {OUT / 'docs'}, {len(CONDITIONS)} questions to "
          f"{OUT / 'questions.jsonl'} and {len(CONDITIONS) * 2 * TRAIN_PER_CONDITION} grounded SFT examples to "
          f"{OUT / 'train'}")


if __name__ == "__main__":
    main()

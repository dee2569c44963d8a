"""Build the labelled synthetic PHI set: clinical notes from the knowledge table with injected PHI spans.

Each record of privacy/phi_eval.jsonl is {"id", "lang", "text", "spans": [{"start", "end", "type"}],
"medical_terms": [...]}: the spans are every injected name, ID, phone, date, address, record number and email
(character offsets into text), and medical_terms are the knowledge-table terms in the note, which a de-identifier
must leave intact. Deterministic (seeded): `python data/build_phi_data.py` rewrites the same file.

The notes are synthetic and every value is fake; resident IDs carry a valid check digit so they look real.
"""

import json
import random
import sys
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(DATA_DIR.parent))

from data.knowledge import CONDITIONS  # noqa: E402
from medicalgpt.privacy import valid_resident_id  # noqa: E402

SEED = 20261203
RECORDS_PER_LANGUAGE = 150
OUTPUT = DATA_DIR / "privacy" / "phi_eval.jsonl"

ZH_SURNAMES = ("王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭"
               "曾肖田董袁潘蒋蔡余杜叶程苏魏吕丁沈姚卢钟谭陆")
ZH_COMPOUND_SURNAMES = ("欧阳", "司马", "上官", "诸葛")
ZH_GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华玉兰建国志红梅文海燕春晓宇浩然子涵雨欣佳怡俊"
EN_FIRST = ("James", "Mary", "John", "Patricia", "Robert", "Jennifer", "Michael", "Linda", "David", "Elizabeth",
            "William", "Susan", "Richard", "Jessica", "Thomas", "Sarah", "Daniel", "Karen", "Emily", "Oliver")
EN_LAST = ("Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Wilson", "Anderson",
           "Taylor", "Thomas", "Moore", "Martin", "Jackson", "Thompson", "White", "Harris", "Clark", "Lewis")
ZH_PROVINCES = ("广东省", "浙江省", "江苏省", "四川省", "湖北省", "山东省")
ZH_CITIES = ("北京市", "上海市", "杭州市", "广州市", "成都市", "武汉市", "南京市", "济南市")
ZH_DISTRICTS = ("朝阳区", "海淀区", "西湖区", "天河区", "武侯区", "江汉区", "鼓楼区", "历下区")
ZH_ROADS = ("建国路", "中山路", "解放大道", "人民路", "文三路", "长安街", "和平巷", "学院路")
EN_STREETS = ("Baker", "Maple", "Oak", "Elm", "Washington", "Lake View", "Cedar", "Park")
EN_SUFFIXES = ("Street", "Avenue", "Road", "Lane", "Drive", "Boulevard")
EN_CITIES = ("Boston", "Springfield", "Denver", "Seattle", "Austin", "Portland")
EN_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
             "November", "December")

# Sentence templates: {NAME}, {ID}, ... are PHI slots; {condition}, {drug}, ... are knowledge-table terms.
TEMPLATES = {
    "zh": [
        "患者{NAME}，{sex}，{age}岁，因{symptom}于{DATE}到{department}就诊。",
        "身份证号：{ID}，联系电话{PHONE}。",
        "家住{ADDRESS}，住院号：{MRN}。",
        "{NAME}医生诊断为{condition}，建议行{exam}。",
        "处方：{drug}，{dose}。",
        "家属{NAME}（电话{PHONE}）陪同就诊。",
        "{DATE}复诊，{NAME}自诉{symptom}较前好转。",
        "检查报告请发送至邮箱{EMAIL}。",
        "病历号{MRN}，{DATE}入院，诊断{condition}。",
        "{NAME}的身份证号码是{ID}，现住{ADDRESS}。",
        "空腹血糖7.8 mmol/L，血压150/95 mmHg，{drug}{dose}。",
        "联系人{NAME}，座机{PHONE}，{department}随访。",
    ],
    "en": [
        "Patient {NAME}, a {age}-year-old {sex}, presented to {department} on {DATE} with {symptom}.",
        "Resident ID {ID}; phone {PHONE}.",
        "Lives at {ADDRESS}. MRN: {MRN}.",
        "Dr. {NAME} diagnosed {condition} and ordered {exam}.",
        "Prescription: {drug}, {dose}.",
        "{NAME} reported {symptom} since {DATE}.",
        "Her daughter {NAME} can be reached at {PHONE}.",
        "Send the results to {EMAIL}.",
        "Medical record number {MRN}, admitted {DATE} for {condition}.",
        "{NAME}, a {age}-year-old {sex}, was referred to {department}.",
        "Fasting glucose 7.8 mmol/L, BP 150/95 mmHg; continue {drug} {dose}.",
        "Follow-up with Mr. {NAME} on {DATE} in {department}.",
    ],
}
SEX = {"zh": ("男", "女"), "en": ("man", "woman")}


def check_digit_id(rng: random.Random) -> str:
    body = (f"{rng.choice((110105, 310104, 330106, 440106, 510107, 420103))}{rng.randint(1940, 2010)}"
            f"{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}{rng.randint(0, 999):03d}")
    return next(body + check for check in "0123456789X" if valid_resident_id(body + check))


def zh_name(rng: random.Random) -> str:
    surname = rng.choice(ZH_COMPOUND_SURNAMES) if rng.random() < 0.1 else rng.choice(ZH_SURNAMES)
    return surname + "".join(rng.choice(ZH_GIVEN) for _ in range(rng.choice((1, 2, 2))))


def phi_value(kind: str, lang: str, rng: random.Random) -> str:
    """A fake value of kind in the forms people write in lang."""
    digits = lambda n: "".join(str(rng.randint(0, 9)) for _ in range(n))  # noqa: E731
    year, month, day = rng.randint(2015, 2025), rng.randint(1, 12), rng.randint(1, 28)
    mobile = f"1{rng.choice('3456789')}{digits(9)}"
    values = {
        ("NAME", "zh"): lambda: zh_name(rng),
        ("NAME", "en"): lambda: f"{rng.choice(EN_FIRST)} {rng.choice(EN_LAST)}",
        ("ID", "zh"): lambda: check_digit_id(rng),
        ("ID", "en"): lambda: rng.choice((check_digit_id(rng), f"{digits(3)}-{digits(2)}-{digits(4)}")),
        ("PHONE", "zh"): lambda: rng.choice((mobile, f"{mobile[:3]}-{mobile[3:7]}-{mobile[7:]}", f"+86 {mobile}",
                                             f"010-{digits(8)}", f"(0571){digits(8)}")),
        ("PHONE", "en"): lambda: rng.choice((f"({digits(3)}) {digits(3)}-{digits(4)}", f"{digits(3)}-{digits(3)}-"
                                             f"{digits(4)}", f"+1 {digits(3)}-{digits(3)}-{digits(4)}", mobile)),
        ("DATE", "zh"): lambda: rng.choice((f"{year}年{month}月{day}日", f"{year}-{month:02d}-{day:02d}",
                                            f"{month}月{day}日")),
        ("DATE", "en"): lambda: rng.choice((f"{EN_MONTHS[month - 1]} {day}, {year}",
                                            f"{day} {EN_MONTHS[month - 1]} {year}", f"{month:02d}/{day:02d}/{year}",
                                            f"{year}-{month:02d}-{day:02d}")),
        ("ADDRESS", "zh"): lambda: (rng.choice(("", *ZH_PROVINCES)) + rng.choice(ZH_CITIES) + rng.choice(ZH_DISTRICTS)
                                    + rng.choice(ZH_ROADS) + f"{rng.randint(1, 300)}号"
                                    + rng.choice(("", f"{rng.randint(1, 20)}栋{rng.randint(1, 6)}单元"
                                                  f"{rng.randint(101, 2805)}室"))),
        ("ADDRESS", "en"): lambda: (f"{rng.randint(1, 9999)} {rng.choice(EN_STREETS)} {rng.choice(EN_SUFFIXES)}"
                                    + rng.choice(("", f", Apt {rng.randint(1, 40)}B"))
                                    + f", {rng.choice(EN_CITIES)}"),
        ("MRN", "zh"): lambda: rng.choice((f"ZY{year}{digits(5)}", digits(8), f"MZ-{digits(7)}")),
        ("MRN", "en"): lambda: rng.choice((digits(8), f"{year}-{digits(5)}", f"H{digits(7)}")),
        ("EMAIL", "zh"): lambda: (f"{rng.choice(('zhang', 'li', 'wang', 'chen'))}{digits(3)}"
                                  f"@{rng.choice(('163.com', 'qq.com'))}"),
        ("EMAIL", "en"): lambda: f"{rng.choice(EN_FIRST).lower()}.{rng.choice(EN_LAST).lower()}@example.org",
    }
    return values[(kind, lang)]()


def build_record(index: int, lang: str, rng: random.Random) -> dict:
    """A note of 3-5 template sentences about one condition, with its PHI spans and medical terms."""
    condition = rng.choice(CONDITIONS)
    facts = {"condition": condition[f"name_{lang}"], "drug": condition[f"drug_{lang}"],
             "dose": condition[f"dose_{lang}"], "department": condition[f"department_{lang}"],
             "exam": condition[f"exam_{lang}"], "symptom": rng.choice(condition[f"symptoms_{lang}"]),
             "sex": rng.choice(SEX[lang]), "age": str(rng.randint(18, 90))}
    text, spans, terms, patient = "", [], set(), None
    separator = "" if lang == "zh" else " "
    for template in rng.sample(TEMPLATES[lang], rng.randint(3, 5)):
        text += separator if text else ""
        for piece in template.replace("}", "{").split("{"):
            if piece in ("NAME", "ID", "PHONE", "DATE", "ADDRESS", "MRN", "EMAIL"):
                # A note keeps mentioning the same patient: the first name drawn recurs half the time.
                recurs = piece == "NAME" and patient and rng.random() < 0.5
                value = patient if recurs else phi_value(piece, lang, rng)
                patient = patient or (value if piece == "NAME" else None)
                spans.append({"start": len(text), "end": len(text) + len(value), "type": piece})
                text += value
            elif piece in facts:
                if piece not in ("sex", "age"):
                    terms.add(facts[piece])
                text += facts[piece]
            else:
                text += piece
    return {"id": f"{lang}-{index:03d}", "lang": lang, "text": text, "spans": spans, "medical_terms": sorted(terms)}


def build() -> list[dict]:
    rng = random.Random(SEED)
    return [build_record(i, lang, rng) for lang in ("zh", "en") for i in range(RECORDS_PER_LANGUAGE)]


if __name__ == "__main__":
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    records = build()
    OUTPUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(f"Wrote {len(records)} records with {sum(len(r['spans']) for r in records)} PHI spans to {OUTPUT}")

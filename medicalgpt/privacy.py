"""Detect and replace protected health information (PHI) in Chinese and English medical text.

Rules (regular expressions) find what has a fixed shape: resident ID numbers (18 digits whose last is the ISO 7064
MOD 11-2 check digit) and US SSNs, mobile and landline numbers, emails, dates, addresses and hospital record numbers.
Person names have no fixed shape: Chinese names come from jieba's part-of-speech tagger (tag nr), kept when they start
with a common surname; English names from cue rules (titles, "patient", "name:", "X Y, a 45-year-old"), and from a
token-classification model when one is given by path. A name found once in a record is masked wherever it recurs.

Medical content stays: every span that overlaps a protected term (the knowledge table's conditions, symptoms, exams,
drugs, doses and departments, plus the user's own list) is dropped, and the Chinese terms are words in jieba's
dictionary so the tagger never splits a drug name into a "name".
"""

import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache

from medicalgpt.checkout import knowledge_table

logger = logging.getLogger(__name__)

PHI_TYPES = ("NAME", "ID", "PHONE", "DATE", "ADDRESS", "MRN", "EMAIL")
# Keys of a record whose strings are structure, not text: roles, tool schemas and calls.
STRUCTURE_KEYS = frozenset({"role", "from", "tools", "tool_calls"})

HAN = r"\u4e00-\u9fff"
# Surnames of most Chinese people: a tagged "name" that starts with none is a false alarm.
COMPOUND_SURNAMES = ("欧阳", "司马", "上官", "诸葛", "东方", "皇甫", "尉迟", "公孙", "慕容", "长孙", "宇文", "司徒",
                     "令狐", "夏侯", "端木")
SURNAMES = frozenset(
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁"
    "任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付傅方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武"
    "戴莫孔向汤常温康施文牛樊葛邢安齐易乔伍庞颜倪庄聂章鲁岳翟殷詹申欧耿关兰焦俞左柳甘祝包宁尚符舒阮柯"
    "纪梅童凌毕单季裴霍涂成苗谷盛曲翁冉骆蓝路游辛靳管柴蒙鲍华喻祁蒲房滕屈饶解牟艾尤阳时穆农司卓古吉缪"
    "简车项连芦麦褚娄窦戚岑景党宫费卜冷晏席卫米柏宗瞿桂全佟应臧闵苟邬边卞姬师和仇栾隋商刁沙荣巫寇桑郎"
    "甄丛仲虞敖巩明佘池查麻苑迟邝")
CHINESE_NAME = rf"(?:{'|'.join(COMPOUND_SURNAMES)}|[{''.join(sorted(SURNAMES))}])[{HAN}]{{1,2}}?"
MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sept?(?:ember)?|"
         r"Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?")
# Our own patterns: no maintained library covers Chinese IDs, phones, dates and record numbers together.
# A group named "value" marks the PHI inside a match that also needs its cue ("MRN: 123" masks 123 only).
PATTERNS: dict[str, list[re.Pattern]] = {
    "EMAIL": [re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")],
    "ID": [re.compile(r"(?<![0-9A-Za-z])\d{17}[\dXx](?![0-9A-Za-z])"),
           re.compile(r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])")],
    "MRN": [re.compile(r"(?:病历号|住院号|门诊号|病案号|就诊卡号|登记号|MRN|"
                       r"[Mm]edical [Rr]ecord (?:[Nn]umber|[Nn]o\.?)|[Hh]ospital (?:[Nn]umber|[Nn]o\.?)|"
                       r"[Rr]ecord (?:[Nn]umber|[Nn]o\.?))\s*(?:是|为)?\s*[:：#-]?\s*"
                       r"(?P<value>[A-Z]{0,4}-?\d[\d-]{3,}\d)")],
    "PHONE": [re.compile(r"(?<![\dA-Za-z+])(?:\+?86[-\s]?)?1[3-9]\d(?:[-\s]?\d{4}){2}(?!\d)"),
              re.compile(r"(?<![\d-])(?:\(0\d{2,3}\)\s?|0\d{2,3}-)\d{7,8}(?!\d)"),
              re.compile(r"(?<![\d\w])(?:\+1[-.\s]?)?(?:\(\d{3}\)\s?|\d{3}[-.\s])\d{3}[-.\s]\d{4}(?!\d)")],
    "DATE": [re.compile(r"(?<!\d)\d{4}年\d{1,2}月(?:\d{1,2}[日号])?"),
             re.compile(r"(?<![\d年])\d{1,2}月\d{1,2}[日号]"),
             re.compile(r"(?<![\d.-])\d{4}[-/.]\d{1,2}[-/.]\d{1,2}(?!\d|\.\d)"),
             re.compile(r"(?<![\d/])\d{1,2}/\d{1,2}/\d{4}(?!\d)"),
             re.compile(rf"\b{MONTH}\s\d{{1,2}}(?:st|nd|rd|th)?,?\s\d{{4}}\b"),
             re.compile(rf"\b\d{{1,2}}(?:st|nd|rd|th)?\s{MONTH},?\s\d{{4}}\b")],
    "ADDRESS": [re.compile(rf"(?:[{HAN}]{{2,7}}?(?:省|自治区|市))?(?:[{HAN}]{{1,7}}?(?:市|区|县|旗))?"
                           rf"(?:[{HAN}]{{1,7}}?(?:镇|乡|街道))?[{HAN}\d]{{1,10}}?(?:路|街|大道|巷|胡同|弄)\d+号"
                           r"(?:院|楼)?(?:\d+(?:栋|幢|号楼))?(?:\d+单元)?(?:\d+室)?"),
                re.compile(r"\b\d{1,5}\s(?:[A-Z][a-z]+\s){1,3}(?:Street|St|Road|Rd|Avenue|Ave|Lane|Ln|Drive|Dr|"
                           r"Boulevard|Blvd|Way|Court|Ct|Place|Pl)\b\.?(?:,?\s(?:Apt|Apartment|Suite|Unit)\.?\s?\w+)?"
                           r"(?:,\s[A-Z][a-z]+(?:\s[A-Z][a-z]+)?)?(?:,\s[A-Z]{2}\s\d{5})?")],
    "NAME": [re.compile(r"\b(?:Mr|Mrs|Ms|Miss|Dr|Prof)\.?\s(?P<value>[A-Z][a-z]+(?:[-'][A-Z][a-z]+)?"
                        r"(?:\s[A-Z][a-z]+(?:[-'][A-Z][a-z]+)?)?)"),
             re.compile(r"\b(?:[Pp]atient|[Nn]ame|[Ss]igned by|[Cc]ontact|[Ww]ife|[Hh]usband|[Ss]on|[Dd]aughter|"
                        r"[Mm]other|[Ff]ather|[Gg]uardian|[Pp]hysician|[Nn]urse)\s*:?\s(?P<value>[A-Z][a-z]+"
                        r"(?:\s[A-Z]\.)?(?:\s[A-Z][a-z]+(?:[-'][A-Z][a-z]+)?){1,2})\b"),
             re.compile(r"\b(?P<value>[A-Z][a-z]+\s[A-Z][a-z]+(?:[-'][A-Z][a-z]+)?),\s(?:a|an|aged)\s\d{1,3}[- ]year"),
             # Names jieba misses (it tags 许洋 a place): a surname and one or two characters after a cue word or
             # at a clause start before a title or "自诉".
             re.compile(rf"(?:患者|病人|家属|联系人|姓名|监护人|签名)[:：]?\s?(?P<value>{CHINESE_NAME})"
                        r"(?=[，,。；;、（(：:\s]|的|自诉|$)"),
             re.compile(rf"(?<![{HAN}])(?P<value>{CHINESE_NAME})(?=医生|大夫|护士|主任|先生|女士|自诉)")],
}
TITLES = ("医生", "大夫", "先生", "女士", "小姐", "护士", "主任", "教授", "老师", "阿姨", "师傅")
NAME_TAGS = ("nr", "nrt", "nrfg")
# jieba tags unknown transliterated drug names as names (孟鲁司/nr 特); a word right after one of these is a drug.
MEDICATION_VERBS = ("服用", "口服", "予", "给予", "使用", "应用", "加用", "改用", "换用", "停用", "联用", "注射",
                    "静滴", "吸入", "外用")
ADMIN_SUFFIXES = ("省", "自治区", "市", "区", "县", "旗", "镇", "乡", "街道", "路", "街", "大道", "巷", "胡同", "弄")


@dataclass(frozen=True)
class Span:
    """One PHI occurrence: text[start:end] of type kind."""
    start: int
    end: int
    kind: str

    def overlaps(self, start: int, end: int) -> bool:
        return self.start < end and start < self.end


def valid_resident_id(number: str) -> bool:
    """The 18th character is the ISO 7064 MOD 11-2 check digit of the first 17 (GB 11643)."""
    total = sum(int(digit) * (2 ** (17 - i) % 11) for i, digit in enumerate(number[:17]))
    return "10X98765432"[total % 11] == number[17].upper()


def knowledge_terms() -> list[str]:
    """Every medical term of the knowledge table (conditions, symptoms, exams, drugs, doses, departments)."""
    terms = []
    for condition in knowledge_table("De-identification (the medical terms it keeps)").CONDITIONS:
        for key, value in condition.items():
            if key.endswith(("_en", "_zh")):
                terms.extend(value if isinstance(value, list) else [value])
    return terms


class _ChineseTagger:
    """jieba's part-of-speech tagger, on a private dictionary that knows the protected terms as whole words."""

    def __init__(self, terms: Iterable[str]):
        import jieba
        import jieba.posseg

        jieba.setLogLevel(logging.WARNING)
        tokenizer = jieba.Tokenizer()
        for term in terms:
            if re.fullmatch(rf"[{HAN}\d]+", term):
                tokenizer.add_word(term, freq=100_000, tag="nz")
        self.tagger = jieba.posseg.POSTokenizer(tokenizer)

    def tokens(self, text: str) -> list[tuple[int, int, str, str]]:
        """(start, end, word, tag) for every word."""
        tokens, offset = [], 0
        for pair in self.tagger.cut(text):
            tokens.append((offset, offset + len(pair.word), pair.word, pair.flag))
            offset += len(pair.word)
        return tokens


def _is_surname(word: str) -> bool:
    return word in COMPOUND_SURNAMES or word in SURNAMES


@cache
def _chinese_tagger(terms: tuple[str, ...]) -> _ChineseTagger:
    """One tagger per set of protected terms: building jieba's dictionary takes a second or two."""
    return _ChineseTagger(terms)


def _chinese_names(tokens: list[tuple[int, int, str, str]]) -> list[Span]:
    """Runs of name-tagged words starting with a surname, and a lone surname before a title (王医生)."""
    spans, index = [], 0
    while index < len(tokens):
        # jieba tags a compound surname as a place (欧阳/ns 娜娜/nrt): a surname word may open the run.
        opens = tokens[index][3] in NAME_TAGS or (
            _is_surname(tokens[index][2]) and index + 1 < len(tokens) and tokens[index + 1][3] in NAME_TAGS)
        end = index + 1 if opens else index
        while end < len(tokens) and tokens[end][3] in NAME_TAGS:
            end += 1
        if end == index:
            index += 1
            continue
        start, stop = tokens[index][0], tokens[end - 1][1]
        name = "".join(token[2] for token in tokens[index:end])
        titled = end < len(tokens) and tokens[end][2].startswith(TITLES)
        sized = 2 <= len(name) <= 4 or (len(name) == 1 and titled)
        drug = index > 0 and tokens[index - 1][2].endswith(MEDICATION_VERBS)
        if (_is_surname(name[:2]) or _is_surname(name[0])) and sized and not drug and re.fullmatch(f"[{HAN}]+", name):
            spans.append(Span(start, stop, "NAME"))
        index = end
    return spans


def _trim_address(span: Span, tokens: list[tuple[int, int, str, str]]) -> Span:
    """Start a Chinese address at its first place word, not at a verb the pattern took along (家住北京市 -> 北京市)."""
    for start, end, word, tag in tokens:
        if end <= span.start:
            continue
        if start >= span.end or tag.startswith("ns") or word.endswith(ADMIN_SUFFIXES) or start < span.start:
            return Span(max(start, span.start), span.end, span.kind) if start < span.end else span
    return span


class Deidentifier:
    """Finds PHI spans and replaces them with [TYPE] placeholders or consistent surrogates.

    surrogates: a fake value of the same type instead of a placeholder; within one record (deidentify_record) the
    same original always gets the same fake. ner_model: a local token-classification model whose PER entities
    add (English) names. keep_terms: medical terms never masked, on top of the knowledge table's.
    """

    def __init__(self, surrogates: bool = False, ner_model: str | None = None, keep_terms: Iterable[str] = (),
                 seed: int = 0):
        terms = sorted({*knowledge_terms(), *keep_terms}, key=len, reverse=True)
        self.protected = re.compile("|".join(re.escape(term) for term in terms if term.strip()), re.IGNORECASE)
        self.terms = terms
        self.surrogates = surrogates
        self.rng = random.Random(seed)
        self.ner_model = ner_model
        self._ner: Callable | None = None

    @property
    def tagger(self) -> _ChineseTagger:
        return _chinese_tagger(tuple(self.terms))

    def _model_names(self, text: str) -> list[Span]:
        if self._ner is None:
            from transformers import pipeline

            self._ner = pipeline("token-classification", model=self.ner_model, aggregation_strategy="simple",
                                 device="cpu")
        spans = []
        for entity in self._ner(text):
            if entity["entity_group"].upper() in ("PER", "PERSON"):
                # Byte-level tokenizers count the space before a word into its offsets.
                start, end = entity["start"], entity["end"]
                start += len(text[start:end]) - len(text[start:end].lstrip())
                spans.append(Span(start, end, "NAME"))
        return spans

    def detect(self, text: str, known_names: Iterable[str] = ()) -> list[Span]:
        """Non-overlapping PHI spans of text, in order; known_names are masked wherever they occur."""
        candidates: list[Span] = []
        for kind, patterns in PATTERNS.items():
            for pattern in patterns:
                for match in pattern.finditer(text):
                    group = "value" if "value" in pattern.groupindex else 0
                    if kind == "ID" and len(match[0]) == 18 and not valid_resident_id(match[0]):
                        continue
                    candidates.append(Span(match.start(group), match.end(group), kind))
        if re.search(f"[{HAN}]", text):
            tokens = self.tagger.tokens(text)
            candidates += _chinese_names(tokens)
            candidates = [_trim_address(s, tokens) if s.kind == "ADDRESS" and re.match(f"[{HAN}]", text[s.start])
                          else s for s in candidates]
        if self.ner_model:
            candidates += self._model_names(text)
        for name in known_names:
            boundary = r"\b" if name.isascii() else ""
            candidates += [Span(m.start(), m.end(), "NAME")
                           for m in re.finditer(f"{boundary}{re.escape(name)}{boundary}", text)]
        protected = [m.span() for m in self.protected.finditer(text)] if self.terms else []
        # The type listed first in PATTERNS wins an overlap (13812345678@qq.com is an email, not a phone); within a
        # type, the longer span.
        priority = {kind: rank for rank, kind in enumerate(PATTERNS)}
        chosen: list[Span] = []
        for span in sorted(candidates, key=lambda s: (priority[s.kind], s.start - s.end)):
            if span.end > span.start and not any(span.overlaps(*other) for other in protected) and not any(
                    span.overlaps(o.start, o.end) for o in chosen):
                chosen.append(span)
        return sorted(chosen, key=lambda s: s.start)

    def replace(self, text: str, spans: list[Span], surrogates: dict[tuple[str, str], str]) -> str:
        """text with each span replaced; surrogates maps (type, original) to its fake, filled as needed."""
        pieces, last = [], 0
        for span in spans:
            original = text[span.start: span.end]
            if self.surrogates and (span.kind, original) not in surrogates:
                surrogates[span.kind, original] = surrogate(span.kind, original, self.rng)
            replacement = surrogates[span.kind, original] if self.surrogates else f"[{span.kind}]"
            pieces += [text[last: span.start], replacement]
            last = span.end
        return "".join(pieces) + text[last:]

    def deidentify_record(self, record: object) -> tuple[object, list[tuple[str, Span]]]:
        """The record with PHI replaced in every text field, and (field path, span) for each replacement.

        Structure (roles, tool schemas) is kept; a name found in one field is masked in the others too.
        """
        fields = list(_text_fields(record))
        found = {path: self.detect(text) for path, text in fields}
        names = {text[s.start: s.end].strip() for path, text in fields for s in found[path] if s.kind == "NAME"}
        # An English full name also recurs as the surname alone ("Mr. Smith"); a fragment too short to be a name
        # (a model's stray "Jo") would mask unrelated words.
        names |= {name.split()[-1] for name in names if name.isascii() and " " in name}
        names = {name for name in names if len(name) >= (3 if name.isascii() else 2)}
        if names:
            found = {path: self.detect(text, names) for path, text in fields}
        surrogates: dict[tuple[str, str], str] = {}
        replaced = {path: self.replace(text, found[path], surrogates) for path, text in fields if found[path]}
        return _with_fields(record, replaced), [(path, span) for path, _ in fields for span in found[path]]


def _text_fields(value: object, path: str = "") -> Iterable[tuple[str, str]]:
    """(path, text) for every string in a record outside its structure keys: 'messages[1].content'."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            if key not in STRUCTURE_KEYS:
                yield from _text_fields(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _text_fields(item, f"{path}[{index}]")


def _with_fields(value: object, replaced: dict[str, str], path: str = "") -> object:
    """A copy of value with the strings at the given paths replaced."""
    if isinstance(value, str):
        return replaced.get(path, value)
    if isinstance(value, dict):
        return {key: item if key in STRUCTURE_KEYS else _with_fields(item, replaced, f"{path}.{key}" if path else key)
                for key, item in value.items()}
    if isinstance(value, list):
        return [_with_fields(item, replaced, f"{path}[{index}]") for index, item in enumerate(value)]
    return value


SURROGATE_NAMES = {"zh": ("张", "王", "李", "赵", "刘", "陈", "杨", "黄"), "zh_given": "明华丽军芳静强敏洋娟磊艳",
                   "en": ("Alex", "Sam", "Jordan", "Taylor", "Casey", "Morgan"),
                   "en_last": ("Reed", "Hale", "Brooks", "Lane", "Ford", "Parker")}
SURROGATE_ADDRESSES = {"zh": ("江南省东湖市西城区文华路{}号", "河西省青山市南湖区长乐街{}号"),
                       "en": ("{} Maple Street, Springfield", "{} Cedar Avenue, Riverton")}


def _fake_resident_id(rng: random.Random) -> str:
    body = f"{rng.randint(110000, 659999)}{rng.randint(1950, 2010)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
    body += f"{rng.randint(0, 999):03d}"
    total = sum(int(digit) * (2 ** (17 - i) % 11) for i, digit in enumerate(body))
    return body + "10X98765432"[total % 11]


def surrogate(kind: str, original: str, rng: random.Random) -> str:
    """A fake value of the same type and script as original (digits re-drawn, names and addresses from lists)."""
    chinese = bool(re.search(f"[{HAN}]", original))
    if kind == "NAME":
        if chinese:
            return rng.choice(SURROGATE_NAMES["zh"]) + "".join(rng.sample(SURROGATE_NAMES["zh_given"], 2))
        last = rng.choice(SURROGATE_NAMES["en_last"])
        return f"{rng.choice(SURROGATE_NAMES['en'])} {last}" if " " in original else last
    if kind == "ID" and len(original) == 18:
        return _fake_resident_id(rng)
    if kind == "ADDRESS":
        return rng.choice(SURROGATE_ADDRESSES["zh" if chinese else "en"]).format(rng.randint(1, 300))
    if kind == "EMAIL":
        return f"user{rng.randint(1000, 9999)}@example.com"
    if kind == "DATE":
        year, month, day = rng.randint(1950, 2025), rng.randint(1, 12), rng.randint(1, 28)
        return f"{year}年{month}月{day}日" if chinese else f"{year}-{month:02d}-{day:02d}"
    # Phone, record number, SSN: the same shape with fresh digits (the first kept: a mobile stays a mobile).
    digits = iter(str(rng.randint(0, 9)) for _ in original)
    return "".join(c if not c.isdigit() or i == 0 else next(digits) for i, c in enumerate(original))


class DeidentifyingConverter:
    """A record converter (formats.to_text, to_conversation, ...) followed by de-identification: --deidentify."""

    def __init__(self, convert: Callable[[object], dict], deidentifier: Deidentifier | None = None):
        self.convert = convert
        self.deidentifier = deidentifier or default_deidentifier()
        self.counts: Counter = Counter()

    def __call__(self, raw: object) -> dict:
        record, found = self.deidentifier.deidentify_record(self.convert(raw))
        self.counts.update(span.kind for _, span in found)
        return record


def phi_summary(counts: Mapping[str, int]) -> str:
    """'NAME 3, PHONE 1': the placeholders put in, by type."""
    return ", ".join(f"{kind} {counts[kind]}" for kind in PHI_TYPES if counts.get(kind)) or "no PHI found"


@cache
def default_deidentifier() -> Deidentifier:
    """One placeholder de-identifier per process: building jieba's dictionary takes a second."""
    return Deidentifier()



def evaluate_detection(deidentifier: Deidentifier, records: list[dict]) -> dict:
    """Precision and recall per PHI type on labelled records ({"text", "spans", "medical_terms"}), and the share
    of medical terms left intact.

    A found span is right when it overlaps a labelled span of its type; a labelled span is found when a span of
    its type overlaps it ("masked" counts one overlapped by a span of any type: what privacy needs).
    """
    found_right, found_total, labelled_found, labelled_masked, labelled_total = (Counter() for _ in range(5))
    terms_kept = terms_total = 0
    for record in records:
        text, labelled = record["text"], [Span(s["start"], s["end"], s["type"]) for s in record["spans"]]
        found = deidentifier.deidentify_record({"text": text})[1]
        spans = [span for _, span in found]
        for span in spans:
            found_total[span.kind] += 1
            found_right[span.kind] += any(g.kind == span.kind and g.overlaps(span.start, span.end) for g in labelled)
        for gold in labelled:
            labelled_total[gold.kind] += 1
            labelled_found[gold.kind] += any(s.kind == gold.kind and s.overlaps(gold.start, gold.end) for s in spans)
            labelled_masked[gold.kind] += any(s.overlaps(gold.start, gold.end) for s in spans)
        replaced = deidentifier.replace(text, spans, {})
        terms_kept += sum(term in replaced for term in record["medical_terms"])
        terms_total += len(record["medical_terms"])
    per_type = {kind: {"precision": found_right[kind] / max(found_total[kind], 1),
                       "recall": labelled_found[kind] / max(labelled_total[kind], 1),
                       "masked": labelled_masked[kind] / max(labelled_total[kind], 1),
                       "labelled": labelled_total[kind], "found": found_total[kind]} for kind in PHI_TYPES}
    return {"per_type": per_type, "medical_terms_intact": terms_kept / max(terms_total, 1),
            "medical_terms": terms_total, "records": len(records)}

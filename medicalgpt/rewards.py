"""Reward functions for GRPO on medical questions with verifiable answers.

Each function has TRL's reward signature, `fn(completions, answer, **kwargs) -> list[float | None]`:
`completions` are strings or conversational `[{"role": "assistant", "content": str}]` lists, and the dataset's
columns arrive as keyword arguments (`answer` is the reference answer of each prompt, see `to_grpo`). A reward of
None means "does not apply to this sample": TRL leaves that function out of the sample's weighted sum, so one run
can mix multiple-choice, dose and free-text questions.

The accuracy rewards read the answer part of a completion: the content of its last `<answer>…</answer>` block, or
the whole completion when it has none.

    load_reward_functions(["format_reward", "answer_accuracy", "my_rewards:safety_reward"])
"""

import functools
import importlib
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import field
from typing import Any

from medicalgpt.errors import UsageError

THINK_ANSWER_PROMPT = ("You are a medical assistant. First reason step by step inside <think> </think>, then give "
                       "only the final answer inside <answer> </answer>.")

_NOT_A_TAG = r"(?:(?!</?(?:think|answer)>).)"
THINK_ANSWER = re.compile(rf"\s*<think>{_NOT_A_TAG}*</think>\s*<answer>(?P<answer>{_NOT_A_TAG}*)</answer>\s*",
                          re.DOTALL)
ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

# Option letters: "B", "AC", "A, C", "A、C", "A和C", "A and C".
_LETTER_RUN = r"[A-E](?:(?:[\s,，、;/&和及]|and)*[A-E])*"
REFERENCE_LETTERS = re.compile(_LETTER_RUN)
# An explicitly stated choice ("the answer is (B)", "Answer: AC", "答案是B", "选C") beats letters elsewhere.
STATED_CHOICE = re.compile(
    rf"(?i:answer|option|choice|答案|选项|选择|选)\s*(?i:is|are|是|为)?\s*[:：]?\s*[(（]?({_LETTER_RUN})(?![A-Za-z0-9])")
LONE_LETTERS = re.compile(r"(?<![A-Za-z0-9])[A-E]+(?![A-Za-z0-9])")

# Mass units in milligrams; text is NFKC-normalised (µ -> μ, full-width digits -> ASCII) and lower-cased first.
MASS_IN_MG = {"mg": 1.0, "g": 1e3, "kg": 1e6, "mcg": 1e-3, "μg": 1e-3, "ug": 1e-3,
              "毫克": 1.0, "克": 1e3, "千克": 1e6, "公斤": 1e6, "微克": 1e-3}
_UNIT = "|".join(sorted(map(re.escape, MASS_IN_MG), key=len, reverse=True))  # longest first: "毫克" before "克"
# An amount is a number with a mass unit; a rate such as "10 mg/kg" is not an amount.
AMOUNT = re.compile(rf"(\d+(?:,\d{{3}})*(?:\.\d+)?)\s*({_UNIT})(?![A-Za-z])(?!\s*/)")
RELATIVE_TOLERANCE = 0.01
PARTIAL_CREDIT = 0.5  # the most a wrong dose earns (numeric_closeness)
WORD_OR_HAN = re.compile(r"[\u4e00-\u9fff]|[^\W\u4e00-\u9fff]+")
LENGTH_TARGET = 1000
DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")


def completion_text(completion: str | list[dict]) -> str:
    """A completion's text: the string itself, or the content of its assistant message(s)."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content") or "" for message in completion if message.get("role") == "assistant")


def answer_part(text: str) -> str:
    """The content of the last <answer>…</answer> block, or the whole text when there is none."""
    blocks = ANSWER_BLOCK.findall(text)
    return (blocks[-1] if blocks else text).strip()


def per_sample(score: Callable[[str, str], float | None]) -> Callable[..., list[float | None]]:
    """A TRL reward function (same name and docs) from score(completion text, reference answer)."""
    @functools.wraps(score)
    def reward(completions: list, answer: list[str], **kwargs) -> list[float | None]:
        return [score(completion_text(completion), str(reference))
                for completion, reference in zip(completions, answer)]

    return reward


def format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 when the completion is `<think>…</think><answer>…</answer>` and nothing else but whitespace, else 0.0.

    Reasoning may span several lines; each block appears exactly once (no nested or repeated tags) and the answer
    is not empty.
    """
    matches = (THINK_ANSWER.fullmatch(completion_text(completion)) for completion in completions)
    return [1.0 if match and match["answer"].strip() else 0.0 for match in matches]


def reference_letters(reference: str) -> set[str] | None:
    """The option letters of a reference such as "B", "AC" or "A, C"; None when it is not option letters."""
    reference = reference.strip().rstrip(".。")
    return set(re.findall("[A-E]", reference)) if REFERENCE_LETTERS.fullmatch(reference) else None


def chosen_letters(answer: str) -> set[str]:
    """The option letters an answer picks: the last explicitly stated choice, else every standalone A-E letter."""
    stated = STATED_CHOICE.findall(answer)
    runs = [stated[-1]] if stated else LONE_LETTERS.findall(answer)
    return {letter for run in runs for letter in re.findall("[A-E]", run)}


@per_sample
def choice_accuracy(text: str, reference: str) -> float | None:
    """Multiple choice: 1.0 when the answer picks exactly the reference's option letters (A-E, as a set), else 0.0.

    The reference is letters only ("B", "AC", "A, C"); for any other reference the reward is None (not applicable).
    Letters are read from the answer part: an explicit statement ("The answer is (B)", "Answer: A, C", "答案是B",
    "选C") wins; otherwise every standalone capital A-E counts ("B", "A和C", "AC"), so reasoning that mentions
    other options belongs in <think>, not in <answer>.
    """
    expected = reference_letters(reference)
    if expected is None:
        return None
    return 1.0 if chosen_letters(answer_part(text)) == expected else 0.0


def normalize_text(text: str) -> str:
    """Case-folded, NFKC (full-width forms become ASCII), without whitespace or punctuation (Chinese included);
    a decimal point between digits stays, so "3.5" does not become "35"."""
    text = DECIMAL_POINT.sub("\x00", unicodedata.normalize("NFKC", text).casefold())
    kept = "".join(ch for ch in text if not ch.isspace() and not unicodedata.category(ch).startswith("P"))
    return kept.replace("\x00", ".")


def contains_whole(given: str, expected: str) -> bool:
    """expected occurs in given, and where it starts or ends with a digit, not inside a longer number ("3" is not
    in "13" or "3.5")."""
    before = r"(?<![\d.])" if expected[0].isdigit() else ""
    after = r"(?![\d]|\.\d)" if expected[-1].isdigit() else ""
    return re.search(before + re.escape(expected) + after, given) is not None


@per_sample
def answer_match(text: str, reference: str) -> float | None:
    """Short free-text answers: 1.0 for an exact match, 0.5 when the answer contains the reference, else 0.0.

    Both sides are compared after `normalize_text` (case, whitespace and punctuation, full-width Chinese
    punctuation included, are ignored), so "X-ray of the affected joint." matches "x ray of the affected joint" and
    "甲巯咪唑。" matches "甲巯咪唑". Numbers match as whole numbers: a reference "3" is not contained in
    "可能是4或者13" or "3.5". None when the reference has no letters or digits at all.
    """
    expected, given = normalize_text(reference), normalize_text(answer_part(text))
    if not expected:
        return None
    if given == expected:
        return 1.0
    return 0.5 if contains_whole(given, expected) else 0.0


def amount_in_mg(text: str) -> float | None:
    """The last mass amount in a text ("840 mg", "0.84 g", "840毫克", "1,600 mcg"), in milligrams; None if none."""
    amounts = AMOUNT.findall(unicodedata.normalize("NFKC", text).lower())
    if not amounts:
        return None
    number, unit = amounts[-1]
    return float(number.replace(",", "")) * MASS_IN_MG[unit]


@per_sample
def numeric_match(text: str, reference: str) -> float | None:
    """Dose calculations: 1.0 when the answer's amount equals the reference's within 1% (relative), else 0.0.

    Amounts are a number with a mass unit (mg, g, kg, mcg/µg/ug, 毫克, 克, 千克/公斤, 微克), converted to mg, so
    "0.84 g" and "840毫克" both match "840 mg". The last amount in the answer part counts (the result of a worked
    calculation); rates such as "10 mg/kg" are skipped. A bare number, another kind of unit (mL, tablets) or no
    number at all scores 0.0. None when the reference holds no mass amount.
    """
    expected = amount_in_mg(reference)
    if expected is None:
        return None
    given = amount_in_mg(answer_part(text))
    return 1.0 if given is not None and abs(given - expected) <= RELATIVE_TOLERANCE * abs(expected) else 0.0


def answer_words(text: str) -> list[str]:
    """An answer's words for overlap: Latin words and numbers, and each Han character on its own (Chinese has no
    spaces), case-folded and NFKC-normalised."""
    return WORD_OR_HAN.findall(unicodedata.normalize("NFKC", text).casefold())


@per_sample
def answer_overlap(text: str, reference: str) -> float | None:
    """Short free-text answers with partial credit: the F1 of the answer's words against the reference's (SQuAD's
    measure; Han characters count as words, see `answer_words`), 1.0 for an exact match. "serum TSH test" against
    "serum TSH and free T4 test" scores 0.67 where answer_match gives 0. None when the reference has no words."""
    expected, given = Counter(answer_words(reference)), Counter(answer_words(answer_part(text)))
    if not expected:
        return None
    common = sum((expected & given).values())
    if not common:
        return 0.0
    precision, recall = common / sum(given.values()), common / sum(expected.values())
    return 2 * precision * recall / (precision + recall)


@per_sample
def numeric_closeness(text: str, reference: str) -> float | None:
    """Dose calculations with partial credit: 1.0 within 1% like numeric_match; otherwise an amount with a mass unit
    earns half of how close it is, 0.5 * max(0, 1 - relative error), so 500 mg against 840 mg scores 0.30 and
    an answer without an amount 0.0. None when the reference holds no mass amount."""
    expected = amount_in_mg(reference)
    if expected is None:
        return None
    given = amount_in_mg(answer_part(text))
    if given is None:
        return 0.0
    error = abs(given - expected) / abs(expected)
    return 1.0 if error <= RELATIVE_TOLERANCE else PARTIAL_CREDIT * max(0.0, 1.0 - error)


def first_applicable(rewards: tuple[Callable[..., list], ...], completions: list, answer: list[str]) -> list:
    """Per sample, the first of `rewards` that applies to its reference (not None)."""
    scores = []
    for completion, reference in zip(completions, answer):
        for reward in rewards:
            value = reward([completion], [reference])[0]
            if value is not None:
                break
        scores.append(value)
    return scores


def answer_accuracy(completions: list, answer: list[str], **kwargs) -> list[float | None]:
    """Mixed verifiable answers: per sample, choice_accuracy when the reference is option letters, numeric_match
    when it is a mass amount, answer_match otherwise (the shipped data/grpo sets mix all three)."""
    return first_applicable((choice_accuracy, numeric_match, answer_match), completions, answer)


def answer_partial_credit(completions: list, answer: list[str], **kwargs) -> list[float | None]:
    """answer_accuracy's denser twin for GRPO training: choice_accuracy for option letters, numeric_closeness for
    mass amounts, answer_overlap for free text. A right answer scores 1.0 as in answer_accuracy, and a near miss
    scores more than a far one, so a group in which no completion is right still has something to learn from."""
    return first_applicable((choice_accuracy, numeric_closeness, answer_overlap), completions, answer)


def length_penalty(completions: list, target_length: int = LENGTH_TARGET, **kwargs) -> list[float]:
    """0.0 up to target_length characters; beyond, -(excess / target_length), at most -1.0.

    Discourages rambling once the format and answer are right; pair it with a small weight (--reward_weights).
    A different target: `functools.partial(length_penalty, target_length=300)` in your own module.
    """
    excess = (len(completion_text(completion)) - target_length for completion in completions)
    return [-min(1.0, over / target_length) if over > 0 else 0.0 for over in excess]


REWARD_FUNCTIONS: dict[str, Callable[..., list]] = {
    reward.__name__: reward
    for reward in (format_reward, answer_accuracy, answer_partial_credit, choice_accuracy, answer_match, numeric_match,
                   answer_overlap, numeric_closeness, length_penalty)
}


def _import_reward(spec: str) -> Callable[..., list]:
    """module:function, imported (the module must be importable from the working directory or sys.path)."""
    module_name, _, function_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise UsageError(f"--reward_funcs {spec}: cannot import module '{module_name}' ({error})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UsageError(f"--reward_funcs {spec}: module '{module_name}' has no function '{function_name}'")
    return function


def load_reward_functions(names: list[str]) -> list[Callable[..., list]]:
    """Reward functions by registry name (REWARD_FUNCTIONS) or as module:function; blank names are ignored."""
    functions = []
    for name in filter(None, (name.strip() for name in names)):
        if name in REWARD_FUNCTIONS:
            functions.append(REWARD_FUNCTIONS[name])
        elif ":" in name:
            functions.append(_import_reward(name))
        else:
            raise UsageError(f"--reward_funcs {name}: unknown reward function; use one of "
                             f"{', '.join(REWARD_FUNCTIONS)} or module:function")
    return functions


def reward_funcs_field(default: str | None, role: str) -> Any:
    """The --reward_funcs flag, declared once for GRPO, PPO and evaluation, which differ in its default and role."""
    return field(default=default, metadata={"help": f"Comma-separated reward functions: {', '.join(REWARD_FUNCTIONS)}, "
                                                    f"or module:function; {role}."})

"""Per-stage processors: normalised records -> token ids and labels ready for a trainer."""

import json
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain

import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, IterableDatasetDict

from medicalgpt.errors import DataError, UsageError
from medicalgpt.templates import IGNORE_INDEX
from medicalgpt.tool_calls import is_call

logger = logging.getLogger(__name__)
Splits = DatasetDict | IterableDatasetDict


def _map(splits: Splits, function, desc: str, num_proc: int | None = None, **kwargs) -> Splits:
    """splits.map, with a progress bar and worker processes where the data is an Arrow dataset (a stream is
    processed lazily, as training reads it)."""
    if isinstance(splits, DatasetDict):
        kwargs.update(desc=desc, num_proc=num_proc)
    return splits.map(function, **kwargs)


def build_pretraining_splits(splits: Splits, tokenizer, block_size: int, num_proc: int | None = None) -> Splits:
    """Tokenise documents with EOS after each, concatenate, and cut into block_size blocks.

    The tail shorter than a block is kept as a last, shorter block, so a small validation set is not lost.
    """
    if tokenizer.eos_token_id is None:
        raise UsageError("the tokenizer has no EOS token to separate documents; pass a tokenizer with one")

    def tokenize(batch: dict) -> dict:
        # verbose=False: a document longer than the model's maximum is expected here; group() cuts it into blocks.
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [doc + [tokenizer.eos_token_id] for doc in ids]}

    def group(batch: dict) -> dict:
        stream = list(chain.from_iterable(batch["input_ids"]))
        return {"input_ids": [stream[i: i + block_size] for i in range(0, len(stream), block_size)]}

    tokenized = _map(splits, tokenize, "Tokenizing documents", num_proc, batched=True, remove_columns=["text"])
    # Large batches: the shorter tail block happens once per 10k documents, not once per 1k.
    return _map(tokenized, group, f"Grouping into blocks of {block_size}", num_proc, batched=True, batch_size=10_000)


def _encode_conversation(example: dict, tokenizer, template, max_length: int, train_on_inputs: bool) -> dict:
    tools = json.loads(example["tools"]) if example["tools"] else None
    input_ids, labels = template.encode(tokenizer, example["messages"], tools, train_on_inputs=train_on_inputs)
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length],
            "truncated": len(input_ids) > max_length}


class _StreamTally:
    """Filter for a stream of encoded samples: drops those left with no assistant token, and says how many samples
    were truncated or dropped so far at 1, 10, 100, ... of them (a stream has no end to count at)."""

    def __init__(self, name: str, max_length: int):
        self.name, self.max_length = name, max_length
        self.seen = self.truncated = self.dropped = 0

    def __call__(self, labels: list[int], truncated: bool) -> bool:
        keep = any(t != IGNORE_INDEX for t in labels)
        self.seen += 1
        self.truncated += truncated
        self.dropped += not keep
        if (truncated or not keep) and math.log10(self.truncated + self.dropped).is_integer():
            logger.warning("%s: so far %d of %d streamed samples longer than --max_length %d were truncated; %d left "
                           "with no assistant token were dropped", self.name, self.truncated, self.seen,
                           self.max_length, self.dropped)
        return keep


def build_sft_splits(splits: Splits, tokenizer, template, max_length: int, train_on_inputs: bool = False,
                     num_proc: int | None = None) -> Splits:
    """Render conversations with the chat template into input_ids + labels (loss on assistant tokens).

    Samples longer than max_length are truncated; those left with no trained token are dropped and counted.
    """
    encoded = _map(splits, _encode_conversation, "Applying the chat template", num_proc,
                   remove_columns=["messages", "tools"],
                   fn_kwargs=dict(tokenizer=tokenizer, template=template, max_length=max_length,
                                  train_on_inputs=train_on_inputs))
    if isinstance(encoded, IterableDatasetDict):
        tallied = {name: split.filter(_StreamTally(name, max_length), input_columns=["labels", "truncated"])
                   for name, split in encoded.items()}
        return IterableDatasetDict({name: split.remove_columns("truncated") for name, split in tallied.items()})
    result = {}
    for name, split in encoded.items():
        kept = split.filter(lambda labels: any(t != IGNORE_INDEX for t in labels), input_columns="labels")
        truncated, dropped = sum(split["truncated"]), len(split) - len(kept)
        if truncated or dropped:
            logger.warning("%s: %d of %d samples longer than --max_length %d were truncated; %d left with no "
                           "assistant token were dropped", name, truncated, len(split), max_length, dropped)
        if len(kept) == 0:
            raise DataError(f"{name}: every sample lost all its assistant tokens to truncation at --max_length "
                            f"{max_length}; raise --max_length")
        result[name] = kept.remove_columns("truncated")
    return DatasetDict(result)


def sorted_by_length(split: Dataset) -> Dataset:
    """The samples shortest first: evaluation batches of similar lengths pad little (in file order, evaluation
    spent about half its time on padding: sorted, it ran at 1.4-1.9x the tokens/s; benchmarks/README.md)."""
    with_lengths = split.map(lambda ids: {"length": len(ids)}, input_columns="input_ids", desc="Sorting by length")
    return with_lengths.sort("length").remove_columns("length")


def pack_sft_splits(splits: Splits, max_length: int) -> Splits:
    """Best-fit-decreasing packing of tokenised samples into rows of at most max_length tokens (a stream is packed
    as it is read, 1,000 samples at a time).

    Each row keeps its samples' lengths (seq_lengths) so the collator can restart position ids per sample.
    """
    from trl import pack_dataset

    packed = pack_dataset(splits, seq_length=max_length, strategy="bfd")
    if isinstance(packed, IterableDatasetDict):
        return packed
    for name, split in packed.items():
        lengths = pc.list_flatten(split.data.column("seq_lengths"))  # in Arrow: a Python list per row is slow at 1M
        logger.info("%s: packed %d samples into %d rows of <= %d tokens (%.1f%% filled)", name, len(lengths),
                    len(split), max_length, 100 * pc.sum(lengths).as_py() / (len(split) * max_length))
    return packed


def prompt_and_response(tokenizer, template, messages: list[dict], tools: list | None,
                         response: str) -> tuple[list[int], list[int]]:
    """Prompt ids and the answer's trained ids (content + end-of-turn token), from the template's own labels; an
    answer that is a tool call is rendered as one."""
    role = "function_call" if is_call(response) else "assistant"
    ids, labels = template.encode(tokenizer, messages + [{"role": role, "content": response}], tools)
    end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return ids[:start], ids[start:end]


@dataclass(frozen=True)
class LengthLimits:
    """Token caps for preference rows; None = no cap. drop: drop an over-long pair instead of cutting it."""

    max_length: int | None = None  # prompt + longest answer (the trainer's --max_length)
    max_source_length: int | None = None
    max_target_length: int | None = None
    drop: bool = False

    def over(self, prompt: list[int], responses: list[list[int]]) -> bool:
        longest = max(map(len, responses))
        return ((self.max_source_length is not None and len(prompt) > self.max_source_length)
                or (self.max_target_length is not None and longest > self.max_target_length)
                or (self.max_length is not None and len(prompt) + longest > self.max_length))


@dataclass
class Fitted:
    """A prompt and its answers within LengthLimits, and what it took."""

    prompt: list[int]
    responses: list[list[int]]
    prompt_cut: bool = False
    answers_cut: bool = False
    dropped: bool = False


def fit_lengths(prompt: list[int], responses: list[list[int]], shorter_prompts: Iterable[list[int]],
                limits: LengthLimits) -> Fitted:
    """Cut the prompt before the answers, so that prompt + longest answer fit the limits.

    The prompt loses its oldest exchanges first (shorter_prompts: the prompt re-rendered with fewer turns, the
    system prompt kept, down to the last user turn); a last user turn that is still too long is cut from the left,
    to no less than half of max_length. The answers are then cut at the end to what the prompt leaves.
    """
    if not limits.over(prompt, responses):
        return Fitted(prompt, responses)
    if limits.drop:
        return Fitted(prompt, responses, dropped=True)
    cut = [r[: limits.max_target_length] for r in responses] if limits.max_target_length else responses
    total = limits.max_length or math.inf
    source_cap = limits.max_source_length or math.inf
    budget = min(source_cap, total - max(map(len, cut)))
    shortened = prompt
    for candidate in chain([prompt], shorter_prompts):
        shortened = candidate
        if len(candidate) <= budget:
            break
    if len(shortened) > budget:  # the last user turn alone is too long: cut its start
        keep = int(min(source_cap, max(budget, min(len(shortened), total // 2))))
        shortened = shortened[len(shortened) - keep:]
    if limits.max_length:
        cut = [r[: limits.max_length - len(shortened)] for r in cut]
    return Fitted(shortened, cut, prompt_cut=shortened != prompt,
                  answers_cut=any(len(a) < len(r) for a, r in zip(cut, responses, strict=True)))


def shorter_prompts(example: dict, tokenizer, template, response: str) -> Iterator[list[int]]:
    """The prompt without its oldest exchanges, one at a time (the system prompt stays), down to the last user turn."""
    tools = json.loads(example["tools"]) if example["tools"] else None
    messages = example["messages"]
    head = messages[:1] if messages[0]["role"] == "system" else []
    body = messages[len(head):]
    for start in (i for i, message in enumerate(body) if i > 0 and message["role"] == "user"):
        yield prompt_and_response(tokenizer, template, head + body[start:], tools, response)[0]


def fit_example(example: dict, tokenizer, template, responses: list[str], limits: LengthLimits) -> Fitted:
    """An example's prompt and responses, as ids, fitted to the limits (see fit_lengths)."""
    prompt, response_ids = encode_responses(example, tokenizer, template, responses)
    return fit_lengths(prompt, response_ids, shorter_prompts(example, tokenizer, template, responses[0]), limits)


def encode_responses(example: dict, tokenizer, template, responses: list[str]) -> tuple[list[int], list[list[int]]]:
    """The shared prompt ids and each response's ids."""
    tools = json.loads(example["tools"]) if example["tools"] else None
    encoded = [prompt_and_response(tokenizer, template, example["messages"], tools, r) for r in responses]
    prompt = encoded[0][0]
    if any(other != prompt for other, _ in encoded[1:]):
        raise DataError("the chat template renders this prompt differently before different answers")
    return prompt, [response_ids for _, response_ids in encoded]


def _outcome(fitted: Fitted) -> dict:
    return {"prompt_cut": fitted.prompt_cut, "answers_cut": fitted.answers_cut, "dropped": fitted.dropped}


def _encode_pair(example: dict, tokenizer, template, limits: LengthLimits) -> dict:
    fitted = fit_example(example, tokenizer, template, [example["chosen"], example["rejected"]], limits)
    chosen, rejected = fitted.responses
    return {"prompt_ids": fitted.prompt, "chosen_ids": chosen, "rejected_ids": rejected, **_outcome(fitted)}


def _encode_unpaired(batch: dict, tokenizer, template, limits: LengthLimits) -> dict:
    """One row per (prompt, completion, label): a preference pair becomes two rows, each fitted on its own."""
    rows = {"prompt_ids": [], "completion_ids": [], "label": [], "prompt_cut": [], "answers_cut": [], "dropped": []}
    for index, messages in enumerate(batch["messages"]):
        example = {"messages": messages, "tools": batch["tools"][index]}
        for completion, label in zip(batch["completions"][index], batch["labels"][index], strict=True):
            fitted = fit_example(example, tokenizer, template, [completion], limits)
            for key, value in {"prompt_ids": fitted.prompt, "completion_ids": fitted.responses[0], "label": label,
                               **_outcome(fitted)}.items():
                rows[key].append(value)
    return rows


# Dropping or cutting more than this share of a split is a warning; less is logged as information.
SMALL_SHARE = 0.05


def _report_fitting(splits: DatasetDict, limits: LengthLimits, unit: str) -> DatasetDict:
    """Remove dropped rows and the bookkeeping columns; say what was dropped or cut, loudly when it is much."""
    caps = f"--max_length {limits.max_length}" + "".join(
        f" / --{name} {value}" for name, value in (("max_source_length", limits.max_source_length),
                                                  ("max_target_length", limits.max_target_length)) if value)
    result = {}
    for name, split in splits.items():
        dropped, prompts, answers = (sum(split[column]) for column in ("dropped", "prompt_cut", "answers_cut"))
        cut = sum(p or a for p, a in zip(split["prompt_cut"], split["answers_cut"], strict=True))
        kept = split.filter(lambda flag: not flag, input_columns="dropped", desc="Dropping over-long rows") \
            if dropped else split
        if dropped and len(kept) == 0:
            raise DataError(f"{name}: every {unit} is longer than {caps} tokens; raise --max_length, or pass "
                            "--long_pairs truncate to keep them cut")
        if dropped:
            logger.log(_loudness(dropped, len(split)), "%s: dropped %d of %d %ss longer than %s tokens; raise "
                       "--max_length, or pass --long_pairs truncate to keep them cut", name, dropped, len(split),
                       unit, caps)
        if cut:
            logger.log(_loudness(cut, len(split)), "%s: cut %d of %d %ss longer than %s tokens (the prompt in %d, "
                       "the answers in %d); raise --max_length to keep more, or pass --long_pairs drop to drop "
                       "them", name, cut, len(split), unit, caps, prompts, answers)
        result[name] = kept.remove_columns(["prompt_cut", "answers_cut", "dropped"])
    return DatasetDict(result)


def _loudness(count: int, total: int) -> int:
    """A warning when more than a small share of a split is affected, else information."""
    return logging.WARNING if count > SMALL_SHARE * total else logging.INFO


def build_preference_splits(splits: DatasetDict, tokenizer, template, limits: LengthLimits = LengthLimits(),
                            num_proc: int | None = None) -> DatasetDict:
    """Preference pairs as prompt_ids / chosen_ids / rejected_ids rendered by the chat template, fitted to limits."""
    encoded = splits.map(_encode_pair, num_proc=num_proc, remove_columns=splits["train"].column_names,
                         fn_kwargs=dict(tokenizer=tokenizer, template=template, limits=limits),
                         desc="Applying the chat template")
    return _report_fitting(encoded, limits, "pair")


def build_unpaired_splits(splits: DatasetDict, tokenizer, template, limits: LengthLimits = LengthLimits(),
                          num_proc: int | None = None) -> DatasetDict:
    """KTO rows as prompt_ids / completion_ids / label rendered by the chat template, fitted to limits."""
    encoded = splits.map(_encode_unpaired, batched=True, num_proc=num_proc,
                         remove_columns=splits["train"].column_names,
                         fn_kwargs=dict(tokenizer=tokenizer, template=template, limits=limits),
                         desc="Applying the chat template")
    return _report_fitting(encoded, limits, "row")

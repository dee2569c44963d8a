"""Per-stage processors: normalised records -> token ids and labels ready for a trainer."""

import json
import logging
from itertools import chain

from datasets import DatasetDict

from medicalgpt.errors import DataError, UsageError
from medicalgpt.templates import IGNORE_INDEX

logger = logging.getLogger(__name__)


def build_pretraining_splits(splits: DatasetDict, tokenizer, block_size: int,
                             num_proc: int | None = None) -> DatasetDict:
    """Tokenise documents with EOS after each, concatenate, and cut into block_size blocks.

    The tail shorter than a block is kept as a last, shorter block, so a small validation set is not lost.
    """
    if tokenizer.eos_token_id is None:
        raise UsageError("the tokenizer has no EOS token to separate documents; pass a tokenizer with one")

    def tokenize(batch: dict) -> dict:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [doc + [tokenizer.eos_token_id] for doc in ids]}

    def group(batch: dict) -> dict:
        stream = list(chain.from_iterable(batch["input_ids"]))
        return {"input_ids": [stream[i: i + block_size] for i in range(0, len(stream), block_size)]}

    tokenized = splits.map(tokenize, batched=True, num_proc=num_proc, remove_columns=["text"],
                           desc="Tokenizing documents")
    # Large batches: the shorter tail block happens once per 10k documents, not once per 1k.
    return tokenized.map(group, batched=True, batch_size=10_000, num_proc=num_proc,
                         desc=f"Grouping into blocks of {block_size}")


def _encode_conversation(example: dict, tokenizer, template, max_length: int, train_on_inputs: bool) -> dict:
    tools = json.loads(example["tools"]) if example["tools"] else None
    input_ids, labels = template.encode(tokenizer, example["messages"], tools, train_on_inputs=train_on_inputs)
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length],
            "truncated": len(input_ids) > max_length}


def build_sft_splits(splits: DatasetDict, tokenizer, template, max_length: int, train_on_inputs: bool = False,
                     num_proc: int | None = None) -> DatasetDict:
    """Render conversations with the chat template into input_ids + labels (loss on assistant tokens).

    Samples longer than max_length are truncated; those left with no trained token are dropped and counted.
    """
    encoded = splits.map(
        _encode_conversation, num_proc=num_proc, remove_columns=splits["train"].column_names,
        fn_kwargs=dict(tokenizer=tokenizer, template=template, max_length=max_length, train_on_inputs=train_on_inputs),
        desc="Applying the chat template",
    )
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


def pack_sft_splits(splits: DatasetDict, max_length: int) -> DatasetDict:
    """Best-fit-decreasing packing of tokenised samples into rows of at most max_length tokens.

    Each row keeps its samples' lengths (seq_lengths) so the collator can restart position ids per sample.
    """
    from trl import pack_dataset

    packed = pack_dataset(splits, seq_length=max_length, strategy="bfd")
    for name, split in packed.items():
        tokens = sum(split["seq_lengths"], [])
        logger.info("%s: packed %d samples into %d rows of <= %d tokens (%.1f%% filled)", name, len(tokens),
                    len(split), max_length, 100 * sum(tokens) / (len(split) * max_length))
    return packed


def prompt_and_response(tokenizer, template, messages: list[dict], tools: list | None,
                         response: str) -> tuple[list[int], list[int]]:
    """Prompt ids and the answer's trained ids (content + end-of-turn token), from the template's own labels."""
    ids, labels = template.encode(tokenizer, messages + [{"role": "assistant", "content": response}], tools)
    end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return ids[:start], ids[start:end]


def _encode_responses(example: dict, tokenizer, template, responses: list[str]) -> tuple[list[int], list[list[int]]]:
    """The shared prompt ids and each response's ids."""
    tools = json.loads(example["tools"]) if example["tools"] else None
    encoded = [prompt_and_response(tokenizer, template, example["messages"], tools, r) for r in responses]
    prompt = encoded[0][0]
    if any(other != prompt for other, _ in encoded[1:]):
        raise DataError("the chat template renders this prompt differently before different answers")
    return prompt, [response_ids for _, response_ids in encoded]


def _encode_pair(example: dict, tokenizer, template) -> dict:
    prompt, (chosen, rejected) = _encode_responses(example, tokenizer, template,
                                                   [example["chosen"], example["rejected"]])
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}


def _encode_unpaired(batch: dict, tokenizer, template) -> dict:
    """One row per (prompt, completion, label): a preference pair becomes two rows."""
    rows = {"prompt_ids": [], "completion_ids": [], "label": []}
    for index, messages in enumerate(batch["messages"]):
        example = {"messages": messages, "tools": batch["tools"][index]}
        prompt, completions = _encode_responses(example, tokenizer, template, batch["completions"][index])
        for completion, label in zip(completions, batch["labels"][index], strict=True):
            rows["prompt_ids"].append(prompt)
            rows["completion_ids"].append(completion)
            rows["label"].append(label)
    return rows


def _filter_lengths(splits: DatasetDict, response_columns: list[str], max_source_length: int,
                    max_target_length: int) -> DatasetDict:
    """Drop examples whose prompt or any answer is longer (in tokens) than allowed, and say how many."""
    def fits(example: dict) -> bool:
        return len(example["prompt_ids"]) <= max_source_length and all(
            len(example[column]) <= max_target_length for column in response_columns)

    result = {}
    for name, split in splits.items():
        kept = split.filter(fits, desc="Filtering by length")
        if len(kept) < len(split):
            logger.warning("%s: dropped %d of %d examples with a prompt over --max_source_length %d or an answer "
                           "over --max_target_length %d tokens", name, len(split) - len(kept), len(split),
                           max_source_length, max_target_length)
        if len(kept) == 0:
            raise DataError(f"{name}: every example is longer than --max_source_length {max_source_length} / "
                            f"--max_target_length {max_target_length} tokens; raise them")
        result[name] = kept
    return DatasetDict(result)


def build_preference_splits(splits: DatasetDict, tokenizer, template, max_source_length: int,
                            max_target_length: int, num_proc: int | None = None) -> DatasetDict:
    """Preference pairs as prompt_ids / chosen_ids / rejected_ids rendered by the chat template."""
    encoded = splits.map(_encode_pair, num_proc=num_proc, remove_columns=splits["train"].column_names,
                         fn_kwargs=dict(tokenizer=tokenizer, template=template), desc="Applying the chat template")
    return _filter_lengths(encoded, ["chosen_ids", "rejected_ids"], max_source_length, max_target_length)


def build_unpaired_splits(splits: DatasetDict, tokenizer, template, max_source_length: int,
                          max_target_length: int, num_proc: int | None = None) -> DatasetDict:
    """KTO rows as prompt_ids / completion_ids / label rendered by the chat template."""
    encoded = splits.map(_encode_unpaired, batched=True, num_proc=num_proc,
                         remove_columns=splits["train"].column_names,
                         fn_kwargs=dict(tokenizer=tokenizer, template=template), desc="Applying the chat template")
    return _filter_lengths(encoded, ["completion_ids"], max_source_length, max_target_length)

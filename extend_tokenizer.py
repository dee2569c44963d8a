"""Add a domain vocabulary (build_domain_tokenizer.py) to a model's tokenizer.

Works for SentencePiece-style BPE tokenizers (Llama-2, Mistral: tokenizer.model or its tokenizer.json) and
byte-level BPE tokenizers (Qwen, Llama-3). Every domain token the base lacks becomes a vocabulary entry with
merges ranked after all of the base's (medicalgpt/vocab.py), so the base encodes text exactly as before wherever
no domain token applies, and never into more tokens. Base tokens keep their ids; new ones follow. Then train with
the extended tokenizer and new embedding rows:

    python extend_tokenizer.py --base_tokenizer meta-llama/Llama-2-7b-hf --domain_tokenizer tokenizers/medical-sp \
        --output_dir tokenizers/llama2-medical
    python pretraining.py --model_name_or_path meta-llama/Llama-2-7b-hf --tokenizer_name_or_path \
        tokenizers/llama2-medical --resize_embeddings --modules_to_save embed_tokens,lm_head ...

The report (printed and saved as extension.json) gives the tokens added and why others were not, and on
--eval_files the tokens before and after, lines that round-trip, and lines without a domain token that encode
exactly as before.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer

from medicalgpt.args import parse_args
from medicalgpt.data.corpus import corpus_lines
from medicalgpt.default_model import ensure_default_model
from medicalgpt.errors import run_cli
from medicalgpt.vocab import BpeExtension, domain_vocabulary, token_bytes, tokenizer_spec, utf8

HAN = re.compile(r"[\u4e00-\u9fff]")


@dataclass
class ExtendArguments:
    domain_tokenizer: str = field(metadata={"help": "The domain tokenizer (build_domain_tokenizer.py output, or any "
                                                    "tokenizer) whose vocabulary is added."})
    output_dir: str = field(metadata={"help": "Where the extended tokenizer and extension.json go."})
    base_tokenizer: str | None = field(default=None, metadata={
        "help": "The tokenizer to extend (a model directory or hub name). Default: the embedded default model's."})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "Add at most this many tokens (in the domain tokenizer's order). Default: all it can."})
    eval_files: str = field(default="data/pretrain", metadata={
        "help": "Text (any stage format) on which the report compares base and extended tokenizers."})


def save_extended(base, spec: dict, output_dir: Path):
    """The base tokenizer (chat template, special tokens, config) saved with the extended tokenizer.json."""
    base.save_pretrained(output_dir)
    (output_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    # A SentencePiece .model saved beside it would still hold the base vocabulary and disagree with tokenizer.json.
    (output_dir / "tokenizer.model").unlink(missing_ok=True)
    return AutoTokenizer.from_pretrained(output_dir)


def compare(base, extended, texts: list[str]) -> dict:
    """Tokens before and after on texts, round trips, and lines without a new token that encode as before."""
    new_ids = set(extended.get_vocab().values()) - set(base.get_vocab().values())
    before = base(texts, add_special_tokens=False)["input_ids"]
    after = extended(texts, add_special_tokens=False)["input_ids"]
    untouched = [(b, a) for b, a in zip(before, after, strict=True) if not new_ids.intersection(a)]
    han = [i for i, text in enumerate(texts) if HAN.search(text)]
    latin = sorted(set(range(len(texts))) - set(han))
    return {
        "lines": len(texts), "base_tokens": sum(map(len, before)), "extended_tokens": sum(map(len, after)),
        "compression_gain": gain(before, after, range(len(texts))),
        "compression_gain_chinese_lines": gain(before, after, han),
        "compression_gain_other_lines": gain(before, after, latin),
        "round_trip_base": sum(d == t for d, t in zip(base.batch_decode(before), texts, strict=True)),
        "round_trip_extended": sum(d == t for d, t in zip(extended.batch_decode(after), texts, strict=True)),
        "lines_without_new_tokens": len(untouched), "of_which_unchanged": sum(b == a for b, a in untouched),
    }


def gain(before: list[list[int]], after: list[list[int]], lines) -> float | None:
    """1 - tokens after / tokens before over the given lines (0.25: a quarter fewer tokens)."""
    lines = list(lines)
    total = sum(len(before[i]) for i in lines)
    return round(1 - sum(len(after[i]) for i in lines) / total, 4) if total else None


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args((ExtendArguments,), argv)
    base = AutoTokenizer.from_pretrained(args.base_tokenizer or ensure_default_model())
    domain = AutoTokenizer.from_pretrained(args.domain_tokenizer)
    texts = list(corpus_lines(args.eval_files))
    extension = BpeExtension(tokenizer_spec(base))
    added = extension.extend(domain_vocabulary(domain), args.max_new_tokens)
    output_dir = Path(args.output_dir)
    extended = save_extended(base, extension.spec, output_dir)
    report = {"added": len(added), "vocabulary": len(extended), "not_added": extension.skipped,
              "first_added": [utf8(token_bytes(t, extension.style)) or t for t in added[:20]],
              **compare(base, extended, texts)}
    (output_dir / "extension.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    print(json.dumps(report, ensure_ascii=False, indent=2))
    return report


if __name__ == "__main__":
    run_cli(main)

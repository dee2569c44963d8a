"""Train a domain tokenizer on a medical corpus: SentencePiece BPE or unigram (Llama-2 style), or byte-level BPE
(Qwen / Llama-3 style). Its vocabulary is what extend_tokenizer.py adds to a model's tokenizer.

The corpus is read by the stages' data layer: pretraining text, and the turns of conversations or preference
pairs, from any file the stages read. Chinese is split sensibly: Han text is kept apart from Latin letters,
digits and punctuation, every digit is its own token, and --max_piece_length keeps a token to a word or short
term rather than a whole clause.

    python build_domain_tokenizer.py --corpus data/pretrain/train --output_dir tokenizers/medical-sp --vocab_size 20000
    python build_domain_tokenizer.py --corpus data/pretrain/train,data/sft/train --model_type byte_bpe \
        --output_dir tokenizers/medical-bbpe
"""

import io
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Regex
from transformers import AutoTokenizer

from medicalgpt.args import parse_args
from medicalgpt.data.corpus import corpus_lines
from medicalgpt.default_model import byte_level_bpe
from medicalgpt.errors import run_cli

# The default tokenizer isolates every Han character (so on a tiny corpus BPE cannot learn whole clauses); a
# domain vocabulary wants Chinese words, so Han runs stay together and --max_piece_length bounds them.
HAN_RUN_OR_DIGIT = Regex(r"\p{Han}+|\p{N}")


@dataclass
class DomainTokenizerArguments:
    corpus: str = field(metadata={"help": "Files or directories (comma-separated) of text, conversations or "
                                          "preference pairs, in any format the stages read."})
    output_dir: str = field(metadata={"help": "Where the tokenizer goes (tokenizer.json; SentencePiece: also "
                                              "tokenizer.model)."})
    model_type: str = field(default="bpe", metadata={
        "help": "bpe / unigram: SentencePiece with byte fallback; byte_bpe: byte-level BPE.",
        "choices": ["bpe", "unigram", "byte_bpe"]})
    vocab_size: int = field(default=20000, metadata={
        "help": "Largest vocabulary; a small corpus gives fewer tokens."})
    max_piece_length: int = field(default=16, metadata={
        "help": "Longest token: in characters for SentencePiece, in bytes for byte_bpe (a Han character is 3)."})
    character_coverage: float = field(default=0.9995, metadata={
        "help": "SentencePiece: share of characters kept as tokens; the rarest fall back to bytes."})
    max_sentences: int = field(default=5_000_000, metadata={
        "help": "SentencePiece: lines sampled from a larger corpus (it trains in memory)."})
    skip_bad_records: bool = field(default=False, metadata={"help": "Skip malformed records instead of stopping."})


def train_sentencepiece(lines: Iterator[str], args: DomainTokenizerArguments) -> bytes:
    """A SentencePiece model (Llama-2 conventions: <unk>, <s>, </s>, byte fallback, no normalisation)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=model, model_type=args.model_type, vocab_size=args.vocab_size,
        hard_vocab_limit=False,  # vocab_size is a cap, as for byte-level BPE: a small corpus gives fewer pieces
        character_coverage=args.character_coverage, byte_fallback=True, split_digits=True,
        split_by_unicode_script=True, max_sentencepiece_length=args.max_piece_length,
        # identity: full-width punctuation and case stay as written (NFKC would rewrite Chinese punctuation)
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        input_sentence_size=args.max_sentences, shuffle_input_sentence=True, max_sentence_length=1 << 16,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    return model.getvalue()


def main(argv: list[str] | None = None) -> str:
    (args,) = parse_args((DomainTokenizerArguments,), argv)
    output_dir = Path(args.output_dir)
    lines = corpus_lines(args.corpus, args.skip_bad_records)
    if args.model_type == "byte_bpe":
        tokenizer = byte_level_bpe(lines, args.vocab_size, split=HAN_RUN_OR_DIGIT,
                                   max_token_length=args.max_piece_length)
    else:
        model = train_sentencepiece(lines, args)
        with tempfile.TemporaryDirectory() as tmp:  # alone in a directory, transformers converts the .model
            Path(tmp, "tokenizer.model").write_bytes(model)
            tokenizer = AutoTokenizer.from_pretrained(tmp)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "tokenizer.model").write_bytes(model)
    tokenizer.save_pretrained(output_dir)
    print(f"Saved a {args.model_type} tokenizer with {len(tokenizer)} tokens to {output_dir}")
    return str(output_dir)


if __name__ == "__main__":
    run_cli(main)

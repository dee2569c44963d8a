"""Build the embedded default model: a byte-level BPE tokenizer trained on the project's own
pretraining corpus and a small randomly initialised Qwen2 model, deterministically, in seconds.

Every stage falls back to it when no --model_name_or_path is given, so the toolkit (and its tests)
run offline on a CPU. Real users pass a hub name or a local path instead.

    python -m medicalgpt.default_model --output_dir models/medicalgpt-default --size default
"""

import argparse
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from medicalgpt.checkout import ROOT, require_checkout

CORPUS_DIR = ROOT / "data" / "pretrain" / "train"
DEFAULT_MODEL_DIR = ROOT / "models" / "medicalgpt-default"
CHATML_TEMPLATE = (Path(__file__).parent / "chat_templates" / "chatml.jinja").read_text()

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOS_TOKEN, "<|im_start|>", "<|im_end|>"]
# Each Han character and each digit is its own pre-token: on a corpus this small, byte-level BPE
# would otherwise learn whole Chinese clauses (and whole numbers) as single tokens.
HAN_OR_DIGIT = Regex(r"\p{Han}|\p{N}")

MODEL_SIZES = {
    # The demo's and the stages' default: small enough to learn the sample corpus on a CPU (sizes and timings:
    # benchmarks/README.md).
    "default": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2),
    # For benchmarks: large enough that the model's own memory shows against the runtime's.
    "large": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4),
    # For tests: the smallest that runs everywhere: head size 32 (vLLM's CPU backend rejects 16), every width a
    # multiple of 32 (bitsandbytes' CPU 4-bit kernel requires it).
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1),
}


def read_corpus(corpus_dir: Path = CORPUS_DIR) -> list[str]:
    """All non-empty lines of the .txt files in corpus_dir, in a stable order."""
    files = sorted(Path(corpus_dir).glob("*.txt"))
    if not files:
        if Path(corpus_dir) == CORPUS_DIR:
            require_checkout("The embedded default model (built when no --model_name_or_path is given)",
                             "data/pretrain/train")
        raise FileNotFoundError(f"no .txt files in {corpus_dir}: run `python data/build_sample_data.py` first")
    return [line for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


def byte_level_bpe(texts: Iterable[str], vocab_size: int, split: Regex = HAN_OR_DIGIT,
                   max_token_length: int | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ChatML special tokens trained on texts.

    split: pieces isolated before byte-level pre-tokenization (default: every Han character and every digit).
    max_token_length: the longest token, in bytes.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(split, behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS, max_token_length=max_token_length,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        additional_special_tokens=SPECIAL_TOKENS[1:], model_max_length=2048,
    )


def build_tokenizer(corpus_dir: Path = CORPUS_DIR, vocab_size: int = 8000) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with ChatML special tokens and chat template."""
    tokenizer = byte_level_bpe(read_corpus(corpus_dir), vocab_size)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_model(tokenizer: PreTrainedTokenizerFast, size: str = "default", seed: int = 0) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 model sized for CPU, with ChatML stop tokens."""
    eos_id, im_end_id = tokenizer.convert_tokens_to_ids([EOS_TOKEN, "<|im_end|>"])
    config = Qwen2Config(
        vocab_size=len(tokenizer), max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=eos_id, pad_token_id=eos_id, **MODEL_SIZES[size],
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    # Generation stops at the end of a document or of an assistant turn.
    model.generation_config = GenerationConfig(eos_token_id=[eos_id, im_end_id], pad_token_id=eos_id)
    return model


def build_default_model(output_dir: Path, size: str = "default", corpus_dir: Path = CORPUS_DIR) -> Path:
    """Build tokenizer + model and save them to output_dir atomically (a half-built dir is never seen)."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(corpus_dir)
    model = build_model(tokenizer, size)
    staging = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    os.replace(staging, output_dir)
    return output_dir


def ensure_default_model(output_dir: Path = DEFAULT_MODEL_DIR, size: str = "default") -> str:
    """Path of the default model, building it first if it is not there yet."""
    if not (Path(output_dir) / "config.json").exists():
        print(f"Building the embedded default model ({size}) in {output_dir} ...")
        build_default_model(output_dir, size)
    return str(output_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--size", choices=sorted(MODEL_SIZES), default="default")
    parser.add_argument("--corpus_dir", type=Path, default=CORPUS_DIR)
    args = parser.parse_args()
    out = build_default_model(args.output_dir, args.size, args.corpus_dir)
    model = Qwen2ForCausalLM.from_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Saved {args.size} model ({n_params / 1e6:.2f}M parameters, vocab {model.config.vocab_size}) to {out}")


if __name__ == "__main__":
    main()

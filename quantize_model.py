"""Save a bitsandbytes 4-bit (nf4 or fp4, double quantization by default) or 8-bit copy of a merged model, and
report what it costs and saves: size on disk, memory to load, and token-level perplexity on a text file before
and after (the quantized copy is reloaded from disk for the "after" numbers). Runs on a CPU (bitsandbytes >= 0.50)
or a GPU; the copy loads anywhere with --model_name_or_path, with no quantization flags.

    python quantize_model.py --model_name_or_path outputs-merged --load_in_4bit --output_dir outputs-merged-nf4
    python quantize_model.py --model_name_or_path outputs-merged --load_in_8bit --output_dir outputs-merged-int8 \
        --eval_file data/pretrain/validation --block_size 512

Perplexity is exp(total negative log-likelihood / tokens predicted) over the file's documents, joined with EOS
and cut into --block_size blocks as in pretraining.
"""

import gc
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from medicalgpt.args import DataArguments, ModelArguments, parse_args
from medicalgpt.data import build_pretraining_splits, load_splits, to_text
from medicalgpt.errors import UsageError, run_cli
from medicalgpt.evaluation import perplexity
from medicalgpt.modeling import load_for_inference, load_tokenizer, model_path

WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass
class QuantizeArguments:
    output_dir: str = field(metadata={"help": "Where the quantized model, its tokenizer and the report go."})
    eval_file: str = field(default="data/pretrain/validation", metadata={
        "help": "Text (files or directories, any pretraining format) for perplexity before and after."})
    block_size: int = field(default=512, metadata={"help": "Tokens per perplexity block."})
    max_eval_blocks: int | None = field(default=None, metadata={"help": "Evaluate on at most this many blocks."})


def eval_blocks(args: QuantizeArguments, tokenizer) -> list[list[int]]:
    """The eval text as pretraining blocks: documents joined with EOS, cut into block_size tokens."""
    data_args = DataArguments(train_file_dir=args.eval_file, validation_split_percentage=0)
    blocks = build_pretraining_splits(load_splits(data_args, to_text), tokenizer, args.block_size)["train"]
    return blocks["input_ids"][: args.max_eval_blocks]


def weights_on_disk(path: str) -> int | None:
    """Bytes of a local model directory's weight files (None for a hub name)."""
    directory = Path(path)
    if not directory.is_dir():
        return None
    return sum(f.stat().st_size for f in directory.iterdir() if f.name.endswith(WEIGHT_SUFFIXES))


def measure(model_args: ModelArguments, blocks: list[list[int]]) -> dict:
    """A model's size on disk and in memory, and its perplexity on blocks."""
    model = load_for_inference(model_args)
    # Memory: the loaded parameters and buffers. (A CPU's resident set is no measure of it: safetensors maps the
    # file, and pages count only once touched.)
    result = {"size_on_disk_bytes": weights_on_disk(model_path(model_args)),
              "memory_bytes": model.get_memory_footprint(), "perplexity": perplexity(model, blocks)}
    del model
    gc.collect()
    return result


def check_args(model_args: ModelArguments) -> None:
    if model_args.load_in_4bit == model_args.load_in_8bit:
        raise UsageError("pass one of --load_in_4bit (with --bnb_4bit_quant_type nf4|fp4) or --load_in_8bit")
    if Path(model_path(model_args), "adapter_config.json").exists():
        raise UsageError(f"{model_path(model_args)} is a LoRA adapter: merge it first (merge_peft_adapter.py)")


def print_report(report: dict) -> None:
    print(f"{report['quantization']}, perplexity over {report['eval_tokens_predicted']} predicted tokens")
    print("| | full precision | quantized | quantized / full |\n|---|---|---|---|")
    for key, unit in (("size_on_disk_bytes", 2**20), ("memory_bytes", 2**20), ("perplexity", 1)):
        a, b = report["before"][key], report["after"][key]
        shown = [f"{v / unit:.4g}" + (" MiB" if unit > 1 else "") if v is not None else "n/a" for v in (a, b)]
        print(f"| {key.removesuffix('_bytes')} | {shown[0]} | {shown[1]} | {f'{b / a:.3f}' if a and b else 'n/a'} |")


def main(argv: list[str] | None = None) -> dict:
    model_args, args = parse_args((ModelArguments, QuantizeArguments), argv)
    check_args(model_args)
    tokenizer = load_tokenizer(model_args)
    blocks = eval_blocks(args, tokenizer)
    before = measure(replace(model_args, load_in_4bit=False, load_in_8bit=False), blocks)
    model = load_for_inference(model_args)  # bitsandbytes quantizes while loading
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    del model
    # The quantized copy as anyone will load it: from disk, its quantization config in config.json.
    saved = ModelArguments(model_name_or_path=args.output_dir, dtype=model_args.dtype,
                           trust_remote_code=model_args.trust_remote_code)
    double = " double-quant" if model_args.bnb_4bit_use_double_quant else ""
    report = {"quantization": "8-bit" if model_args.load_in_8bit else f"4-bit {model_args.bnb_4bit_quant_type}{double}",
              "eval_blocks": len(blocks), "eval_tokens_predicted": sum(len(b) - 1 for b in blocks),
              "before": before, "after": measure(saved, blocks)}
    Path(args.output_dir, "quantization_report.json").write_text(json.dumps(report, indent=2))
    print_report(report)
    return report


if __name__ == "__main__":
    run_cli(main)

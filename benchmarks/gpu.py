"""GPU suite: SFT peak CUDA memory and tokens/s for LoRA (bf16), QLoRA (4-bit nf4) and full fine-tuning (bf16, with
its model FLOPs utilisation) on randomly initialised models with the shapes of real Qwen2.5 checkpoints (configs
written out here: nothing is downloaded).

Each model is saved once in bf16 with the default model's tokenizer (its ids are valid in the bigger vocabularies:
only shapes matter for memory and speed) and trained by the same runner as the CPU suite: the real
supervised_finetuning.py in a fresh process, packed rows of 512 tokens, batch 4, LoRA r8 on all linear layers,
no gradient checkpointing.
"""

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from benchmarks.training import REPO, matmul_peak_flops, run_stage
from medicalgpt.default_model import ensure_default_model

_QWEN2_5 = dict(max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6, hidden_act="silu")
# From the config.json of each Qwen/Qwen2.5-*-Instruct checkpoint.
CONFIGS = {
    "Qwen2.5-0.5B": dict(_QWEN2_5, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-1.5B": dict(_QWEN2_5, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "Qwen2.5-7B": dict(_QWEN2_5, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
METHODS = {"lora_bf16": [], "qlora_4bit": ["--load_in_4bit", "True"], "full_bf16": ["--use_peft", "False"]}


def write_random_model(config: dict, output_dir: Path) -> str:
    """A randomly initialised Qwen2 model of this shape, saved in bf16 with the default model's tokenizer."""
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a GPU initialises 7B weights in seconds
        model = AutoModelForCausalLM.from_config(Qwen2Config(**config), dtype=torch.bfloat16)
    model.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(ensure_default_model()).save_pretrained(output_dir)
    del model
    torch.cuda.empty_cache()  # the training process needs the GPU to itself (a no-op without CUDA)
    return str(output_dir)


def run_gpu_suite(quick: bool, save: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """One row per (model shape, method): peak CUDA memory (GiB), tokens/s and, for full fine-tuning, MFU
    (6·N FLOPs per real token over the measured bf16 matmul peak). A failed run (out of memory, say) is a row
    with its error, and `save` gets the rows after each run, so a long suite keeps what it measured."""
    peak = matmul_peak_flops(8192, repeats=10, device="cuda", dtype=torch.bfloat16)
    rows = []
    names = ["Qwen2.5-0.5B"] if quick else list(CONFIGS)
    for name in names:
        with tempfile.TemporaryDirectory(dir=REPO / "models") as tmp:
            model = write_random_model(CONFIGS[name], Path(tmp) / "model")
            for method, flags in METHODS.items():
                row = {"model": name, "method": method, "device": torch.cuda.get_device_name(),
                       "matmul_peak_tflops": peak / 1e12}
                try:
                    run = run_stage("supervised_finetuning", [
                        "--model_name_or_path", model, "--train_file_dir", str(REPO / "data/sft/train"),
                        "--max_length", "512", "--packing", "True", "--per_device_train_batch_size", "4",
                        "--max_steps", "3" if quick else "8", *flags], Path(tmp) / method)
                except RuntimeError as error:
                    rows.append({**row, "error": str(error)[-1500:]})
                else:
                    real_tokens_per_s = run["real_tokens"] / run["seconds"]
                    rows.append({**row, "peak_gib": run["peak_mb"] / 1024, "tokens_per_s": run["tokens_per_s"],
                                 "useful_tokens_per_s": run["useful_tokens_per_s"], "parameters": run["parameters"],
                                 "step_seconds": run["seconds"] / run["steps"],
                                 "mfu": 6 * run["parameters"] * real_tokens_per_s / peak
                                 if method.startswith("full") else None})
                save(rows)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | method | peak CUDA memory (GiB) | tokens/s | step (s) | MFU |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | failed: {r['error'].splitlines()[-1][:80]} | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else ""
        lines.append(f"| {r['model']} | {r['method']} | {r['peak_gib']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['step_seconds']:.2f} | {mfu} |")
    return "\n".join(lines)

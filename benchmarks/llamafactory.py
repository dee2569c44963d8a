"""LLaMA-Factory as a side-by-side peer: its SFT and ours on the same model, data and settings, in one run.

Both tools are measured the same way: benchmarks.training's Meter (a Trainer callback and a forward pre-hook)
rides along in each, counting the loss-bearing tokens of the batches fed to the model and timing every optimizer
step but the first (start-up, data preparation and the first step are excluded). LLaMA-Factory runs through
run_exp, the function `llamafactory-cli train CONFIG.yaml` calls, with the generated YAML.

The venv (.venv-llamafactory, git-ignored) is built once and reused: torch 2.13.0 (CPU) first, then llamafactory
from PyPI with torch pinned; PyPI's torchvision is a CUDA build that breaks imports, so it is removed, and
torchaudio (imported unconditionally) gets its CUDA-linked libraries moved aside so it loads in pure-Python mode.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.training import run_stage
from medicalgpt.data import find_data_files, iter_records, to_conversation

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-llamafactory"
PYTHON = VENV / "bin" / "python"
TORCH = "torch==2.13.0"
SFT_DATA = REPO / "data/sft/train"
# LLaMA-Factory's ShareGPT reader over OpenAI-style messages; a leading system message becomes its system prompt.
DATASET_INFO = {"medical_sft": {"file_name": "sft.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
                                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                         "assistant_tag": "assistant", "system_tag": "system"}}}
DRIVER = """
import json, sys, yaml
sys.path.insert(0, sys.argv[3])
from benchmarks.training import Meter
from llamafactory.train.tuner import run_exp
meter = Meter()
run_exp(yaml.safe_load(open(sys.argv[1])), callbacks=[meter])
open(sys.argv[2], "w").write(json.dumps(meter.result()))
"""


def pip(*args: str) -> None:
    subprocess.run([str(PYTHON), "-m", "pip", "install", "-q", *args], check=True)


def ensure_venv() -> Path:
    """The LLaMA-Factory venv, installed on first use (minutes); its python."""
    stamp = VENV / ".installed"
    if stamp.exists():
        return PYTHON
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    pip(TORCH)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraints:
        constraints.write(TORCH + "\n")
        constraints.flush()
        pip("llamafactory", "-c", constraints.name)
    subprocess.run([str(PYTHON), "-m", "pip", "uninstall", "-q", "-y", "torchvision"], check=True)
    site = Path(subprocess.run([str(PYTHON), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    for library in (site / "torchaudio").rglob("*.so"):
        library.rename(library.with_suffix(".so.cuda-disabled"))
    subprocess.run([str(PYTHON), "-c", "import llamafactory.train.tuner"], check=True)
    stamp.write_text(time.strftime("%Y-%m-%d") + "\n")
    return PYTHON


def write_dataset(folder: Path) -> None:
    """data/sft/train, read and normalised by our loader, as OpenAI-style messages for LLaMA-Factory."""
    conversations = [to_conversation(record) for path in find_data_files(str(SFT_DATA))
                     for _, record in iter_records(path)]
    assert not any(c["tools"] for c in conversations), "tool calls would need LLaMA-Factory's function format"
    (folder / "sft.jsonl").write_text("".join(json.dumps({"messages": c["messages"]}, ensure_ascii=False) + "\n"
                                              for c in conversations), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps(DATASET_INFO, indent=2))


def settings(steps: int, packing: bool) -> dict:
    """The hyperparameters both tools get."""
    return {"max_length": 512, "batch": 8, "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0,
            "lora_target": "all linear layers", "learning_rate": 1e-4, "scheduler": "linear, no warm-up",
            "steps": steps, "packing": packing, "dtype": "float32", "threads": 1, "seed": 42}


def their_config(model: str, data: Path, output_dir: Path, s: dict) -> dict:
    return {"model_name_or_path": str(Path(model).resolve()), "stage": "sft", "do_train": True,
            "finetuning_type": "lora",
            "lora_rank": s["lora_rank"], "lora_alpha": s["lora_alpha"], "lora_dropout": s["lora_dropout"],
            "lora_target": "all", "dataset": "medical_sft", "dataset_dir": str(data), "template": "chatml",
            "cutoff_len": s["max_length"], "neat_packing": s["packing"], "packing": s["packing"],
            "overwrite_cache": True, "output_dir": str(output_dir), "overwrite_output_dir": True,
            "per_device_train_batch_size": s["batch"], "gradient_accumulation_steps": 1,
            "learning_rate": s["learning_rate"], "max_steps": s["steps"], "lr_scheduler_type": "linear",
            "warmup_ratio": 0.0, "bf16": False, "fp16": False, "seed": s["seed"], "report_to": "none",
            "logging_steps": 1000, "save_strategy": "no", "plot_loss": False, "disable_tqdm": True,
            "dataloader_num_workers": 0}


def our_flags(model: str, s: dict) -> list[str]:
    return ["--model_name_or_path", model, "--train_file_dir", str(SFT_DATA), "--max_length", str(s["max_length"]),
            "--per_device_train_batch_size", str(s["batch"]), "--lora_rank", str(s["lora_rank"]),
            "--lora_alpha", str(s["lora_alpha"]), "--lora_dropout", str(s["lora_dropout"]), "--target_modules", "all",
            "--learning_rate", str(s["learning_rate"]), "--max_steps", str(s["steps"]), "--packing", str(s["packing"]),
            "--warmup_steps", "0", "--lr_scheduler_type", "linear"]  # as theirs, over configs/sft.yaml's schedule


def run_theirs(config: dict, folder: Path) -> dict:
    python = ensure_venv()
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run([str(python), "-c", DRIVER, str(folder / "config.yaml"), str(folder / "theirs.json"),
                          str(REPO)], cwd=folder, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})  # a local model: never ask the hub
    if run.returncode != 0:
        raise RuntimeError(f"LLaMA-Factory SFT failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
    return json.loads((folder / "theirs.json").read_text())


def useful_share(model: str) -> float:
    """Loss-bearing ÷ all tokens of data/sft/train as our template renders it: one count of the data, applied to
    both tools (their ChatML template marks one token more per answer as trained, which is no extra work)."""
    from transformers import AutoTokenizer

    from medicalgpt.args import SFTDataArguments
    from medicalgpt.data import build_sft_splits, load_splits
    from medicalgpt.templates import IGNORE_INDEX, resolve_template

    tokenizer = AutoTokenizer.from_pretrained(model)
    records = load_splits(SFTDataArguments(train_file_dir=str(SFT_DATA), validation_split_percentage=0),
                          to_conversation)
    labels = build_sft_splits(records, tokenizer, resolve_template(tokenizer, None), 512)["train"]["labels"]
    return sum(label != IGNORE_INDEX for row in labels for label in row[1:]) / sum(map(len, labels))


def compare(model: str, steps: dict[bool, int]) -> list[dict]:
    """Ours vs LLaMA-Factory, without and with packing (steps[packing] optimizer steps each).

    Useful tokens/s = real (non-padding) tokens/s × the data's loss-bearing share: the same definition for both.
    """
    share, rows = useful_share(model), []
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(Path(tmp))
        for packing, count in steps.items():
            s = settings(count, packing)
            theirs = run_theirs(their_config(model, Path(tmp), Path(tmp) / f"lf-{packing}", s), Path(tmp))
            ours = run_stage("supervised_finetuning", our_flags(model, s), Path(tmp) / f"ours-{packing}")
            for run in (ours, theirs):  # each tool's own label count is kept beside the common one
                run["own_useful_tokens_per_s"] = run["useful_tokens_per_s"]
                run["useful_tokens_per_s"] = run["real_tokens"] / run["seconds"] * share
            rows.append({"packing": packing, "settings": s, "useful_share": share, "ours": ours, "theirs": theirs,
                         "speedup": ours["useful_tokens_per_s"] / theirs["useful_tokens_per_s"]})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| packing | ours useful tok/s | theirs useful tok/s | ours ÷ theirs | packing eff. ours / theirs |",
             "|---|---|---|---|---|"]
    for r in rows:
        ours, theirs = r["ours"], r["theirs"]
        lines.append(f"| {r['packing']} | {ours['useful_tokens_per_s']:.0f} | {theirs['useful_tokens_per_s']:.0f} | "
                     f"{r['speedup']:.2f}x | {ours['packing_efficiency']:.2f} / {theirs['packing_efficiency']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps({"python": str(ensure_venv())}))

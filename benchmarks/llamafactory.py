"""LLaMA-Factory as a side-by-side peer: its SFT and DPO and ours on the same model, data and settings, in one run.

Both tools are measured the same way: benchmarks.training's Meter (a Trainer callback) rides along in each, timing
every optimizer step but the first (start-up, data preparation and the first step are excluded) and counting the
tokens of the batches: for SFT as the model receives them, for DPO as Trainer.training_step receives them
(LLaMA-Factory's DPO keeps the labels out of the model call). LLaMA-Factory runs through run_exp, the function
`llamafactory-cli train CONFIG.yaml` calls, with the generated YAML.

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
from medicalgpt.data import find_data_files, iter_records, to_conversation, to_preference

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-llamafactory"
PYTHON = VENV / "bin" / "python"
TORCH = "torch==2.13.0"
SFT_DATA = REPO / "data/sft/train"
DPO_DATA = REPO / "data/preference/train"
# LLaMA-Factory's ShareGPT reader over OpenAI-style messages; a leading system message becomes its system prompt.
TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
        "system_tag": "system"}
DATASET_INFO = {
    "sft": {"file_name": "sft.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"}, "tags": TAGS},
    "dpo": {"file_name": "dpo.jsonl", "formatting": "sharegpt", "ranking": True, "tags": TAGS,
            "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected"}},
}
DRIVER = """
import json, sys, yaml
sys.path.insert(0, sys.argv[3])
from benchmarks.training import Meter
from llamafactory.train.tuner import run_exp
meter = Meter(count_batches=sys.argv[4] == "dpo")
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


def write_datasets(folder: Path, sft_data: Path, dpo_data: Path) -> None:
    """SFT conversations and DPO pairs, read and normalised by our loader, as OpenAI-style messages for
    LLaMA-Factory (the pair's answers as assistant messages)."""
    def records(data: Path, convert) -> list[dict]:
        rows = [convert(record) for path in find_data_files(str(data)) for _, record in iter_records(path)]
        assert not any(row["tools"] for row in rows), "tool calls would need LLaMA-Factory's function format"
        return rows

    def write(name: str, rows: list[dict]) -> None:
        (folder / name).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                                   encoding="utf-8")

    write("sft.jsonl", [{"messages": c["messages"]} for c in records(sft_data, to_conversation)])
    write("dpo.jsonl", [{"messages": p["messages"], "chosen": {"role": "assistant", "content": p["chosen"]},
                         "rejected": {"role": "assistant", "content": p["rejected"]}}
                        for p in records(dpo_data, to_preference)])
    (folder / "dataset_info.json").write_text(json.dumps(DATASET_INFO, indent=2))


def settings(stage: str, steps: int, packing: bool = False) -> dict:
    """The hyperparameters both tools get: batch 4 for SFT, 2 pairs for DPO."""
    return {"stage": stage, "max_length": 512, "batch": 4 if stage == "sft" else 2, "lora_rank": 8,
            "lora_alpha": 16, "lora_dropout": 0.0, "lora_target": "all linear layers", "learning_rate": 1e-4,
            "scheduler": "linear, no warm-up", "steps": steps, "packing": packing, "dtype": "float32", "threads": 1,
            "seed": 42, **({"beta": 0.1, "loss": "sigmoid"} if stage == "dpo" else {})}


def their_config(model: str, data: Path, output_dir: Path, s: dict, neat_packing: bool = True) -> dict:
    """LLaMA-Factory's YAML; packed SFT rows keep samples apart with neat_packing (or cross-attend without it)."""
    stage = {"pref_beta": s["beta"], "pref_loss": s["loss"]} if s["stage"] == "dpo" else {
        "neat_packing": s["packing"] and neat_packing, "packing": s["packing"]}
    return {"model_name_or_path": str(Path(model).resolve()), "stage": s["stage"], "do_train": True,
            "finetuning_type": "lora", **stage,
            "lora_rank": s["lora_rank"], "lora_alpha": s["lora_alpha"], "lora_dropout": s["lora_dropout"],
            "lora_target": "all", "dataset": s["stage"], "dataset_dir": str(data), "template": "chatml",
            "cutoff_len": s["max_length"], "overwrite_cache": True, "output_dir": str(output_dir),
            "overwrite_output_dir": True, "per_device_train_batch_size": s["batch"], "gradient_accumulation_steps": 1,
            "learning_rate": s["learning_rate"], "max_steps": s["steps"], "lr_scheduler_type": "linear",
            "warmup_ratio": 0.0, "bf16": False, "fp16": False, "seed": s["seed"], "report_to": "none",
            "logging_steps": 1000, "save_strategy": "no", "plot_loss": False, "disable_tqdm": True,
            "dataloader_num_workers": 0}


def our_flags(model: str, data: Path, s: dict) -> list[str]:
    stage = ["--beta", str(s["beta"]), "--loss_type", s["loss"]] if s["stage"] == "dpo" else [
        "--packing", str(s["packing"])]
    return ["--model_name_or_path", model, "--train_file_dir", str(data), "--max_length", str(s["max_length"]),
            "--per_device_train_batch_size", str(s["batch"]), "--lora_rank", str(s["lora_rank"]),
            "--lora_alpha", str(s["lora_alpha"]), "--lora_dropout", str(s["lora_dropout"]), "--target_modules", "all",
            "--learning_rate", str(s["learning_rate"]), "--max_steps", str(s["steps"]), *stage,
            "--warmup_steps", "0", "--lr_scheduler_type", "linear"]  # as theirs, over the stage's YAML schedule


def run_theirs(config: dict, folder: Path) -> dict:
    python = ensure_venv()
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run([str(python), "-c", DRIVER, str(folder / "config.yaml"), str(folder / "theirs.json"),
                          str(REPO), config["stage"]], cwd=folder, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})  # a local model: never ask the hub
    if run.returncode != 0:
        raise RuntimeError(f"LLaMA-Factory {config['stage']} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
    return json.loads((folder / "theirs.json").read_text())


def data_label(data: Path) -> str:
    """The data's path inside the repository (data/sft/train), else its file name."""
    path = Path(data).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def useful_share(model: str, data: Path) -> float:
    """Loss-bearing ÷ all tokens of the SFT data as our template renders it: one count of the data, applied to both
    tools (their ChatML template marks one token more per answer as trained, which is no extra work)."""
    from transformers import AutoTokenizer

    from medicalgpt.args import SFTDataArguments
    from medicalgpt.data import build_sft_splits, load_splits
    from medicalgpt.templates import IGNORE_INDEX, resolve_template

    tokenizer = AutoTokenizer.from_pretrained(model)
    records = load_splits(SFTDataArguments(train_file_dir=str(data), validation_split_percentage=0),
                          to_conversation)
    labels = build_sft_splits(records, tokenizer, resolve_template(tokenizer, None), 512)["train"]["labels"]
    return sum(label != IGNORE_INDEX for row in labels for label in row[1:]) / sum(map(len, labels))


def compare_sft(model: str, data: Path, steps: dict[bool, int], folder: Path) -> list[dict]:
    """Unpacked and packed SFT, ours against LLaMA-Factory's unpacked and best packed mode (neat_packing, which keeps
    samples apart as ours does, or plain packing, which lets them attend to each other).

    Useful tokens/s = real (non-padding) tokens/s × the data's loss-bearing share: the same definition for both.
    """
    share, rows = useful_share(model, data), []
    for packing, count in steps.items():
        s = settings("sft", count, packing)
        theirs = {"neat_packing" if packing else "unpacked": run_theirs(
            their_config(model, folder, folder / "lf", s), folder)}
        if packing:
            theirs["packing"] = run_theirs(their_config(model, folder, folder / "lf", s, neat_packing=False), folder)
        ours = run_stage("supervised_finetuning", our_flags(model, data, s), folder / f"ours-sft-{packing}")
        for run in (ours, *theirs.values()):  # each tool's own label count is kept beside the common one
            run["own_useful_tokens_per_s"] = run["useful_tokens_per_s"]
            run["useful_tokens_per_s"] = run["real_tokens"] / run["seconds"] * share
        best = max(theirs, key=lambda mode: theirs[mode]["useful_tokens_per_s"])
        rows.append({"stage": "sft", "data": data_label(data), "packing": packing, "settings": s, "useful_share": share,
                     "ours": ours, "theirs": theirs[best], "their_mode": best, "their_runs": theirs,
                     "speedup": ours["useful_tokens_per_s"] / theirs[best]["useful_tokens_per_s"]})
    return rows


def compare_dpo(model: str, data: Path, steps: int, folder: Path) -> dict:
    """DPO, ours (with and without --half_batches) against LLaMA-Factory's, each counting its own loss-bearing
    (answer) tokens: what each keeps of a long pair is part of what is measured."""
    s = settings("dpo", steps)
    theirs = run_theirs(their_config(model, folder, folder / "lf", s), folder)
    ours, half = (run_stage("dpo_training", [*our_flags(model, data, s), "--half_batches", str(on)],
                            folder / f"ours-dpo-{on}", count_batches=True) for on in (False, True))
    return {"stage": "dpo", "data": data_label(data), "settings": s, "ours": ours, "ours_half_batches": half,
            "theirs": theirs, "speedup": ours["useful_tokens_per_s"] / theirs["useful_tokens_per_s"],
            "total_speedup": ours["tokens_per_s"] / theirs["tokens_per_s"],
            "step_speedup": theirs["step_seconds"] / ours["step_seconds"]}


def compare(model: str, steps: dict[str, int], sft_data: list[Path] = (SFT_DATA,),
            dpo_data: list[Path] = (DPO_DATA,)) -> list[dict]:
    """Ours vs LLaMA-Factory on each SFT and DPO dataset; steps: optimizer steps for "sft", "sft_packed", "dpo"."""
    rows = []
    for sft, dpo in zip(sft_data, dpo_data, strict=True):
        with tempfile.TemporaryDirectory() as tmp:
            write_datasets(Path(tmp), sft, dpo)
            rows += compare_sft(model, sft, {False: steps["sft"], True: steps["sft_packed"]}, Path(tmp))
            rows.append(compare_dpo(model, dpo, steps["dpo"], Path(tmp)))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| data | run | ours useful tok/s | theirs useful tok/s | ours ÷ theirs | ours / theirs total tok/s | "
             "ours / theirs s/step | their mode |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours, theirs = r["ours"], r["theirs"]
        run = "DPO" if r["stage"] == "dpo" else f"SFT {'packed' if r['packing'] else 'unpacked'}"
        lines.append(f"| {r['data']} | {run} | {ours['useful_tokens_per_s']:.0f} | "
                     f"{theirs['useful_tokens_per_s']:.0f} | {r['speedup']:.2f}x | {ours['tokens_per_s']:.0f} / "
                     f"{theirs['tokens_per_s']:.0f} | {ours['step_seconds']:.2f} / {theirs['step_seconds']:.2f} | "
                     f"{r.get('their_mode', '')} |")
        if r["stage"] == "dpo":
            half = r["ours_half_batches"]
            lines.append(f"| {r['data']} | DPO --half_batches True | {half['useful_tokens_per_s']:.0f} | | | "
                         f"{half['tokens_per_s']:.0f} | {half['step_seconds']:.2f} | training peak "
                         f"{half['train_peak_mb']:.0f} vs {ours['train_peak_mb']:.0f} MB |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(json.dumps({"python": str(ensure_venv())}))

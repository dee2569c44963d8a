"""Memorisation audit: does a model trained on patient records repeat them? (canary exposure and extraction)

Inserts canary records (a fake patient's mobile number, random per canary) into a background corpus at the given
repetition counts, fully fine-tunes the model on it with the pretraining stage, then measures each canary's exposure
(rank of its true secret among --candidates random ones, by model likelihood) and extraction (greedy and sampled
completions of the record's prefix that reproduce the secret). With --compare_deidentified the same set is trained
again with --deidentify, which masks the phone numbers: exposure should fall to chance (about 1 bit).

    python audit_memorization.py --output_dir outputs-audit --repetitions 1,8,32 --compare_deidentified
"""

import argparse
import json
import math
from itertools import islice
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from medicalgpt.data.corpus import corpus_lines
from medicalgpt.errors import UsageError, run_cli
from medicalgpt.memorization import audit, make_canaries, summarise, training_lines
from tools.scripts import script_main


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model_name_or_path", help="the model to fine-tune (default: the embedded default model)")
    parser.add_argument("--output_dir", default="outputs-audit", help="training sets, models and report.json")
    parser.add_argument("--background", default="data/pretrain/train", help="files or directories of background "
                        "records (any format the stages read; their text is used)")
    parser.add_argument("--background_lines", type=int, default=400, help="background lines to train on")
    parser.add_argument("--repetitions", default="1,8,32", help="comma-separated insertion counts of the canaries")
    parser.add_argument("--canaries_per_count", type=int, default=2, help="canaries per repetition count")
    parser.add_argument("--candidates", type=int, default=1000, help="secrets a canary's is ranked among")
    parser.add_argument("--samples", type=int, default=16, help="sampled completions per canary (temperature 1)")
    parser.add_argument("--max_steps", type=int, default=300, help="training steps (full fine-tuning)")
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare_deidentified", action="store_true", help="also train on the de-identified set "
                        "(--deidentify) and audit that model")
    args = parser.parse_args(argv)
    try:
        args.repetitions = [int(count) for count in args.repetitions.split(",")]
    except ValueError:
        raise UsageError(f"--repetitions {args.repetitions}: expected comma-separated counts, e.g. 1,8,32") from None
    if args.candidates < 2 or min(args.repetitions) < 1:
        raise UsageError("--candidates must be at least 2 and every --repetitions count at least 1")
    return args


def train(args: argparse.Namespace, train_file: Path, run_dir: Path, deidentify: bool) -> None:
    """Full fine-tuning through the pretraining stage (so --deidentify takes the stages' own path)."""
    model = ["--model_name_or_path", args.model_name_or_path] if args.model_name_or_path else []
    script_main("pretraining")([*model, "--output_dir", str(run_dir), "--train_file_dir", str(train_file),
                      "--validation_split_percentage", "0", "--use_peft", "False", "--max_steps", str(args.max_steps),
                      "--learning_rate", str(args.learning_rate), "--per_device_train_batch_size",
                      str(args.batch_size), "--block_size", str(args.block_size), "--seed", str(args.seed),
                      "--report_to", "none", "--save_strategy", "no", "--logging_steps", "50", "--disable_tqdm",
                      "True", "--overwrite_output_dir", *(["--deidentify"] if deidentify else [])])


def main(argv: list[str] | None = None) -> dict:
    args = parse_arguments(argv)
    output = Path(args.output_dir)
    canaries = make_canaries(args.repetitions, args.canaries_per_count, args.seed)
    background = list(islice(corpus_lines(args.background), args.background_lines))
    train_file = output / "train" / "canaries.txt"
    train_file.parent.mkdir(parents=True, exist_ok=True)
    train_file.write_text("\n".join(training_lines(background, canaries, args.seed)) + "\n", encoding="utf-8")
    report = {}
    for run, deidentify in (("raw", False), ("deidentified", True))[: 2 if args.compare_deidentified else 1]:
        run_dir = output / run
        train(args, train_file, run_dir, deidentify)
        model = AutoModelForCausalLM.from_pretrained(run_dir)
        rows = audit(model, AutoTokenizer.from_pretrained(run_dir), canaries, args.candidates, args.samples,
                     args.seed)
        report[run] = {"canaries": rows, "by_repetitions": summarise(rows)}
    (output / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"| training set | repetitions | canaries | mean exposure (bits; max log2({args.candidates}) = "
          f"{math.log2(args.candidates):.2f}) | greedy extracted | sampled extracted (of {args.samples} per canary) |"
          "\n|---|---|---|---|---|---|")
    for run, result in report.items():
        for count, row in result["by_repetitions"].items():
            print(f"| {run} | {count} | {row['canaries']} | {row['mean_exposure']:.2f} | {row['greedy_extracted']} | "
                  f"{row['sampled_extracted']} |")
    return {run: result["by_repetitions"] for run, result in report.items()}


if __name__ == "__main__":
    run_cli(main)

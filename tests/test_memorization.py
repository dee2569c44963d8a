"""Memorisation audit: canary exposure rises with repetitions after full fine-tuning of the tiny model, and falls
to chance when the training set is de-identified (--deidentify masks the canaries' phone numbers)."""

import math

import pytest

import audit_memorization
from medicalgpt.errors import run_cli
from medicalgpt.memorization import Canary, make_canaries, training_lines
from medicalgpt.privacy import default_deidentifier


def test_canaries_are_inserted_their_number_of_times_and_masked_by_deidentification():
    canaries = make_canaries([1, 8], per_count=2, seed=3)
    assert [c.repetitions for c in canaries] == [1, 1, 8, 8] and len({c.secret for c in canaries}) == 4
    lines = training_lines(["background"] * 5, canaries)
    assert sorted(lines.count(c.text) for c in canaries) == [1, 1, 8, 8] and len(lines) == 23
    canary = Canary(index=7, secret="01234567", repetitions=1)
    assert canary.text.startswith(canary.prefix) and canary.text[len(canary.prefix):].startswith("01234567")
    clean, found = default_deidentifier().deidentify_record({"text": canary.text})
    assert "01234567" not in clean["text"] and [span.kind for _, span in found] == ["PHONE"]


def test_exposure_rises_with_repetitions_and_falls_after_deidentification(tiny_model_dir, tmp_path, capsys):
    candidates = 200
    result = audit_memorization.main([
        "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path), "--repetitions", "1,8,32",
        "--canaries_per_count", "2", "--background_lines", "40", "--max_steps", "80", "--block_size", "64",
        "--candidates", str(candidates), "--samples", "4", "--compare_deidentified"])
    raw = {count: row["mean_exposure"] for count, row in result["raw"].items()}
    clean = {count: row["mean_exposure"] for count, row in result["deidentified"].items()}
    assert raw[1] < raw[8] < raw[32] and raw[32] > 0.9 * math.log2(candidates), raw
    assert max(clean.values()) < 3 and clean[32] < raw[32] - 4, clean  # chance: about 1.4 bits on average
    assert result["deidentified"][32]["greedy_extracted"] == 0
    assert "| raw | 32 | 2 |" in capsys.readouterr().out and (tmp_path / "report.json").is_file()


@pytest.mark.parametrize("argv, message", [(["--repetitions", "1,x"], "expected comma-separated counts"),
                                           (["--candidates", "1"], "--candidates must be at least 2")])
def test_bad_audit_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: audit_memorization.main(argv))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err

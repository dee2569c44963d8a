"""--streaming for PT and SFT: the same samples as the Arrow path, --max_steps required, and a resumed run that
continues from its position in the stream."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from datasets import DatasetDict, IterableDatasetDict
from safetensors.torch import load_file

import pretraining
import supervised_finetuning
from medicalgpt.data import (
    DataError,
    build_pretraining_splits,
    build_sft_splits,
    load_splits,
    pack_sft_splits,
    to_conversation,
    to_text,
)
from medicalgpt.errors import UsageError
from medicalgpt.templates import get_template


def data_args(path: str, streaming: bool) -> SimpleNamespace:
    return SimpleNamespace(train_file_dir=path, validation_file_dir=None, dataset_name=None, dataset_config_name=None,
                           validation_split_percentage=0.0, max_train_samples=None, max_eval_samples=None,
                           skip_bad_records=False, deidentify=False, streaming=streaming)


def rows(split) -> list[tuple]:
    """A split's rows in a canonical order (the stream comes shuffled)."""
    return sorted(tuple(tuple(value) for value in row.values()) for row in split)


def test_streamed_samples_equal_the_arrow_path(tokenizer):
    sft = {streaming: build_sft_splits(load_splits(data_args("data/sft/validation", streaming), to_conversation),
                                       tokenizer, get_template("chatml"), max_length=64) for streaming in (False, True)}
    assert isinstance(sft[True], IterableDatasetDict) and isinstance(sft[False], DatasetDict)
    assert rows(sft[True]["train"]) == rows(sft[False]["train"])  # every sample, encoded the same, none lost
    packed = {streaming: pack_sft_splits(splits, 64)["train"] for streaming, splits in sft.items()}
    lengths = {streaming: sorted(n for row in split for n in row["seq_lengths"]) for streaming, split in packed.items()}
    assert lengths[True] == lengths[False] and all(len(row["input_ids"]) <= 64 for row in packed[True])
    pt = {streaming: build_pretraining_splits(load_splits(data_args("data/pretrain/validation", streaming), to_text),
                                              tokenizer, block_size=32)["train"] for streaming in (False, True)}
    tokens = {streaming: sorted(t for row in split for t in row["input_ids"]) for streaming, split in pt.items()}
    assert tokens[True] == tokens[False]


def test_streaming_needs_max_steps(tmp_path):
    with pytest.raises(UsageError, match="--streaming reads data of unknown length: pass --max_steps"):
        pretraining.main(["--train_file_dir", "data/pretrain/validation", "--output_dir", str(tmp_path),
                          "--streaming", "True"])


@pytest.mark.parametrize("stage, data", [
    (pretraining, ["--train_file_dir", "data/pretrain/validation", "--block_size", "64"]),
    (supervised_finetuning, ["--train_file_dir", "data/sft/validation", "--max_length", "128", "--packing", "True"]),
])
def test_a_resumed_stream_continues_where_it_stopped(stage, data, tiny_model_dir, tmp_path):
    def run(output_dir, *extra):
        stage.main(["--model_name_or_path", tiny_model_dir, *data, "--output_dir", str(output_dir), "--streaming",
                    "True", "--use_peft", "False", "--learning_rate", "5e-3", "--per_device_train_batch_size", "2",
                    "--report_to", "none", "--disable_tqdm", "True", "--save_strategy", "steps", "--save_steps", "2",
                    "--max_steps", "4", *extra])

    run(tmp_path / "straight")
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    run(tmp_path / "resumed", "--resume_from_checkpoint", "auto")
    straight, resumed = (load_file(tmp_path / d / "model.safetensors") for d in ("straight", "resumed"))
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=1e-6, rtol=0)
    # Steps 3-4 on the stream's first batches again (what skipping nothing does) end elsewhere.
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "from_start" / "checkpoint-2")
    run(tmp_path / "from_start", "--resume_from_checkpoint", "auto", "--ignore_data_skip", "True")
    assert not torch.allclose(load_file(tmp_path / "from_start" / "model.safetensors")["model.norm.weight"],
                              straight["model.norm.weight"])


def test_records_skipped_from_a_stream_are_reported(tmp_path, caplog):
    good = {"text": "doc"}
    (tmp_path / "pt.jsonl").write_text("\n".join([json.dumps(good), "not json", json.dumps(good)]) + "\n")
    args = data_args(str(tmp_path / "pt.jsonl"), streaming=True)
    args.skip_bad_records = True
    assert len(list(load_splits(args, to_text)["train"])) == 2
    assert "Skipped 1 bad records of" in caplog.text and "pt.jsonl:2: invalid JSON" in caplog.text
    args.skip_bad_records = False
    with pytest.raises(DataError, match=r"pt\.jsonl:2: invalid JSON"):
        list(load_splits(args, to_text)["train"])

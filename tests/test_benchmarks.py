"""The benchmark suite's quick run: every section runs and writes sane numbers (no timing assertions)."""

import json

import pytest
import torch

from benchmarks import gpu, llamafactory, preprocessing, run
from benchmarks.training import batch_tokens


def test_batch_tokens_counts_padding_and_loss_tokens():
    padded = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 0],
                                                                                                [1, 1, 1, 1]]),
              "labels": torch.tensor([[-100, 5, 6, -100], [7, -100, 8, 9]])}
    assert batch_tokens(padded) == (8, 7, 4)  # column 0 is never predicted
    # Packed rows: position ids restart per sample; right padding has position 0.
    packed = {"input_ids": torch.zeros(2, 5, dtype=torch.long),
              "position_ids": torch.tensor([[0, 1, 0, 1, 2], [0, 1, 2, 0, 0]]),
              "labels": torch.tensor([[-100, 1, -100, 1, 1], [-100, -100, 1, -100, -100]])}
    assert batch_tokens(packed) == (10, 8, 4)
    # LLaMA-Factory's neat packing: an additive 4D mask, padding masked even from itself.
    additive = torch.full((2, 1, 4, 4), torch.finfo(torch.float32).min).triu(1)
    additive[1, :, 3, :] = torch.finfo(torch.float32).min
    assert batch_tokens({**padded, "attention_mask": additive}) == (8, 7, 4)
    # An on-policy batch: left-padded prompts, then generated answers (right-padded); only the answers train.
    on_policy = {"prompt_ids": torch.zeros(2, 3, dtype=torch.long), "prompt_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
                 "completion_ids": torch.zeros(2, 2, dtype=torch.long),
                 "completion_mask": torch.tensor([[1, 1], [1, 0]])}
    assert batch_tokens(on_policy) == (10, 8, 3)


def test_quick_cpu_suite(tmp_path):
    result = run.main(["--suite", "cpu", "--quick", "--output_file", str(tmp_path / "cpu.json")])
    assert json.loads((tmp_path / "cpu.json").read_text()) == json.loads(json.dumps(result))

    rows = result["sft"]["rows"]
    assert [(r["method"], r["packing"]) for r in rows] == [("lora", False), ("lora", True), ("full", False),
                                                           ("full", True)]
    for r in rows:
        assert 0 < r["packing_efficiency"] <= 1 and r["tokens_per_s"] > 0 and r["peak_mb"] > 0
        assert 0 < r["useful_tokens"] <= r["real_tokens"] <= r["tokens"]
    assert rows[1]["packing_efficiency"] > rows[0]["packing_efficiency"]
    assert rows[0]["trainable_parameters"] < rows[2]["trainable_parameters"] == rows[2]["parameters"]

    mfu = result["mfu"]
    assert mfu["matmul_peak_gflops"] > 0 and all(0 < r["mfu"] for r in mfu["rows"])
    assert sum(mfu["profile"]["share"].values()) == pytest.approx(1, abs=0.01)

    stages = {r["config"]: r for r in result["stages"]["rows"]}
    assert set(stages) == {"sft", "pt", "dpo", "dpo_half_batches", "dpo_precomputed_ref", "rm", "distill"}
    assert stages["sft"]["step_vs_sft"] == 1 and all(r["step_seconds"] > 0 for r in stages.values())
    assert all(r["tokens_per_step"] > 0 for r in stages.values())

    files = len(list(preprocessing.SHIPPED.glob("*.jsonl")))  # the 1,000 quick records, split evenly over them
    (prepared,) = result["preprocessing"]["rows"]
    assert prepared["records"] == 1000 // files * files and prepared["template_records_per_s"] > 0
    assert prepared["second_s"] < prepared["first_s"]  # the second run reads the cache
    assert result["preprocessing"]["evaluation"]["eval_sorted_tokens_per_s"] > 0
    assert [r["batch_size"] for r in result["generation"]["rows"]] == [1, 4]
    assert all("met" in t for section in ("sft", "mfu", "stages", "generation")
               for t in result[section]["targets"].values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_gpu_suite_fails_fast_without_cuda(tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        run.main(["--suite", "gpu", "--output_file", str(tmp_path / "gpu.json")])
    assert not (tmp_path / "gpu.json").exists()


def test_unknown_section_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--sections", "sft,sftt"])
    assert exit_info.value.code == 2 and "--sections: unknown sftt" in capsys.readouterr().err


def test_gpu_suite_shapes_build(tmp_path):
    config = {**gpu.CONFIGS["Qwen2.5-0.5B"], "num_hidden_layers": 1, "vocab_size": 8192}
    path = gpu.write_random_model(config, tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert (saved["hidden_size"], saved["num_key_value_heads"], saved["dtype"]) == (896, 2, "bfloat16")
    assert (tmp_path / "model" / "tokenizer.json").exists() and path.endswith("model")


def test_llamafactory_gets_our_settings(tmp_path):
    pairs = [("cutoff_len", "--max_length"), ("per_device_train_batch_size", "--per_device_train_batch_size"),
             ("lora_rank", "--lora_rank"), ("lora_alpha", "--lora_alpha"), ("lora_dropout", "--lora_dropout"),
             ("learning_rate", "--learning_rate"), ("max_steps", "--max_steps")]
    stage_pairs = {"sft": [("neat_packing", "--packing")],
                   "dpo": [("pref_beta", "--beta"), ("pref_loss", "--loss_type")]}
    for stage, data in (("sft", llamafactory.SFT_DATA), ("dpo", llamafactory.DPO_DATA)):
        settings = llamafactory.settings(stage, steps=5, packing=stage == "sft")
        theirs = llamafactory.their_config("m", tmp_path, tmp_path / "out", settings)
        ours = llamafactory.our_flags("m", data, settings)
        flag = dict(zip(ours[::2], ours[1::2], strict=True))
        assert all(str(theirs[key]) == flag[ours_key] for key, ours_key in pairs + stage_pairs[stage])
        assert theirs["stage"] == theirs["dataset"] == stage and theirs["bf16"] is theirs["fp16"] is False
    llamafactory.write_datasets(tmp_path, llamafactory.SFT_DATA, llamafactory.DPO_DATA)
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    for stage, data, count in (("sft", llamafactory.SFT_DATA, 1450), ("dpo", llamafactory.DPO_DATA, 400)):
        shipped = sum(1 for path in data.glob("*.jsonl") for _ in path.open())
        written = [json.loads(line) for line in (tmp_path / info[stage]["file_name"]).open()]
        assert len(written) == shipped == count
    assert written[0]["chosen"]["role"] == "assistant" and written[0]["messages"][-1]["role"] == "user"


def test_dpo_half_batches_give_the_whole_batch_outputs_and_gradients(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from medicalgpt.trainers import _HalfBatches

    def model_with_dropout(dropout: float):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))
        config = LoraConfig(r=4, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "down_proj"],
                            init_lora_weights=False)
        return get_peft_model(base, config).train()

    def log_probs_and_grads(model, call):
        torch.manual_seed(1)
        log_probs = call(model)
        (log_probs * weights).sum().backward()
        return log_probs.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    ids = torch.randint(3, 200, (4, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = mask[3, 7:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100),
              "fused_lm_head": True, "use_cache": False}
    weights = torch.randn(4, 11)
    halves = lambda model: _HalfBatches(model)(**inputs).log_probs  # noqa: E731
    whole = lambda model: model(**inputs).log_probs  # noqa: E731
    expected, expected_grads = log_probs_and_grads(model_with_dropout(0.0), whole)
    got, grads = log_probs_and_grads(model_with_dropout(0.0), halves)
    torch.testing.assert_close(got, expected)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    # With dropout on, the recomputed forward must draw the same masks as the one the loss saw.
    sequential = lambda model: torch.cat([model(**{k: v[i:i + 2] if torch.is_tensor(v) else v  # noqa: E731
                                                     for k, v in inputs.items()}).log_probs for i in (0, 2)])
    expected, expected_grads = log_probs_and_grads(model_with_dropout(0.5), sequential)
    got, grads = log_probs_and_grads(model_with_dropout(0.5), halves)
    torch.testing.assert_close(got, expected)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_compare_section_is_wired(tmp_path, monkeypatch):
    measured = {"useful_tokens_per_s": 2.0, "tokens_per_s": 3.0, "step_seconds": 1.0, "train_peak_mb": 5.0}
    theirs = {**measured, "useful_tokens_per_s": 1.0}
    fake = [{"stage": "sft", "data": "train", "packing": True, "ours": measured, "theirs": theirs, "speedup": 2.0,
             "their_mode": "neat_packing"},
            {"stage": "dpo", "data": "train", "ours": measured, "ours_half_batches": measured, "theirs": theirs,
             "speedup": 2.0, "total_speedup": 1.0, "step_speedup": 0.9}]
    monkeypatch.setattr(llamafactory, "compare", lambda model, steps, sft_data, dpo_data: fake)
    result = run.main(["--quick", "--sections", "preprocessing", "--compare", "llamafactory",
                       "--output_file", str(tmp_path / "cpu.json")])
    targets = result["compare_llamafactory"]["targets"]
    assert targets["sft_packed_useful_vs_their_best_packed"]["met"] and targets["dpo_useful_tokens_per_s"]["met"]
    assert not targets["dpo_step_speed"]["met"]
    assert set(json.loads((tmp_path / "cpu.json").read_text())) >= {"preprocessing", "compare_llamafactory"}


def test_gpu_suite_keeps_going_past_a_failed_run(tmp_path, monkeypatch):
    """An out-of-memory run is a row with its error; the rows so far are saved after every run."""
    def fake_run_stage(stage, flags, output_dir):
        if "--load_in_4bit" in flags:
            raise RuntimeError("supervised_finetuning failed:\ntorch.OutOfMemoryError: CUDA out of memory")
        return {"peak_mb": 2048, "tokens_per_s": 1000.0, "useful_tokens_per_s": 300.0, "parameters": 1_000_000,
                "real_tokens": 8000, "seconds": 4.0, "steps": 8}

    monkeypatch.setattr(gpu, "REPO", tmp_path)
    (tmp_path / "models").mkdir()
    monkeypatch.setattr(gpu, "write_random_model", lambda config, output_dir: str(output_dir))
    monkeypatch.setattr(gpu, "run_stage", fake_run_stage)
    monkeypatch.setattr(gpu, "matmul_peak_flops", lambda *args, **kwargs: 1e12)
    monkeypatch.setattr(gpu.torch.cuda, "get_device_name", lambda: "fake GPU")
    saved = []
    rows = gpu.run_gpu_suite(quick=True, save=lambda rows: saved.append(len(rows)))
    assert saved == [1, 2, 3] and [r["method"] for r in rows] == ["lora_bf16", "qlora_4bit", "full_bf16"]
    assert "CUDA out of memory" in rows[1]["error"] and rows[0]["mfu"] is None
    assert rows[2]["mfu"] == pytest.approx(6 * 1_000_000 * 2000 / 1e12)  # 6·N·(8000 real tokens / 4 s) / peak
    assert "failed: torch.OutOfMemoryError: CUDA out of memory" in gpu.table(rows)

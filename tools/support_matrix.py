"""The model families the stages are verified on, and the "Supported models" table of docs/models.md
built from that run.

Each family is a tiny random model made from transformers' own config class (nothing is downloaded) with the
embedded default tokenizer. It goes through the stage scripts in-process: two steps of LoRA SFT on all linear
layers, one DPO step, one reward-model step on a sequence-classification head (where the architecture has one),
adapter merge and reload, and greedy generation from the merged model and from base + adapter.
tests/test_model_families.py runs the same matrix and checks that docs/models.md shows its results.

    python -m tools.support_matrix    # runs the matrix (half a minute on a CPU), rewrites docs/models.md's table
"""

import contextlib
import io
import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoModelForSequenceClassification

from medicalgpt.errors import UsageError
from medicalgpt.templates import get_template
from tools.scripts import script_main

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS_PAGE = REPO_ROOT / "docs" / "models.md"
START, END = "<!-- models:start -->\n", "<!-- models:end -->"

# Shared by every family: 2 layers of width 64, head size 32. MoE families add 4 experts, 2 active per token.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=32, max_position_embeddings=512)
EXPERTS = dict(num_experts_per_tok=2, moe_intermediate_size=32)
# DeepSeek-style MoE: a dense first layer, one shared expert, one routing group.
DEEPSEEK_MOE = dict(EXPERTS, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1)
# DeepSeek's multi-head latent attention: every head has its own keys and values (no grouping), and RoPE runs on
# the qk_rope_head_dim part of each head.
LATENT_ATTENTION = dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32,
                        head_dim=16, num_key_value_heads=2)
# peft 0.21 moves DeepSeek-style gate/up/down_proj targets onto the fused expert parameters, whose LoRA wrapper
# (ParamWrapper) refuses dropout.
NO_DROPOUT = ("--lora_dropout", "0")
STAGES = ("sft", "dpo", "rm", "merge", "generate")
# One or two steps on the trainers' own schedule: the stage configs' warm-up would leave the adapter at zero.
FAST = ["--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True", "--logging_steps", "1",
        "--per_device_train_batch_size", "4", "--validation_split_percentage", "0", "--lora_rank", "4",
        "--learning_rate", "1e-2", "--warmup_steps", "0", "--lr_scheduler_type", "linear", "--seed", "0"]
PROMPT = "高血压用什么药？"


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # transformers' config key
    template: str | None = None  # the built-in template (--template_name) of its chat checkpoints; None: none yet
    config: dict = field(default_factory=dict)  # config values beyond TINY
    moe_block: str | None = None  # the MoE block class: a DeepSpeed ZeRO-3 leaf module (configs/)
    flags: tuple[str, ...] = ()  # training flags the family needs beyond the defaults


FAMILIES = (
    Family("Llama", "llama", "llama3"),
    Family("Mistral", "mistral", "mistral"),
    Family("Mixtral", "mixtral", "mistral", dict(num_local_experts=4, num_experts_per_tok=2), "MixtralSparseMoeBlock"),
    Family("Qwen2", "qwen2", "qwen"),
    Family("Qwen2-MoE", "qwen2_moe", "qwen", dict(EXPERTS, num_experts=4, shared_expert_intermediate_size=64),
           "Qwen2MoeSparseMoeBlock"),
    Family("Qwen3", "qwen3", "chatml"),
    Family("Qwen3-MoE", "qwen3_moe", "chatml", dict(EXPERTS, num_experts=4), "Qwen3MoeSparseMoeBlock"),
    Family("Gemma 2", "gemma2"),
    Family("Gemma 3", "gemma3_text"),
    Family("Phi-3", "phi3"),
    Family("GLM-4", "glm4"),
    Family("DeepSeek-V3", "deepseek_v3", None, dict(DEEPSEEK_MOE, **LATENT_ATTENTION), "DeepseekV3MoE", NO_DROPOUT),
    Family("GLM-4-MoE", "glm4_moe", None, DEEPSEEK_MOE, "Glm4MoeMoE", NO_DROPOUT),
)
# Architectures whose code ships with the checkpoint (--trust_remote_code): not run here, trained through their
# built-in chat template (tests/test_templates.py checks it token for token against the published format).
REMOTE_CODE_FAMILIES = (("ChatGLM3", "chatglm3"), ("Baichuan2", "baichuan2"), ("InternLM2", "internlm2"))


@dataclass
class FamilyResult:
    family: Family
    stages: dict[str, str] = field(default_factory=dict)  # stage -> "ok", "n/a" or the error
    lora_targets: list[str] = field(default_factory=list)  # modules the SFT adapter adapts
    lora_parameters: list[str] = field(default_factory=list)  # fused expert parameters it adapts (target_parameters)
    aux_loss_logged: dict[str, bool] = field(default_factory=dict)  # stage -> the router aux loss was in its logs

    @property
    def passed(self) -> bool:
        return all(status in ("ok", "n/a") for status in self.stages.values())


def build_family_model(family: Family, tokenizer, output_dir: Path) -> str:
    """A tiny random model of the family, saved with the shared tokenizer."""
    eos_id = tokenizer.eos_token_id
    config = CONFIG_MAPPING[family.model_type](**{**TINY, **family.config}, vocab_size=len(tokenizer),
                                               bos_token_id=None, eos_token_id=eos_id, pad_token_id=eos_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return str(output_dir)


def write_data(directory: Path) -> dict[str, str]:
    """Small SFT and preference files cut from the sample data, so every stage reads only a few records."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, source, count in (("sft", "data/sft/train/sharegpt_medical.jsonl", 8),
                                ("pairs", "data/preference/train/preference_medical.jsonl", 4)):
        lines = (REPO_ROOT / source).read_text(encoding="utf-8").splitlines()[:count]
        paths[kind] = str(directory / f"{kind}.jsonl")
        Path(paths[kind]).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def _logged_aux_loss(output_dir: Path) -> bool:
    """Whether a finished training run logged the MoE router auxiliary loss."""
    state = output_dir / "trainer_state.json"
    if not state.exists():
        return False
    history = json.loads(state.read_text())["log_history"]
    return any("aux_loss" in entry for entry in history)


def _train(stage: str, base: str, output_dir: Path, flags: list[str]) -> None:
    """A stage script's main() on the family's model; its training loss must be a number."""
    metrics = script_main(stage)(
        ["--model_name_or_path", base, "--output_dir", str(output_dir), *FAST, *flags])
    if not math.isfinite(metrics["train_loss"]):
        raise RuntimeError(f"train_loss is {metrics['train_loss']}")


def _merge_and_reload(base: str, adapter: Path, merged: Path) -> None:
    """The merged model, reloaded without peft, computes what base + adapter computes (and the adapter matters)."""
    from peft import PeftModel

    script_main("merge_peft_adapter")(["--base_model", base, "--lora_model", str(adapter), "--output_dir", str(merged)])
    ids = torch.tensor([list(range(1, 17))])
    with torch.no_grad():
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
        expected = tuned(ids).logits
        with tuned.disable_adapter():
            untouched = tuned(ids).logits
        reloaded = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
    if not (reloaded - expected).abs().max() < 1e-4 < (untouched - expected).abs().max():
        raise RuntimeError("the merged model does not reproduce base + adapter")


def _answer(model_flags: list[str]) -> str:
    """inference.py's greedy answer to PROMPT.

    The repetition penalty keeps random models with tied embeddings (Gemma) from echoing the prompt's last token, a
    newline, which would leave an empty answer that any broken path could match.
    """
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        script_main("inference")([*model_flags, "--prompt", PROMPT, "--temperature", "0", "--max_new_tokens", "6",
                        "--repetition_penalty", "2"])
    return printed.getvalue().splitlines()[-1]


def _generate(base: str, adapter: Path, merged: Path) -> None:
    """The merged model and base + adapter give the same non-empty greedy answer."""
    merged_answer = _answer(["--base_model", str(merged)])
    adapter_answer = _answer(["--base_model", base, "--lora_model", str(adapter)])
    if not merged_answer.strip() or merged_answer != adapter_answer:
        raise RuntimeError(f"answers: merged {merged_answer!r}, base + adapter {adapter_answer!r}")


def _run_stage(result: FamilyResult, stage: str, run, done: str = "ok") -> None:
    """Record a stage as done, or as failed with its one-line error (the traceback goes to the log)."""
    try:
        run()
        result.stages[stage] = done
    except Exception as error:  # the matrix reports every family, whichever stage breaks
        logger.exception("%s: %s failed", result.family.name, stage)
        result.stages[stage] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def run_family(family: Family, tokenizer, workdir: Path, data: dict) -> FamilyResult:
    """Every stage on one family; a stage the architecture cannot run must refuse it with a UsageError."""
    result, base = FamilyResult(family), build_family_model(family, tokenizer, workdir / "base")
    sft, dpo, rm, merged = (workdir / stage for stage in ("sft", "dpo", "rm", "merged"))
    chats = ["--train_file_dir", data["sft"], "--max_steps", "2", "--max_length", "128", "--packing", "False",
             *family.flags]
    pairs = ["--train_file_dir", data["pairs"], "--max_steps", "1", "--max_length", "128", *family.flags]
    _run_stage(result, "sft", lambda: _train("supervised_finetuning", base, sft, chats))
    _run_stage(result, "dpo", lambda: _train("dpo_training", base, dpo, pairs))
    reward = partial(_train, "reward_modeling", base, rm, pairs)
    if has_sequence_classification(family):
        _run_stage(result, "rm", reward)
    else:
        _run_stage(result, "rm", lambda: _expect_usage_error(reward), done="n/a")
    result.aux_loss_logged = {"sft": _logged_aux_loss(sft), "dpo": _logged_aux_loss(dpo)}
    if result.stages["sft"] == "ok":
        adapter_config = json.loads((sft / "adapter_config.json").read_text())
        result.lora_targets = sorted(adapter_config["target_modules"])
        result.lora_parameters = sorted(adapter_config.get("target_parameters") or [])
        _run_stage(result, "merge", lambda: _merge_and_reload(base, sft, merged))
        _run_stage(result, "generate", lambda: _generate(base, sft, merged))
    return result


def _expect_usage_error(run) -> None:
    """run must stop with a UsageError (the stage refusing the architecture)."""
    try:
        run()
    except UsageError:
        return
    raise RuntimeError("the stage ran instead of refusing the architecture")


def has_sequence_classification(family: Family) -> bool:
    return type(CONFIG_MAPPING[family.model_type]()) in AutoModelForSequenceClassification._model_mapping


def _cell(status: str) -> str:
    return {"ok": "✓", "n/a": "n/a"}.get(status, "✗")


def _targets_cell(result: FamilyResult) -> str:
    experts = f" + experts' {', '.join(result.lora_parameters)}" if result.lora_parameters else ""
    return ", ".join(result.lora_targets) + experts


def _aux_cell(result: FamilyResult) -> str:
    if result.family.moe_block is None:
        return "—"
    logged = [stage.upper() for stage, on in result.aux_loss_logged.items() if on]
    return f"on ({', '.join(logged)})" if logged else "none in the architecture"


def _template_cell(name: str | None) -> str:
    return f"`{get_template(name).name}`" if name else "none yet"


def _code(text: str | None) -> str:
    return f"`{text}`" if text else "—"


def render_table(results: list[FamilyResult]) -> str:
    """The docs/models.md block: a row per family with the stages it passed, then the families supported by template."""
    header = ("family", "`model_type`", "SFT (LoRA)", "DPO", "RM", "merge + reload", "generate", "LoRA `all` targets",
              "router aux loss", "ZeRO-3 leaf module", "`--template_name`", "needs")
    rows = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in results:
        cells = (r.family.name, _code(r.family.model_type), *(_cell(r.stages.get(stage, "")) for stage in STAGES),
                 _targets_cell(r), _aux_cell(r), _code(r.family.moe_block), _template_cell(r.family.template),
                 _code(" ".join(r.family.flags)))
        rows.append("| " + " | ".join(cells) + " |")
    rows += ["", "| family (`--trust_remote_code`) | verified here | `--template_name` |", "|---|---|---|"]
    rows += [f"| {name} | {'chat template, token for token' if template else '—'} | {_template_cell(template)} |"
             for name, template in REMOTE_CODE_FAMILIES]
    return "\n".join(rows)


def page_block(page: str) -> str:
    """The generated table as docs/models.md holds it now."""
    return page.split(START, 1)[1].split(END, 1)[0]


def run_matrix(workdir: Path) -> list[FamilyResult]:
    from medicalgpt.default_model import build_tokenizer

    tokenizer, data = build_tokenizer(), write_data(workdir / "data")
    return [run_family(family, tokenizer, workdir / family.model_type, data) for family in FAMILIES]


def main() -> None:
    torch.set_num_threads(1)  # the tiny models are faster on one thread than contending for two
    with tempfile.TemporaryDirectory() as workdir:
        results = run_matrix(Path(workdir))
    page = MODELS_PAGE.read_text(encoding="utf-8")
    MODELS_PAGE.write_text(page.replace(START + page_block(page), START + render_table(results) + "\n"),
                      encoding="utf-8")
    failed = {r.family.name: r.stages for r in results if not r.passed}
    print(f"Wrote the table of {len(results)} families to {MODELS_PAGE}; failed: {failed or 'none'}")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

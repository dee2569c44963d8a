"""The support matrix: each causal-LM family through LoRA SFT, DPO, RM, merge + reload and generation (docs/models.md's
table is that run's result); MoE routers and aux loss; architectures a stage cannot run; remote code; ZeRO-3 configs."""

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from accelerate.commands.config.config_args import load_config_from_file
from safetensors import safe_open
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, dynamic_module_utils

import reward_modeling
import supervised_finetuning
from medicalgpt.args import LoraArguments, ModelArguments
from medicalgpt.errors import UsageError, run_cli
from medicalgpt.modeling import apply_lora, find_linear_modules, load_model
from tools import support_matrix
from tools.support_matrix import FAMILIES, TINY

REPO = Path(__file__).resolve().parents[1]
FAMILY = {family.model_type: family for family in FAMILIES}
DENSE = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
ATTENTION = ["k_proj", "o_proj", "q_proj", "v_proj"]
FUSED_EXPERTS = ["down_proj", "gate_up_proj"]
# What `--target_modules all` must adapt, read off each architecture by hand: (modules, fused expert parameters).
# Mixtral and Qwen3-MoE keep their routed experts in fused parameters, so only attention is linear; Qwen2-MoE adds its
# shared expert (not its shared_expert_gate); for DeepSeek-style MoE peft moves the MLP names onto the fused experts.
EXPECTED_TARGETS = {
    "llama": (DENSE, []), "mistral": (DENSE, []), "mixtral": (ATTENTION, []), "qwen2": (DENSE, []),
    "qwen2_moe": (DENSE, []), "qwen3": (DENSE, []), "qwen3_moe": (ATTENTION, []), "gemma2": (DENSE, []),
    "gemma3_text": (DENSE, []), "phi3": (["down_proj", "gate_up_proj", "o_proj", "qkv_proj"], []),
    "glm4": (["down_proj", "gate_up_proj", "k_proj", "o_proj", "q_proj", "v_proj"], []),
    "deepseek_v3": (["kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_a_proj", "q_b_proj"], FUSED_EXPERTS),
    "glm4_moe": (ATTENTION, FUSED_EXPERTS),
}
ROUTER_WEIGHT = re.compile(r"\.(gate|router|shared_expert_gate)\.")  # an adapter key inside a router or gate
WITH_AUX_LOSS = {"mixtral", "qwen2_moe", "qwen3_moe"}  # MoE architectures that define a router load-balancing loss
NO_CHECKPOINTING = SimpleNamespace(activation_checkpointing=False)


class Matrix:
    """Each family's run, made on first use: one run serves its own test and the docs/models.md check."""

    def __init__(self, tokenizer, workdir: Path):
        self.tokenizer, self.workdir = tokenizer, workdir
        self.data = support_matrix.write_data(workdir / "data")
        self.results: dict[str, support_matrix.FamilyResult] = {}

    def result(self, family: support_matrix.Family) -> support_matrix.FamilyResult:
        if family.model_type not in self.results:
            self.results[family.model_type] = support_matrix.run_family(
                family, self.tokenizer, self.workdir / family.model_type, self.data)
        return self.results[family.model_type]


@pytest.fixture(scope="module")
def matrix(tokenizer, tmp_path_factory) -> Matrix:
    return Matrix(tokenizer, tmp_path_factory.mktemp("families"))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.model_type)
def test_family_passes_every_stage(family, matrix):
    result = matrix.result(family)
    assert result.passed, result.stages
    assert (result.lora_targets, result.lora_parameters) == EXPECTED_TARGETS[family.model_type]
    adapter = matrix.workdir / family.model_type / "sft" / "adapter_model.safetensors"
    with safe_open(str(adapter), "pt") as weights:
        assert not [key for key in weights.keys() if ROUTER_WEIGHT.search(key)]
    aux = family.model_type in WITH_AUX_LOSS
    assert result.aux_loss_logged == {"sft": aux, "dpo": aux}


def test_models_page_shows_the_matrix(matrix):
    table = support_matrix.render_table([matrix.result(family) for family in FAMILIES])
    page = (REPO / "docs" / "models.md").read_text(encoding="utf-8")
    assert support_matrix.page_block(page).strip() == table, "regenerate with: python -m tools.support_matrix"


@pytest.mark.parametrize("model_type, router, config", [
    ("qwen2_moe", "shared_expert_gate", dict(num_experts=4, moe_intermediate_size=32)),
    ("hunyuan_v1_moe", "wg", dict(num_experts=4, moe_topk=2, moe_intermediate_size=32)),  # mlp.gate.wg
    ("jetmoe", "layer", dict(num_local_experts=4, kv_channels=32)),  # mlp.router.layer
])
def test_linear_routers_are_never_lora_targets(model_type, router, config):
    model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type](**TINY, **config, vocab_size=64))
    assert any(isinstance(module, torch.nn.Linear) and name.endswith(f".{router}")
               for name, module in model.named_modules())
    targets = find_linear_modules(model)
    assert targets and router not in targets


def test_training_adds_the_router_aux_loss(tokenizer, tmp_path):
    base = support_matrix.build_family_model(FAMILY["mixtral"], tokenizer, tmp_path)
    model = load_model(ModelArguments(model_name_or_path=base))
    assert not model.config.output_router_logits  # as checkpoints ship
    model = apply_lora(model, LoraArguments(lora_dropout=0.0), NO_CHECKPOINTING)
    assert model.config.output_router_logits  # what transformers' Trainer (PT) and TRL's ORPO and CPO go by
    ids = torch.tensor([list(range(1, 17))])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    cross_entropy = F.cross_entropy(out.logits[0, :-1], ids[0, 1:])
    assert out.aux_loss > 0
    torch.testing.assert_close(out.loss, cross_entropy + model.config.router_aux_loss_coef * out.aux_loss)


def test_rm_refuses_an_architecture_without_a_classifier_before_reading_data(tmp_path, capsys):
    CONFIG_MAPPING["glm4_moe"]().save_pretrained(tmp_path / "glm4_moe")  # a config is all the check needs
    argv = ["--model_name_or_path", str(tmp_path / "glm4_moe"), "--train_file_dir", str(tmp_path / "missing.jsonl"),
            "--output_dir", str(tmp_path / "rm")]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: reward_modeling.main(argv))
    assert exit_info.value.code == 2
    assert re.fullmatch(r"error: the glm4_moe architecture has no AutoModelForSequenceClassification class in "
                        r"transformers \S+; this stage cannot use it\n", capsys.readouterr().err)


REMOTE_CONFIG = '''from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny_remote"
'''
REMOTE_MODEL = '''from transformers import LlamaForCausalLM

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
'''


@pytest.fixture
def remote_code_model(tokenizer, tmp_path, monkeypatch) -> str:
    """A checkpoint that ships its own model code, as ChatGLM3, Baichuan2 and InternLM2 do (here: a renamed Llama)."""
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # transformers adds the modules cache to it
    out = Path(support_matrix.build_family_model(FAMILY["llama"], tokenizer, tmp_path / "remote"))
    (out / "configuration_tiny_remote.py").write_text(REMOTE_CONFIG)
    (out / "modeling_tiny_remote.py").write_text(REMOTE_MODEL)
    config = json.loads((out / "config.json").read_text())
    config.update(model_type="tiny_remote", architectures=["TinyRemoteForCausalLM"], auto_map={
        "AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
        "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM"})
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def test_trust_remote_code_reaches_model_loading(remote_code_model, tmp_path):
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(ModelArguments(model_name_or_path=remote_code_model))
    model = load_model(ModelArguments(model_name_or_path=remote_code_model, trust_remote_code=True))
    assert type(model).__name__ == "TinyRemoteForCausalLM"
    data = support_matrix.write_data(tmp_path / "data")
    common = ["--model_name_or_path", remote_code_model, "--trust_remote_code", "True", *support_matrix.FAST,
              "--max_steps", "1"]
    metrics = supervised_finetuning.main([*common, "--output_dir", str(tmp_path / "sft"), "--train_file_dir",
                                          data["sft"], "--max_length", "128"])
    assert metrics["train_loss"] > 0
    with pytest.raises(UsageError, match="tiny_remote architecture has no AutoModelForSequenceClassification"):
        reward_modeling.main([*common, "--output_dir", str(tmp_path / "rm"), "--train_file_dir", data["pairs"]])


def read_config(name: str) -> dict:
    return json.loads((REPO / "configs" / name).read_text())


def test_zero_configs_and_moe_leaf_modules():
    assert [read_config(f"ds_zero{stage}.json")["zero_optimization"]["stage"] for stage in (1, 2, 3)] == [1, 2, 3]
    moe = read_config("ds_zero3_moe.json")
    leaf_classes = moe["zero_optimization"].pop("leaf_module")["classes"]
    assert moe == read_config("ds_zero3.json")  # ZeRO-3 plus the leaf modules, nothing else
    assert leaf_classes == [family.moe_block for family in FAMILIES if family.moe_block]
    for family in (family for family in FAMILIES if family.moe_block):
        config = CONFIG_MAPPING[family.model_type](**{**TINY, **family.config})
        blocks = [module for module in AutoModelForCausalLM.from_config(config).modules()
                  if type(module).__name__ == family.moe_block]
        assert blocks and all(hasattr(block, "experts") and hasattr(block, "gate") for block in blocks)
    accelerate_config = load_config_from_file(str(REPO / "configs" / "accelerate_zero3.yaml"))
    assert accelerate_config.distributed_type == "DEEPSPEED"
    assert (REPO / accelerate_config.deepspeed_config["deepspeed_config_file"]).is_file()


def test_fused_experts_with_dropout_get_a_clear_error(tokenizer, tmp_path):
    base = support_matrix.build_family_model(FAMILY["deepseek_v3"], tokenizer, tmp_path)
    with pytest.raises(UsageError, match="pass --lora_dropout 0"):
        apply_lora(load_model(ModelArguments(model_name_or_path=base)), LoraArguments(lora_dropout=0.05),
                   NO_CHECKPOINTING)

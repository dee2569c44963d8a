"""Tokenizer and model loading shared by every stage: dtype, attention, quantization, RoPE scaling, LoRA."""

import dataclasses
import importlib.util
import json
import logging
import re
from contextlib import nullcontext
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from medicalgpt.args import LoraArguments, ModelArguments
from medicalgpt.default_model import ensure_default_model
from medicalgpt.errors import UsageError

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# MoE routers and gates are linear layers in some families (`mlp.gate`, Qwen2-MoE's `shared_expert_gate`, HunYuan's
# `gate.wg`, JetMoE's `router.layer`); adapting them destabilises expert routing, so nothing in them is a LoRA target.
ROUTER_NAMES = {"gate", "router", "shared_expert_gate"}
REPORT_ROW = re.compile(r"^(\S+)\s*\|\s*(\w+)\s*\|", re.MULTILINE)  # "score.weight | MISSING |"


class NewScoreHead(logging.Filter):
    """While a sequence classifier is built on a causal LM, transformers' load report of its newly initialised
    score head is expected: drop a report that holds nothing else (any other entry is news and stays)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        rows = [(key, status) for key, status in REPORT_ROW.findall(message) if key != "Key"]
        return not ("LOAD REPORT" in message and rows
                    and all(key.startswith("score.") and status == "MISSING" for key, status in rows))

    def __enter__(self) -> "NewScoreHead":
        logging.getLogger("transformers.modeling_utils").addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("transformers.modeling_utils").removeFilter(self)


def model_path(model_args: ModelArguments) -> str:
    """The model to load: the user's, or the embedded default (built on first use)."""
    return model_args.model_name_or_path or ensure_default_model()


def adapter_base(lora_model: str) -> str | None:
    """The base model a LoRA adapter was trained on, as its adapter_config.json records it."""
    config = Path(lora_model, "adapter_config.json")
    if not config.is_file():
        # A checkpoint folder holds its adapter one level down (PPO's checkpoint-N/policy): name it.
        below = sorted(str(found.parent) for found in Path(lora_model).glob("*/adapter_config.json"))
        hint = f"; adapters one level down: {', '.join(below)}" if below else ""
        raise UsageError(f"--lora_model {lora_model}: no adapter_config.json there (not a LoRA adapter){hint}")
    return json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")


def with_adapter_base(model_args: ModelArguments, lora_model: str | None) -> ModelArguments:
    """model_args whose model is the adapter's recorded base when none was given: an adapter on any other base
    computes garbage without an error."""
    if not lora_model:
        return model_args
    recorded = adapter_base(lora_model)
    if model_args.model_name_or_path is None:
        if not recorded:
            raise UsageError(f"--lora_model {lora_model} does not record its base model: pass --base_model")
        if Path(recorded).is_absolute() and not Path(recorded).exists():
            raise UsageError(f"--lora_model {lora_model} was trained on {recorded}, which is not there any more: "
                             "pass --base_model")
        logger.info("--lora_model %s: using its recorded base model %s", lora_model, recorded)
        return dataclasses.replace(model_args, model_name_or_path=recorded)
    if recorded and model_args.model_name_or_path != recorded:
        logger.warning("--lora_model %s was trained on %s, not on --base_model %s", lora_model, recorded,
                       model_args.model_name_or_path)
    return model_args


def apply_adapter(model: PreTrainedModel, lora_model: str):
    """The model with the LoRA adapter applied; an adapter trained on another architecture is a usage error."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, lora_model)
    except RuntimeError as error:
        if "size mismatch" not in str(error):
            raise
        raise UsageError(f"--lora_model {lora_model} does not fit the base model {model.name_or_path} (its weight "
                         f"shapes differ): pass the base it was trained on, {adapter_base(lora_model)}, as "
                         "--base_model") from None


def _check_adapter_vocabulary(adapter_tokenizer, model_args: ModelArguments, lora_model: str) -> None:
    """Every token of the base model's tokenizer must keep its id in the adapter's (which may add tokens)."""
    base_vocab = AutoTokenizer.from_pretrained(
        model_path(model_args), trust_remote_code=model_args.trust_remote_code).get_vocab()
    adapter_vocab = adapter_tokenizer.get_vocab()
    if any(adapter_vocab.get(token) != i for token, i in base_vocab.items()):
        raise UsageError(f"--lora_model {lora_model} was trained with another vocabulary than the base model "
                         f"{model_path(model_args)}: pass the base it was trained on, {adapter_base(lora_model)}, "
                         "as --base_model")


def load_tokenizer(model_args: ModelArguments, lora_model: str | None = None):
    """The tokenizer, with a pad token (falls back to EOS) so batches can be padded.

    A LoRA adapter saved by a stage carries the tokenizer and chat template it was trained with: those win
    over the base model's (an explicit --tokenizer_name_or_path wins over both).
    """
    adapter_tokenizer = lora_model if lora_model and Path(lora_model, "tokenizer_config.json").exists() else None
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name_or_path or adapter_tokenizer or model_path(model_args),
        trust_remote_code=model_args.trust_remote_code)
    if adapter_tokenizer and not model_args.tokenizer_name_or_path:
        _check_adapter_vocabulary(tokenizer, model_args, lora_model)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UsageError("the tokenizer has neither a pad nor an EOS token; add one before training")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_dtype(name: str) -> torch.dtype:
    """auto: bfloat16 on GPUs that support it, float16 on older GPUs, float32 on CPU."""
    if name != "auto":
        return DTYPES[name]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def check_model_args(model_args: ModelArguments, lora_args: LoraArguments | None = None) -> None:
    """Fail fast, before any loading, on option combinations that cannot work here."""
    if model_args.load_in_4bit and model_args.load_in_8bit:
        raise UsageError("--load_in_4bit and --load_in_8bit are exclusive; pick one")
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    if quantized and lora_args is not None and not lora_args.use_peft:
        raise UsageError("a 4/8-bit base cannot be fully fine-tuned: use LoRA (QLoRA) or drop --load_in_4bit/8bit")
    if model_args.resize_embeddings and lora_args is not None and lora_args.use_peft and not lora_args.modules_to_save:
        logger.warning("--resize_embeddings with LoRA: the new rows stay as initialised unless you also pass "
                       "--modules_to_save embed_tokens,lm_head")
    if quantized and importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--load_in_4bit/--load_in_8bit need bitsandbytes: pip install bitsandbytes")
    if model_args.attn_implementation == "flash_attention_2":
        if not torch.cuda.is_available():
            raise UsageError("--attn_implementation flash_attention_2 needs a CUDA GPU; on CPU use sdpa (the default)")
        if importlib.util.find_spec("flash_attn") is None:
            raise UsageError("--attn_implementation flash_attention_2 needs flash-attn: pip install flash-attn "
                             "--no-build-isolation, or use sdpa")


def _rope_parameters(config, spec: str) -> dict:
    """--rope_scaling TYPE:FACTOR as a transformers rope_parameters dict."""
    rope_type, _, factor = spec.partition(":")
    try:
        factor = float(factor)
    except ValueError:
        raise UsageError(f"--rope_scaling {spec!r}: expected TYPE:FACTOR, e.g. linear:2.0") from None
    base = dict(config.rope_parameters or {})
    return {**base, "rope_type": rope_type, "factor": factor,
            "original_max_position_embeddings": config.max_position_embeddings}


def _quantization_config(model_args: ModelArguments, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if model_args.load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
                                  bnb_4bit_use_double_quant=model_args.bnb_4bit_use_double_quant,
                                  bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True) if model_args.load_in_8bit else None


def load_model(model_args: ModelArguments, model_class=AutoModelForCausalLM, new_head: bool = False,
               **model_kwargs) -> PreTrainedModel:
    """The base model with the requested dtype, attention kernel, quantization and RoPE scaling.

    new_head: the model class adds a score head the checkpoint lacks by design (a reward model built on a causal
    LM), so transformers' report of it is not shown.
    """
    check_model_args(model_args)
    path = model_path(model_args)
    config = AutoConfig.from_pretrained(path, trust_remote_code=model_args.trust_remote_code, **model_kwargs)
    _check_architecture(config, model_class)
    if model_args.rope_scaling:
        config.rope_parameters = _rope_parameters(config, model_args.rope_scaling)
    dtype = resolve_dtype(model_args.dtype)
    # None is transformers' sdpa-where-supported: architectures without an sdpa path (Gemma 2) fall back to eager.
    attention = None if model_args.attn_implementation == "sdpa" else model_args.attn_implementation
    with NewScoreHead() if new_head else nullcontext():
        model = model_class.from_pretrained(
            path, config=config, dtype=dtype, attn_implementation=attention,
            quantization_config=_quantization_config(model_args, dtype),
            trust_remote_code=model_args.trust_remote_code,
        )
    logger.info("Loaded %s (%s, %.1fM parameters)", path, dtype, model.num_parameters() / 1e6)
    if model_args.resize_embeddings:
        from medicalgpt.vocab import resize_embeddings

        base_tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
        added = resize_embeddings(model, load_tokenizer(model_args), base_tokenizer)
        logger.info("--resize_embeddings: %d new token rows, each the mean of the rows it replaces", added)
    return model


def _check_architecture(config, model_class) -> None:
    """One line instead of transformers' traceback when an auto class has no model for this architecture."""
    mapping = getattr(model_class, "_model_mapping", None)  # only auto classes have one
    if mapping is None or type(config) in mapping or model_class.__name__ in (getattr(config, "auto_map", None) or {}):
        return
    raise UsageError(f"the {config.model_type} architecture has no {model_class.__name__} class in transformers "
                     f"{transformers.__version__}; this stage cannot use it")


def check_model_class(model_args: ModelArguments, model_class) -> None:
    """Fail fast, before any data is read, when the stage's model class does not exist for this architecture."""
    config = AutoConfig.from_pretrained(model_path(model_args), trust_remote_code=model_args.trust_remote_code)
    _check_architecture(config, model_class)


def find_linear_modules(model: PreTrainedModel) -> list[str]:
    """Names of the linear layers LoRA should adapt for 'all': every one but the output head and MoE routers."""
    head = model.get_output_embeddings()
    names, router_names = set(), set()
    for name, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) or "Linear" in type(module).__name__  # bnb 4/8-bit too
        if not is_linear or module is head:
            continue
        path = name.split(".")
        (router_names if ROUTER_NAMES.intersection(path) else names).add(path[-1])
    # peft matches target names as suffixes of module paths: a name a router shares would adapt the router too.
    return sorted(names - router_names - {"score"})


def enable_router_aux_loss(model: PreTrainedModel) -> None:
    """MoE models train with their router load-balancing loss where the architecture defines one.

    TRL's SFT, DPO, KTO and GRPO trainers turn it on themselves; transformers' Trainer (PT) and TRL's ORPO and CPO add
    it only when the config's output_router_logits is set, and checkpoints ship it off.
    """
    config = model.config.get_text_config()
    if hasattr(config, "output_router_logits") and getattr(config, "router_aux_loss_coef", 0.0):
        config.output_router_logits = True


def apply_lora(model: PreTrainedModel, lora_args: LoraArguments, training_args, task_type: str = "CAUSAL_LM"):
    """Wrap the model for training: a new or continued LoRA adapter, or full fine-tuning."""
    if task_type == "CAUSAL_LM":
        enable_router_aux_loss(model)
    # A quantized base is not passed through peft's prepare_model_for_kbit_training: it would upcast every frozen
    # unquantized weight to float32, for Qwen2.5-7B's embeddings and head 2.2 GB more than the 16-bit they load in.
    # As over a 16-bit LoRA base, the base stays frozen in its dtype and the adapters train in float32; the Trainer
    # enables activation checkpointing itself.
    if not lora_args.use_peft:
        logger.info("Full fine-tuning: %.1fM trainable parameters", model.num_parameters(only_trainable=True) / 1e6)
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    if training_args.activation_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need a grad-carrying input under frozen embeddings
    if lora_args.peft_path:
        model = PeftModel.from_pretrained(model, lora_args.peft_path, is_trainable=True)
    else:
        targets = (find_linear_modules(model) if lora_args.target_modules == "all"
                   else [m.strip() for m in lora_args.target_modules.split(",")])
        to_save = [m.strip() for m in lora_args.modules_to_save.split(",")] if lora_args.modules_to_save else None
        config = LoraConfig(
            task_type=task_type, r=lora_args.lora_rank, lora_alpha=lora_args.lora_alpha,
            lora_dropout=lora_args.lora_dropout, target_modules=targets, modules_to_save=to_save,
            use_dora=lora_args.use_dora, use_rslora=lora_args.use_rslora,
            # A tied embedding/head trained in full must stay tied, or the saved adapter disagrees with itself.
            ensure_weight_tying=bool(to_save) and model.config.get_text_config().tie_word_embeddings)
        try:
            model = get_peft_model(model, config)
        except ValueError as error:
            if "lora_dropout" not in str(error):
                raise
            # peft adapts fused expert weights (DeepSeek-V3, GLM-4-MoE) through a wrapper that takes no dropout.
            raise UsageError(f"this architecture's LoRA targets include fused expert weights, which peft adapts "
                             f"without dropout: pass --lora_dropout 0 (peft: {error})") from None
    model.print_trainable_parameters()
    return model


def set_stop_tokens(model: PreTrainedModel, tokenizer, stop_words: tuple[str, ...]) -> None:
    """Generation stops at EOS and at the chat template's end-of-turn tokens (saved with the model)."""
    stop_ids = [tokenizer.convert_tokens_to_ids(word) for word in stop_words]
    stop_ids = [i for i in stop_ids if i is not None and i != tokenizer.unk_token_id]
    current = model.generation_config.eos_token_id
    current = [] if current is None else [current] if isinstance(current, int) else list(current)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    model.generation_config.eos_token_id = list(dict.fromkeys(current + eos + stop_ids))
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def load_for_inference(model_args: ModelArguments, lora_model: str | None = None) -> PreTrainedModel:
    """The model in eval mode on the current GPU (if any), with a LoRA adapter applied when one is given."""
    model = load_model(model_args)
    if torch.cuda.is_available() and not getattr(model, "is_quantized", False):
        model = model.to("cuda")  # bitsandbytes has already placed quantized weights on the current GPU
    if lora_model:
        model = apply_adapter(model, lora_model)
    return model.eval()


def load_reward_model(path: str, model_args: ModelArguments) -> PreTrainedModel:
    """A frozen reward model from reward_modeling.py: a merged directory, or a LoRA adapter merged into its base."""
    from transformers import AutoModelForSequenceClassification

    adapter = path if Path(path, "adapter_config.json").exists() else None
    rm_args = with_adapter_base(ModelArguments(model_name_or_path=None if adapter else path, dtype=model_args.dtype,
                                               trust_remote_code=model_args.trust_remote_code), adapter)
    # The score is read at each sequence's last non-pad token, so the config must know the pad id (as in
    # reward_modeling.py); the reward model's own saved tokenizer says which it is.
    pad_token_id = load_tokenizer(rm_args, adapter).pad_token_id
    # Under a LoRA adapter the base has no score head: the adapter brings it (modules_to_save).
    model = load_model(rm_args, AutoModelForSequenceClassification, new_head=adapter is not None, num_labels=1,
                       pad_token_id=pad_token_id)
    if adapter:
        model = apply_adapter(model, adapter).merge_and_unload()
    return model.eval().requires_grad_(False)

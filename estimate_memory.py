"""Predict the peak GPU memory of a training run from the model's config alone (no weights), split into weights,
gradients, optimizer states and activations; --measure checks the prediction by training a randomly initialised
model of that config for a few steps here (GPU: peak allocated CUDA memory; CPU: peak resident memory).

    python estimate_memory.py --model Qwen/Qwen2.5-7B --method qlora4 --seq_len 2048 --batch_size 4 \
        --gradient_checkpointing
    python estimate_memory.py --model config.json --method full --zero 3 --gpus 8 --seq_len 4096
    python estimate_memory.py --model models/medicalgpt-default --method lora --seq_len 512 --batch_size 8 --measure

What is counted (bytes per parameter p, per token t; B = 2 for bfloat16/float16, 4 for float32):
- weights: p·B; LoRA adds its adapters in float32; QLoRA stores the linear layers in 4 bits (+ nf4 block scales,
  themselves 8-bit with double quantization) or 8 bits (+ a float32 scale per row) and keeps the rest (embeddings,
  output head, norms) in --dtype, as the stages do.
- gradients: one per trainable parameter, in its dtype. optimizer: AdamW's two states in the parameter's dtype
  (adamw_8bit: 1 byte each); with DeepSpeed ZeRO and 16-bit weights, a float32 master copy and float32 states.
  ZeRO-1 shards the optimizer over --gpus, ZeRO-2 also the gradients, ZeRO-3 also the weights.
- activations: what autograd keeps for backward in each decoder layer (RMSNorms in float32, the attention
  kernel's q/k/v/output, SwiGLU's three tensors, and the inputs of trained linear layers, or of LoRA's branches
  with their dropout masks), times the layers, plus the loss on float32 logits (the log-softmax kept for backward
  and the two gradients of the logits made at the start of backward). With gradient checkpointing: each layer's
  input, plus the larger of the loss and one layer being recomputed.
- peak: weights + optimizer states + the larger of (activations + the first gradients of backward: the output
  head's) and (all gradients + the optimizer step's temporaries, one state's size for torch's foreach AdamW).
  The CUDA context (~0.5-1 GiB) and allocator fragmentation come on top.
"""

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from medicalgpt.architectures import ARCHITECTURES, shipped_architecture
from medicalgpt.args import LoraArguments, ModelArguments, parse_args
from medicalgpt.errors import UsageError, run_cli
from medicalgpt.memory import PeakMemory
from medicalgpt.modeling import apply_lora, find_linear_modules, load_model

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
ADAPTER_BYTES = 4  # peft keeps LoRA weights (and casts their inputs) in float32 over a 16-bit base
# Bytes per quantized weight: 4-bit nf4 values + a float32 scale per 64 weights, or with double quantization an
# 8-bit scale per 64 plus a float32 scale per 256 blocks; 8-bit values (+ a float32 scale per output row, added below).
QUANTIZED_BYTES = {"qlora4": 0.5 + 1 / 64 + 4 / (64 * 256), "qlora8": 1.0}
GIB = 2**30


@dataclass
class MemoryArguments:
    model: str = field(metadata={"help": "A config.json, a model directory or a hub name: only the config is read."})
    method: str = field(default="lora", metadata={
        "help": "full fine-tuning, LoRA, or QLoRA over a 4-bit (nf4, double quant) or 8-bit base.",
        "choices": ["full", "lora", "qlora4", "qlora8"]})
    seq_len: int = field(default=2048, metadata={"help": "Tokens per sample."})
    batch_size: int = field(default=1, metadata={"help": "Samples per GPU per step (micro-batch)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute each layer in backward."})
    zero: int = field(default=0, metadata={"help": "DeepSpeed ZeRO stage 0-3 (0: no DeepSpeed)."})
    gpus: int = field(default=1, metadata={"help": "GPUs that ZeRO shards over."})
    dtype: str = field(default="bfloat16", metadata={"help": "Weights and activations dtype.",
                                                     "choices": sorted(DTYPE_BYTES)})
    lora_rank: int = field(default=LoraArguments.lora_rank, metadata={
        "help": "LoRA rank (LoRA on every linear layer but the head)."})
    lora_dropout: float = field(default=LoraArguments.lora_dropout, metadata={
        "help": "LoRA dropout (> 0 keeps a mask per LoRA input). Default: the stages' default."})
    optim: str = field(default="adamw", metadata={"help": "Optimizer.", "choices": ["adamw", "adamw_8bit"]})
    measure: bool = field(default=False, metadata={
        "help": "Also train a randomly initialised model of this config for --measure_steps steps here and "
                "report the measured peak and the prediction's error."})
    measure_steps: int = field(default=3, metadata={"help": "Steps for --measure (the last ones are the peak)."})


def load_config(spec: str):
    """The model's config from a config.json file, a model directory, the shipped architectures of common hub
    models (medicalgpt/architectures.py: no download), or another hub name."""
    path = Path(spec)
    values = json.loads(path.read_text()) if path.is_file() else None
    if values is None and not path.is_dir():
        values = shipped_architecture(spec)
    if values is not None:
        return AutoConfig.for_model(values.pop("model_type"), **values)
    try:
        return AutoConfig.from_pretrained(spec)
    except OSError as error:  # not a directory, and not a hub model reachable (or cached) here
        raise UsageError(f"--model {spec}: no config found ({error.__class__.__name__}); pass a config.json, a model "
                         f"directory, a hub name reachable from here, or one of {', '.join(ARCHITECTURES)}") from None


def model_shapes(config) -> dict:
    """Parameter counts from the architecture built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    targets = set(find_linear_modules(model))
    lora = [m for name, m in linears.items() if name.rsplit(".", 1)[-1] in targets]
    return {"params": model.num_parameters(),
            "linear_weights": sum(m.weight.numel() for m in linears.values()),
            "linear_rows": sum(m.out_features for m in linears.values()),
            "lora_in_out": sum(m.in_features + m.out_features for m in lora),
            "lora_inputs": sum(m.in_features for m in lora), "lora_modules": len(lora),
            "head_weights": head.weight.numel()}


def weights_and_trainable(args: MemoryArguments, shapes: dict, dtype_bytes: int) -> tuple[float, int, int]:
    """(bytes of weights, trainable parameters, bytes per trainable parameter)."""
    lora = args.lora_rank * shapes["lora_in_out"]
    if args.method == "full":
        return shapes["params"] * dtype_bytes, shapes["params"], dtype_bytes
    if args.method == "lora":
        return shapes["params"] * dtype_bytes + lora * ADAPTER_BYTES, lora, ADAPTER_BYTES
    quantized = shapes["linear_weights"] * QUANTIZED_BYTES[args.method]
    scales = shapes["linear_rows"] * 4 if args.method == "qlora8" else 0
    unquantized = (shapes["params"] - shapes["linear_weights"]) * dtype_bytes  # embeddings, head, norms: as loaded
    return quantized + scales + unquantized + lora * ADAPTER_BYTES, lora, ADAPTER_BYTES


def activations_per_token(args: MemoryArguments, text, shapes: dict, dtype_bytes: int, on_gpu: bool) -> float:
    """Bytes autograd keeps per token at the start of backward (the module docstring says what)."""
    b, h, layers, full = dtype_bytes, text.hidden_size, text.num_hidden_layers, args.method == "full"
    heads, kv_heads = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    # RMSNorm keeps its float32 input, and the normalised value when its weight trains.
    norms = 2 * (4 * h + (b * h if full else 0))
    # The attention kernel keeps q, k, v (key/value heads as they are: transformers hands GQA to the kernel
    # when there is no padding mask) and its output, plus a float32 log-sum-exp per head.
    attention = b * head_dim * (2 * heads + 2 * kv_heads) + 4 * heads
    mlp = 3 * b * text.intermediate_size  # SwiGLU: gate, act(gate), up
    if full:  # the inputs of q/k/v (one tensor), gate/up (one tensor) and down; o's is the kernel's output
        inputs = b * (2 * h + text.intermediate_size)
    else:  # each LoRA branch keeps its float32 input after dropout, the dropout mask, and lora_A's output
        mask = (1 if on_gpu else ADAPTER_BYTES) if args.lora_dropout > 0 else 0
        inputs = (shapes["lora_inputs"] * (ADAPTER_BYTES + mask) + shapes["lora_modules"] * args.lora_rank
                  * ADAPTER_BYTES) / layers
    layer = norms + attention + mlp + inputs
    final = 4 * h + (2 * b * h if full else 0)  # the last norm; the head's input when it trains
    loss = 12 * text.vocab_size  # the float32 log-softmax kept for backward, then two float32 logits gradients
    if args.gradient_checkpointing:  # layer inputs; the loss's backward is over before a layer is recomputed
        return b * h * layers + final + max(loss, layer)
    return layer * layers + final + loss


def estimate(args: MemoryArguments, config, on_gpu: bool = True) -> dict:
    """Predicted bytes per GPU (on_gpu=False: for this run on a CPU): weights, gradients, optimizer states,
    activations, and the peak."""
    text, shapes, b = config.get_text_config(), model_shapes(config), DTYPE_BYTES[args.dtype]
    weights, trainable, param_bytes = weights_and_trainable(args, shapes, b)
    state_bytes = 1 if args.optim == "adamw_8bit" else param_bytes
    optimizer = trainable * 2 * state_bytes
    if args.zero and b == 2:  # DeepSpeed trains a float32 master copy with float32 states
        optimizer = trainable * (4 + 8)
    gradients = trainable * param_bytes
    shard = max(args.gpus, 1)
    optimizer /= shard if args.zero >= 1 else 1
    gradients /= shard if args.zero >= 2 else 1
    weights /= shard if args.zero >= 3 else 1
    activations = activations_per_token(args, text, shapes, b, on_gpu) * args.seq_len * args.batch_size
    first_gradients = shapes["head_weights"] * param_bytes if args.method == "full" else 0
    # torch's AdamW runs its multi-tensor kernels on GPUs, with a temporary the size of one state
    step_temporary = trainable * state_bytes / (shard if args.zero >= 1 else 1) if on_gpu else 0
    peak = weights + optimizer + max(activations + first_gradients, gradients + step_temporary)
    return {"parameters": shapes["params"], "trainable_parameters": trainable, "weights": weights,
            "gradients": gradients, "optimizer_states": optimizer, "activations": activations, "peak": peak}


def print_estimate(args: MemoryArguments, result: dict) -> None:
    print(f"{args.model}: {result['parameters'] / 1e6:.1f}M parameters, {result['trainable_parameters'] / 1e6:.2f}M "
          f"trainable; {args.method}, {args.dtype}, batch {args.batch_size} x {args.seq_len} tokens"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}"
          f"{f', ZeRO-{args.zero} over {args.gpus} GPUs' if args.zero else ''}")
    print("| component | GiB per GPU |\n|---|---|")
    for key in ("weights", "gradients", "optimizer_states", "activations", "peak"):
        print(f"| {key.replace('_', ' ')} | {result[key] / GIB:.3f} |")
    print("Not counted: the CUDA context (+0.5-1 GiB) and allocator fragmentation. Published rules of thumb for 7B "
          "models (QLoRA ~6 GB, LoRA 16-bit ~16 GB, full 16-bit 60+ GB) assume batch 1, ~512-token sequences, "
          "gradient checkpointing, LoRA rank 8 and 16-bit AdamW states: compare with those settings.")


def make_optimizer(args: MemoryArguments, model) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optim == "adamw_8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=1e-5)
    return torch.optim.AdamW(params, lr=1e-5)


def measure(args: MemoryArguments, config) -> int | None:
    """Peak bytes, from loading on, of --measure_steps steps training a randomly initialised model of config
    with the stages' own loading and LoRA code."""
    import peft  # noqa: F401  (imported here, not inside the measurement: loading its libraries takes memory too)

    quantized = args.method.startswith("qlora")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
        model_args = ModelArguments(model_name_or_path=tmp, dtype=args.dtype, load_in_4bit=args.method == "qlora4",
                                    load_in_8bit=args.method == "qlora8")
        lora_args = LoraArguments(use_peft=args.method != "full", lora_rank=args.lora_rank,
                                  lora_dropout=args.lora_dropout)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        ids = torch.randint(0, config.get_text_config().vocab_size, (args.batch_size, args.seq_len), device=device)
        with PeakMemory() as peak:
            model = load_model(model_args)
            model = model if quantized else model.to(device)  # bitsandbytes places quantized weights itself
            if args.gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model = apply_lora(model, lora_args, SimpleNamespace(activation_checkpointing=args.gradient_checkpointing))
            model.train()
            optimizer = make_optimizer(args, model)
            for _ in range(args.measure_steps):
                model(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return peak.bytes


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args((MemoryArguments,), argv)
    if not 0 <= args.zero <= 3:
        raise UsageError(f"--zero {args.zero}: DeepSpeed ZeRO stages are 0 to 3")
    if args.measure and args.zero:
        raise UsageError("--measure trains in this one process: drop --zero (or measure under DeepSpeed yourself)")
    config = load_config(args.model)
    result = estimate(args, config)
    print_estimate(args, result)
    if args.measure:
        predicted = estimate(args, config, on_gpu=torch.cuda.is_available())["peak"]
        measured = measure(args, config)
        result.update(measured_peak=measured, predicted_peak_here=predicted,
                      error=predicted / measured - 1 if measured else None)
        where = "allocated CUDA memory" if torch.cuda.is_available() else "resident memory (RSS)"
        print(f"measured peak ({where}): {measured / GIB:.3f} GiB; predicted {predicted / GIB:.3f} GiB; "
              f"error {result['error']:+.1%}" if measured else "measured peak: not measurable here")
    return result


if __name__ == "__main__":
    run_cli(main)

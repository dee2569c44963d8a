"""A shallow student made from its teacher: a subset of the teacher's decoder layers, with its embeddings, final
norm and output head, and its tokenizer (DistilBERT's initialisation, for any decoder whose layers are one
ModuleList: Qwen2/Qwen3, Llama, Mistral, ...).

Such a student starts close to the teacher and shares its vocabulary, which on-policy distillation
(distillation_training.py) needs; a randomly initialised student samples gibberish and learns little from it.

    python -m medicalgpt.student --teacher_model outputs-sft-merged --keep_layers 0,3 --output_dir outputs-student
"""

import argparse
import copy
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from medicalgpt.errors import UsageError, run_cli

# Config entries with one value per layer (subset with the layers) and entries listing layer indices (renumbered).
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")
LAYER_INDEX_KEYS = ("mlp_only_layers",)


def decoder_layers(model: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    """The name and module of the model's one ModuleList of config.num_hidden_layers decoder layers."""
    count = getattr(model.config, "num_hidden_layers", None)
    if not isinstance(count, int):
        raise UsageError(f"unsupported architecture {type(model).__name__}: its config has no num_hidden_layers")
    if getattr(model.config, "is_heterogeneous", False):  # per-layer overrides (transformers' heterogeneous configs)
        raise UsageError(f"unsupported architecture {type(model).__name__}: its layers differ in shape (a "
                         "heterogeneous config)")
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == count]
    if len(found) != 1:
        names = ", ".join(name for name, _ in found) or "none"
        raise UsageError(f"unsupported architecture {type(model).__name__}: a student keeps layers of a decoder whose "
                         f"{count} layers are one ModuleList; found {len(found)} ({names})")
    return found[0]


def check_keep_layers(keep_layers: list[int], count: int) -> None:
    bad = [index for index in keep_layers if not 0 <= index < count]
    if bad or not keep_layers:
        raise UsageError(f"--keep_layers {','.join(map(str, keep_layers))}: the teacher has {count} layers, "
                         f"numbered 0-{count - 1}; keep at least one")
    if sorted(set(keep_layers)) != keep_layers:
        raise UsageError(f"--keep_layers {','.join(map(str, keep_layers))}: list each layer once, in ascending order")


def student_config(config, keep_layers: list[int]):
    config = copy.deepcopy(config)
    count = config.num_hidden_layers
    config.num_hidden_layers = len(keep_layers)
    for key in PER_LAYER_KEYS:
        values = getattr(config, key, None)
        if isinstance(values, list | tuple) and len(values) == count:
            setattr(config, key, [values[index] for index in keep_layers])
    for key in LAYER_INDEX_KEYS:
        if isinstance(indices := getattr(config, key, None), list | tuple):
            setattr(config, key, [keep_layers.index(index) for index in indices if index in keep_layers])
    return config


def make_student(teacher: PreTrainedModel, keep_layers: list[int]) -> PreTrainedModel:
    """A copy of the teacher with only the decoder layers keep_layers (teacher indices), renumbered 0, 1, ..."""
    prefix, layers = decoder_layers(teacher)
    check_keep_layers(keep_layers, len(layers))
    # Built from the config rather than by deleting layers, so each attention layer's cache index is its new one;
    # on the meta device, so that no weights are allocated and initialised only to be replaced (minutes for a 7B).
    with torch.device("meta"):
        student = AutoModelForCausalLM.from_config(student_config(teacher.config, keep_layers), dtype=teacher.dtype)
    renumbered = {f"{prefix}.{old}.": f"{prefix}.{new}." for new, old in enumerate(keep_layers)}
    weights = {}
    for name, tensor in teacher.state_dict().items():
        if name.startswith(f"{prefix}."):
            layer = name[:name.index(".", len(prefix) + 1) + 1]
            if layer not in renumbered:
                continue
            name = renumbered[layer] + name[len(layer):]
        weights[name] = tensor
    student.load_state_dict(weights, strict=True, assign=True)
    # Buffers outside the state dict (rotary inverse frequencies) are still on the meta device: the teacher's.
    teacher_buffers = dict(teacher.named_buffers())
    teacher_layer = {new: old for old, new in renumbered.items()}
    for name, buffer in list(student.named_buffers()):
        if buffer.is_meta:
            layer = next((prefix for prefix in teacher_layer if name.startswith(prefix)), "")
            source = teacher_layer[layer] + name[len(layer):] if layer else name
            module_name, _, buffer_name = name.rpartition(".")
            student.get_submodule(module_name).register_buffer(buffer_name, teacher_buffers[source].clone(),
                                                               persistent=False)
    student.generation_config = copy.deepcopy(teacher.generation_config)  # the teacher's stop tokens
    return student


def parse_layers(text: str) -> list[int]:
    try:
        return [int(index) for index in text.split(",")]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected layer indices separated by commas, like 0,3; got {text!r}") \
            from error


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--teacher_model", required=True, help="The teacher: a local directory or a hub name.")
    parser.add_argument("--keep_layers", type=parse_layers, required=True,
                        help="The teacher's decoder layers the student keeps, e.g. 0,3 (first and last of four).")
    parser.add_argument("--output_dir", type=Path, required=True)
    args = parser.parse_args(argv)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher_model, dtype="auto")
    student = make_student(teacher, args.keep_layers)
    student.save_pretrained(args.output_dir)
    AutoTokenizer.from_pretrained(args.teacher_model).save_pretrained(args.output_dir)
    sizes = [sum(p.numel() for p in model.parameters()) / 1e6 for model in (teacher, student)]
    print(f"Saved a student with layers {','.join(map(str, args.keep_layers))} of {len(decoder_layers(teacher)[1])} "
          f"({sizes[1]:.2f}M of the teacher's {sizes[0]:.2f}M parameters) to {args.output_dir}")
    return args.output_dir


if __name__ == "__main__":
    run_cli(main)

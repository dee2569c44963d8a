"""Architecture numbers of common model families and sizes, as their published config.json files give them, so
estimate_memory.py works offline. Only what the memory estimate depends on: no weights, no tokenizer."""

_QWEN2 = dict(model_type="qwen2", vocab_size=151936, tie_word_embeddings=True)
_QWEN2_LARGE = dict(model_type="qwen2", vocab_size=152064, tie_word_embeddings=False)
_QWEN3 = dict(model_type="qwen3", vocab_size=151936, head_dim=128)
_LLAMA3 = dict(model_type="llama", vocab_size=128256, tie_word_embeddings=False)
_LLAMA2 = dict(model_type="llama", vocab_size=32000, tie_word_embeddings=False)


def _shape(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> dict:
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads)


ARCHITECTURES: dict[str, dict] = {
    "Qwen/Qwen2.5-0.5B": {**_QWEN2, **_shape(896, 4864, 24, 14, 2)},
    "Qwen/Qwen2.5-1.5B": {**_QWEN2, **_shape(1536, 8960, 28, 12, 2)},
    "Qwen/Qwen2.5-3B": {**_QWEN2, **_shape(2048, 11008, 36, 16, 2)},
    "Qwen/Qwen2.5-7B": {**_QWEN2_LARGE, **_shape(3584, 18944, 28, 28, 4)},
    "Qwen/Qwen2.5-14B": {**_QWEN2_LARGE, **_shape(5120, 13824, 48, 40, 8)},
    "Qwen/Qwen2.5-32B": {**_QWEN2_LARGE, **_shape(5120, 27648, 64, 40, 8)},
    "Qwen/Qwen2.5-72B": {**_QWEN2_LARGE, **_shape(8192, 29568, 80, 64, 8)},
    "Qwen/Qwen3-0.6B": {**_QWEN3, **_shape(1024, 3072, 28, 16, 8), "tie_word_embeddings": True},
    "Qwen/Qwen3-1.7B": {**_QWEN3, **_shape(2048, 6144, 28, 16, 8), "tie_word_embeddings": True},
    "Qwen/Qwen3-4B": {**_QWEN3, **_shape(2560, 9728, 36, 32, 8), "tie_word_embeddings": True},
    "Qwen/Qwen3-8B": {**_QWEN3, **_shape(4096, 12288, 36, 32, 8), "tie_word_embeddings": False},
    "Qwen/Qwen3-14B": {**_QWEN3, **_shape(5120, 17408, 40, 40, 8), "tie_word_embeddings": False},
    "Qwen/Qwen3-32B": {**_QWEN3, **_shape(5120, 25600, 64, 64, 8), "tie_word_embeddings": False},
    "meta-llama/Llama-3.1-8B": {**_LLAMA3, **_shape(4096, 14336, 32, 32, 8)},
    "meta-llama/Llama-3.1-70B": {**_LLAMA3, **_shape(8192, 28672, 80, 64, 8)},
    "meta-llama/Meta-Llama-3-8B": {**_LLAMA3, **_shape(4096, 14336, 32, 32, 8)},
    "meta-llama/Meta-Llama-3-70B": {**_LLAMA3, **_shape(8192, 28672, 80, 64, 8)},
    "meta-llama/Llama-2-7b-hf": {**_LLAMA2, **_shape(4096, 11008, 32, 32, 32)},
    "meta-llama/Llama-2-13b-hf": {**_LLAMA2, **_shape(5120, 13824, 40, 40, 40)},
    "mistralai/Mistral-7B-v0.3": dict(model_type="mistral", vocab_size=32768, tie_word_embeddings=False,
                                      **_shape(4096, 14336, 32, 32, 8)),
}
# Chat and instruction-tuned releases share their base's architecture.
_VARIANT_SUFFIXES = ("-hf", "-instruct", "-chat", "-base")


def _stem(name: str) -> str:
    """The base model's name: lower case, without the variant suffixes ("Llama-2-7b-chat-hf" -> "llama-2-7b")."""
    stem = name.lower()
    while stem.endswith(_VARIANT_SUFFIXES):
        stem = next(stem.removesuffix(suffix) for suffix in _VARIANT_SUFFIXES if stem.endswith(suffix))
    return stem


def shipped_architecture(name: str) -> dict | None:
    """The config values of a hub name in ARCHITECTURES (any case; chat and instruct variants too); None if absent."""
    found = {_stem(known): values for known, values in ARCHITECTURES.items()}.get(_stem(name))
    return dict(found) if found else None

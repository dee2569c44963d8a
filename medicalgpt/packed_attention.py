"""Attention over packed rows that computes each sample's own causal block only, for sdpa on the CPU.

From position ids that restart at every sample, transformers builds a block-diagonal causal mask, and sdpa then
scores all row_length² query-key pairs of a row, most of them masked out. On a GPU, flash-attention's varlen kernel
avoids that; the CPU has no such kernel in torch or transformers, so here each sample of a row runs its own causal
sdpa call: the same outputs, with a fraction of the attention work and no mask to build or read.

`enable_packed_attention(model, row_length)` switches a loaded model to it (supervised_finetuning.py does, for its
packed rows); a batch that needs a real mask (padding, a cache) still goes through transformers' own sdpa path.
"""

import logging

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import find_packed_sequence_indices, sdpa_mask

logger = logging.getLogger(__name__)
NAME = "packed_sdpa"
# Attention variants this function does not implement: a call that carries one goes to transformers' sdpa.
UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")


def sample_lengths(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the lengths of its samples, split where transformers splits packed rows: wherever a position is not
    the previous one plus 1. Right padding (position 0 at every token, so one-token samples to transformers) becomes
    one causal block: no real token attends to it, and it carries no loss, so a call per token buys nothing."""
    sample_ids = find_packed_sequence_indices(position_ids)
    if sample_ids is None:  # every row is one sample
        return [[position_ids.shape[-1]]] * position_ids.shape[0]
    rows = []
    for row in sample_ids:
        lengths = torch.unique_consecutive(row, return_counts=True)[1].tolist()
        padding = next((i for i, length in enumerate(reversed(lengths)) if length != 1), len(lengths))
        if padding > 1:
            lengths[-padding:] = [padding]
        rows.append(lengths)
    return rows


def packed_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query (batch, heads, q_len, dim), key/value (batch, kv_heads,
    kv_len, dim) -> (batch, q_len, heads, dim). Without a mask, with position ids and no cache, one causal sdpa
    call per sample; anything else is transformers' sdpa."""
    packed = (attention_mask is None and position_ids is not None and position_ids.dim() == 2
              and query.shape[2] == key.shape[2] > 1 and not any(kwargs.get(k) is not None for k in UNSUPPORTED_KWARGS))
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      position_ids=position_ids, **kwargs)
    position_ids = position_ids.expand(query.shape[0], -1)  # sometimes (1, q_len) for the whole batch
    grouped = query.shape[1] != key.shape[1]  # grouped-query attention: sdpa shares each K/V head, no copies
    rows = []
    # unbind and split, not indexing: their backward concatenates the pieces' gradients, where each slice's backward
    # would write into a zeroed copy of the whole tensor (3x slower attention on the 25M model).
    for q, k, v, lengths in zip(query.unbind(0), key.unbind(0), value.unbind(0), sample_lengths(position_ids),
                                strict=True):
        rows.append(torch.cat([
            F.scaled_dot_product_attention(qs[None], ks[None], vs[None], dropout_p=dropout, is_causal=True,
                                           scale=scaling, enable_gqa=grouped)[0]
            for qs, ks, vs in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1), strict=True)], 1))
    return torch.stack(rows).transpose(1, 2).contiguous(), None


def packed_sdpa_mask(**kwargs) -> torch.Tensor | None:
    """No mask where packed_sdpa_forward needs none (no padding mask, no cache: it reads the samples from the position
    ids); otherwise the mask transformers' sdpa would get."""
    if kwargs["attention_mask"] is None and kwargs["q_length"] == kwargs["kv_length"] and not kwargs["q_offset"]:
        return None
    return sdpa_mask(**kwargs)


def enable_packed_attention(model: PreTrainedModel, row_length: int) -> bool:
    """Switch `model` (sdpa, CPU) to per-sample attention for packed rows of `row_length`; whether it did.

    Not on a GPU (unmeasured there: flash_attention_2 is the packed kernel to use), and not for models whose
    sliding window is shorter than a row (this function ignores the window)."""
    config = model.config.get_text_config()
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if torch.cuda.is_available() or config._attn_implementation != "sdpa" or (window and window < row_length):
        return False
    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, packed_sdpa_mask)
    model.set_attn_implementation(NAME)
    logger.info("Packed rows: attention runs per sample (%s), not over a block-diagonal %dx%d mask", NAME,
                row_length, row_length)
    return True

"""Held-out metrics: token-level perplexity and generated answers to held-out questions."""

import math

import torch
from torch.nn.utils.rnn import pad_sequence


@torch.inference_mode()
def perplexity(model, blocks: list[list[int]], batch_size: int = 8) -> float:
    """exp(mean negative log-likelihood over every predicted token), ignoring padding."""
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = [torch.tensor(b) for b in blocks[start: start + batch_size]]
        input_ids = pad_sequence(batch, batch_first=True, padding_value=0).to(model.device)
        attention_mask = pad_sequence([torch.ones_like(b) for b in batch], batch_first=True).to(model.device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
        targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum")
        total_nll += nll.item()
        total_tokens += int((targets != -100).sum())
    return math.exp(total_nll / total_tokens)

"""One generation path, shared by evaluation, inference, the API server and the demo."""

import torch
from tqdm.auto import tqdm


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0, batch_size: int = 8,
             show_progress: bool = False) -> list[str]:
    """Complete tokenised prompts in left-padded batches; returns the new text of each, in input order.

    temperature 0 means greedy decoding.
    """
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if temperature > 0 else \
        dict(do_sample=False)
    pad_id = tokenizer.pad_token_id
    outputs = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc="Generating", disable=not show_progress):
        batch = prompts[start: start + batch_size]
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=model.device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                   repetition_penalty=repetition_penalty, pad_token_id=pad_id, **sampling)
        outputs += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return [text.strip() for text in outputs]

"""One generation path, shared by evaluation, inference, the API server and the chat demo."""

import threading
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer


def sampling_kwargs(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                    repetition_penalty: float = 1.0) -> dict:
    """model.generate() arguments; temperature 0 means greedy decoding."""
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if temperature > 0 else \
        dict(do_sample=False)
    return {**sampling, "repetition_penalty": repetition_penalty}


def left_padded(prompts: list[list[int]], pad_id: int, device) -> dict:
    """input_ids and attention_mask of token sequences padded on the left (generation continues on the right)."""
    width = max(len(p) for p in prompts)
    return {"input_ids": torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device),
            "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)}


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 128, batch_size: int = 8,
             show_progress: bool = False, **sampling) -> list[str]:
    """Complete tokenised prompts in left-padded batches; returns the new text of each, in input order.

    sampling: temperature, top_p, top_k, repetition_penalty (see sampling_kwargs).
    """
    outputs = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="Generating", disable=not show_progress):
        inputs = left_padded(prompts[start: start + batch_size], tokenizer.pad_token_id, model.device)
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                   **sampling_kwargs(**sampling))
        outputs += tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [text.strip() for text in outputs]


class _StopOnEvent(StoppingCriteria):
    """Ends generation when the event is set (e.g. the client went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        return self.event.is_set()


def stream_generate(model, tokenizer, prompt: list[int], max_new_tokens: int = 128,
                    stop: threading.Event | None = None, timeout: float = 120.0,
                    stopping_criteria: Sequence[StoppingCriteria] = (), seed: int | None = None,
                    outputs: list | None = None, **sampling) -> Iterator[str]:
    """Yield the completion of one tokenised prompt as text pieces while it is generated.

    Setting `stop` ends generation early; extra `stopping_criteria` see every new token too (e.g. to count
    them). An error in the generation thread is re-raised here, and a stalled generation raises queue.Empty
    after `timeout` seconds, so a consumer never hangs. `seed` makes sampling reproducible (the caller must not
    run two generations at once: it seeds torch's global generator). `outputs`, when given, receives generate()'s
    output with its sequences and the raw logits of every step.
    """
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=timeout)
    stop = stop or threading.Event()
    failure: list[BaseException] = []
    details = dict(return_dict_in_generate=True, output_logits=True) if outputs is not None else {}

    def run() -> None:
        try:
            if seed is not None:
                torch.manual_seed(seed)
            with torch.inference_mode():
                output = model.generate(
                    **left_padded([prompt], tokenizer.pad_token_id, model.device), streamer=streamer,
                    max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                    stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop), *stopping_criteria]),
                    **details, **sampling_kwargs(**sampling))
            if outputs is not None:
                outputs.append(output)
        except BaseException as error:  # handed to the consumer below
            failure.append(error)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield from streamer
    finally:
        stop.set()  # the consumer stopped reading (or finished): let the thread end
        thread.join()
    if failure:
        raise failure[0]

"""The shared generation path: batched equals one-by-one, streaming equals batched, errors and stops surface."""

import threading

import pytest
from transformers import AutoModelForCausalLM

from medicalgpt.generation import generate, stream_generate
from medicalgpt.templates import get_template


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _prompts(tokenizer) -> list[list[int]]:
    questions = ["高血压用什么药？", "What is the dose of metformin for type 2 diabetes in adults?", "Hi"]
    return [get_template("chatml").encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions]


def test_left_padded_batches_match_one_by_one(model, tokenizer):
    prompts = _prompts(tokenizer)
    batched = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    assert batched == [generate(model, tokenizer, [p], max_new_tokens=8)[0] for p in prompts]


def test_streaming_yields_the_greedy_completion(model, tokenizer):
    prompt = _prompts(tokenizer)[1]
    pieces = list(stream_generate(model, tokenizer, prompt, max_new_tokens=8))
    assert "".join(pieces).strip() == generate(model, tokenizer, [prompt], max_new_tokens=8)[0]


def test_stream_stops_on_event_and_reraises_errors(model, tokenizer):
    stop = threading.Event()
    stop.set()
    text = "".join(stream_generate(model, tokenizer, _prompts(tokenizer)[0], max_new_tokens=50, stop=stop))
    assert len(tokenizer(text)["input_ids"]) <= 1  # the stop is checked after each new token

    class Broken:
        device = model.device

        def generate(self, **kwargs):
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        list(stream_generate(Broken(), tokenizer, [1, 2, 3]))

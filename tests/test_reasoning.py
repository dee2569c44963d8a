"""Reasoning models: the <think> block apart from the answer (whole, streamed, over the API), the thinking
switch, and the thinking templates rendered token for token as their Jinja does."""

import json

import pytest
from fastapi.testclient import TestClient

import openai_api
from medicalgpt.errors import UsageError
from medicalgpt.reasoning import ReasoningSplitter, split_reasoning, with_thinking
from medicalgpt.serving import BaseModelArguments, ChatModel, ServeArguments, load_chat_model
from medicalgpt.templates import TokenizerChatTemplate, get_template

REPLY = "<think>\n头痛可能是紧张型。\n先问病程。\n</think>\n\n多休息，必要时服布洛芬。"
THOUGHT, ANSWER = "头痛可能是紧张型。\n先问病程。", "多休息，必要时服布洛芬。"


def streamed(pieces: list[str]) -> tuple[str, str]:
    splitter = ReasoningSplitter()
    parts = [part for piece in pieces for part in splitter.feed(piece)] + splitter.flush()
    return ("".join(t for kind, t in parts if kind == "reasoning_content"),
            "".join(t for kind, t in parts if kind == "content"))


def test_split_reasoning_of_a_whole_reply():
    assert split_reasoning(REPLY) == (THOUGHT, ANSWER)
    assert split_reasoning("No block <think>here</think>") == (None, "No block <think>here</think>")
    assert split_reasoning("<think>\n\n</think>\n\n答案") == ("", "答案")  # thinking off: an empty block
    assert split_reasoning("<think>cut off by max_tokens") == ("cut off by max_tokens", "")


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_streamed_split_equals_the_whole_one_wherever_the_pieces_cut_the_tags(size):
    pieces = [REPLY[i:i + size] for i in range(0, len(REPLY), size)]
    assert streamed(pieces) == (THOUGHT, ANSWER)


def test_enable_thinking_false_switches_to_the_no_think_template(tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    off = with_thinking(get_template("qwen3"), False)
    assert tokenizer.decode(off.encode_prompt(tokenizer, messages)).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert with_thinking(get_template("qwen3"), True) == get_template("qwen3")
    own = with_thinking(TokenizerChatTemplate("{{ 'on' if enable_thinking is not defined or enable_thinking "
                                              "else 'off' }}"), False)
    assert tokenizer.decode(own.encode_prompt(tokenizer, messages)) == "off"
    with pytest.raises(UsageError, match="llama3 template has no thinking switch"):
        with_thinking(get_template("llama3"), False)


def test_qwen3_renders_think_blocks_as_its_template_does_and_trains_on_reasoning_and_answer(tokenizer):
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": REPLY},
               {"role": "user", "content": "Thanks"}]
    for name in ("qwen3_5", "qwen3_5_nothink"):  # MedicalGPT's names; training renders alike
        ids, labels = get_template(name).encode(tokenizer, [*history, {"role": "assistant", "content": "Bye"}])
        # The earlier reply loses its reasoning; the final one carries an (empty) think block, trained.
        assert tokenizer.decode(ids) == (
            f"<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n{ANSWER}<|im_end|>\n"
            "<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nBye<|im_end|>\n")
        trained = [i for i, label in zip(ids, labels) if label != -100]
        assert tokenizer.decode(trained) == f"{ANSWER}<|im_end|><think>\n\n</think>\n\nBye<|im_end|>"
    ids, labels = get_template("qwen3").encode(tokenizer, history[:2])
    assert tokenizer.decode([i for i, label in zip(ids, labels) if label != -100]) == REPLY + "<|im_end|>"
    prompt = get_template("qwen3_5_nothink").encode_prompt(tokenizer, history)
    assert tokenizer.decode(prompt).endswith("Thanks<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")


class ScriptedChat(ChatModel):
    """A chat model whose reply is fixed, cut into small pieces as a streamer would."""

    def stream(self, prompt, max_new_tokens, stop=None, **kwargs):
        yield from (REPLY[i:i + 3] for i in range(0, len(REPLY), 3))


def test_api_returns_reasoning_content_apart_from_content(tiny_model_dir, tokenizer):
    chat = load_chat_model(BaseModelArguments(model_name_or_path=tiny_model_dir), ServeArguments(template_name="qwen3"))
    assert chat.reasoning
    scripted = ScriptedChat(chat.model, chat.tokenizer, chat.template, reasoning=True)
    request = {"model": "medicalgpt", "messages": [{"role": "user", "content": "头痛怎么办？"}]}
    with TestClient(openai_api.create_app(scripted)) as http:
        message = http.post("/v1/chat/completions", json=request).json()["choices"][0]["message"]
        assert (message["reasoning_content"], message["content"]) == (THOUGHT, ANSWER)
        events = http.post("/v1/chat/completions", json={**request, "stream": True}).text.split("\n\n")
    deltas = [json.loads(e[6:])["choices"][0]["delta"] for e in events if e.startswith("data: {")]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == THOUGHT
    assert "".join(d.get("content", "") for d in deltas) == ANSWER


def test_demo_shows_the_reasoning_as_a_thought_above_the_answer_and_does_not_send_it_back(tiny_model_dir):
    import gradio_demo

    chat = load_chat_model(BaseModelArguments(model_name_or_path=tiny_model_dir), ServeArguments(template_name="qwen3"))
    scripted = ScriptedChat(chat.model, chat.tokenizer, chat.template, reasoning=True)
    views = list(gradio_demo.responder(scripted)("头痛怎么办？", [], "", 0.0, 1.0, 16))
    thinking = views[2]  # a few pieces in: only the thought, still open
    assert len(thinking) == 1 and thinking[0].metadata == {"title": "Reasoning", "status": "pending"}
    thought, answer = views[-1]
    assert (thought.content, thought.metadata["status"], answer) == (THOUGHT, "done", ANSWER)
    shown = [{"role": "user", "content": "头痛怎么办？"},
             {"role": "assistant", "content": THOUGHT, "metadata": thought.metadata},
             {"role": "assistant", "content": ANSWER, "metadata": None}]
    assert gradio_demo.normalise_history(shown) == [{"role": "user", "content": "头痛怎么办？"},
                                                    {"role": "assistant", "content": ANSWER}]

"""A web chat with a trained model (Gradio): streaming replies, a system prompt and sampling controls.

    python gradio_demo.py --base_model outputs-merged
    python gradio_demo.py --base_model Qwen/Qwen2.5-0.5B-Instruct --lora_model outputs-sft --server_port 7860

It listens on 127.0.0.1 only; --server_name 0.0.0.0 opens it to the network, --share makes a public link.
"""

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import gradio as gr

from medicalgpt.args import parse_args
from medicalgpt.errors import UsageError, run_cli
from medicalgpt.serving import (
    BaseModelArguments,
    ChatModel,
    ServeArguments,
    invalid_unicode,
    load_chat_model,
    message_text,
)

logger = logging.getLogger(__name__)
ERROR_NOTE = "\n\n⚠️ "  # starts the note a reply ends with when it failed; dropped from the history sent back


@dataclass
class DemoArguments:
    server_name: str = field(default="127.0.0.1", metadata={"help": "Interface to listen on (0.0.0.0: network)."})
    server_port: int = field(default=7860, metadata={"help": "TCP port."})
    share: bool = field(default=False, metadata={"help": "Also publish a temporary public gradio.live link."})
    system_prompt: str = field(default="", metadata={"help": "Initial system prompt; empty = the template's."})
    temperature: float = field(default=0.7, metadata={"help": "Initial temperature; 0 = greedy decoding."})
    top_p: float = field(default=0.9, metadata={"help": "Initial nucleus-sampling top-p."})


def normalise_history(history: list[dict]) -> list[dict]:
    """Gradio history as the chat templates take it: role and plain-text content (the browser sends content as
    a list of {"type": "text", "text": ...} parts, gradio_client as a string)."""
    return [{"role": m["role"], "content": message_text(m["content"]).partition(ERROR_NOTE)[0]} for m in history]


def conversation(message: str, history: list[dict], system_prompt: str) -> list[dict]:
    """The messages to answer; text the tokenizer cannot take is a UsageError naming where it is."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    messages = system + normalise_history(history) + [{"role": "user", "content": message}]
    for where, text in [("message", message), ("system prompt", system_prompt),
                        *(("history", m["content"]) for m in messages)]:
        if problem := invalid_unicode(text):
            raise UsageError(f"The {where} has {problem}")
    return messages


def responder(chat: ChatModel) -> Callable[..., Iterator[str]]:
    """ChatInterface's fn: yields the reply so far after every generated piece. It never raises: an error ends the
    reply with a note saying what went wrong, and the chat stays usable (Gradio would leave the textbox disabled)."""

    def respond(message: str, history: list[dict], system_prompt: str, temperature: float, top_p: float,
                max_new_tokens: int) -> Iterator[str]:
        reply = ""
        try:
            prompt = chat.encode(conversation(message, history, system_prompt))
            for piece in chat.stream(prompt, int(max_new_tokens), temperature=temperature, top_p=top_p):
                reply += piece
                yield reply
        except UsageError as error:
            yield (reply + ERROR_NOTE + str(error)).lstrip()
        except Exception as error:
            logger.exception("generation failed")
            yield (reply + ERROR_NOTE + f"Generation failed: {type(error).__name__}: {error}").lstrip()

    return respond


def build_demo(chat: ChatModel, args: DemoArguments, max_new_tokens: int = 512) -> gr.ChatInterface:
    """The chat page; the chatbot's own trash button clears the conversation."""
    controls = [
        gr.Textbox(args.system_prompt, label="System prompt", lines=2),
        gr.Slider(0.0, 2.0, value=args.temperature, step=0.05, label="Temperature (0 = greedy)"),
        gr.Slider(0.05, 1.0, value=args.top_p, step=0.05, label="Top-p"),
        gr.Slider(1, max(2048, max_new_tokens), value=max_new_tokens, step=1, label="Max new tokens"),
    ]
    return gr.ChatInterface(responder(chat), additional_inputs=controls, title="MedicalGPT",
                            additional_inputs_accordion=gr.Accordion("Settings", open=False),
                            api_name="chat", analytics_enabled=False)  # no calls home: runs offline


def main(argv: list[str] | None = None) -> None:
    model_args, serve_args, demo_args = parse_args((BaseModelArguments, ServeArguments, DemoArguments), argv)
    chat = load_chat_model(model_args, serve_args)
    demo = build_demo(chat, demo_args, serve_args.max_new_tokens)
    demo.queue().launch(server_name=demo_args.server_name, server_port=demo_args.server_port, share=demo_args.share)


if __name__ == "__main__":
    run_cli(main)

"""A web chat with a trained model (Gradio): streaming replies, a system prompt and sampling controls.

    python gradio_demo.py --base_model outputs-merged
    python gradio_demo.py --base_model Qwen/Qwen2.5-0.5B-Instruct --lora_model outputs-sft --server_port 7860

Documents uploaded in the Settings (.txt/.md/.pdf/.docx/.jsonl) are indexed as rag.py does, and each answer is
grounded in their best chunks with the sources listed under it; --rag_index answers from an index built by rag.py
when nothing is uploaded.

--tools sample offers the model the sample medical tools (medicalgpt.sample_tools) and runs its calls here: the
chat shows each call (name and arguments) over its result, then the answer the model gives with the results.

It listens on 127.0.0.1 only; --server_name 0.0.0.0 opens it to the network, --share makes a public link.
Sign-in (Gradio's own): MEDICALGPT_DEMO_AUTH=user:password, or --auth_file with one user:password per line; a
password never goes on the command line, where other users of the machine can read it.
"""

import itertools
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from medicalgpt.args import parse_args
from medicalgpt.errors import UsageError, run_cli
from medicalgpt.rag.grounding import format_sources, grounded_messages
from medicalgpt.rag.index import Hit, RagArguments, RagIndex, build_index
from medicalgpt.rag.loaders import DOCUMENT_SUFFIXES
from medicalgpt.reasoning import ReasoningSplitter
from medicalgpt.sample_tools import SAMPLE_TOOLS, run_sample_tool
from medicalgpt.serving import (
    LOOPBACK,
    BaseModelArguments,
    ChatModel,
    ServeArguments,
    completion_budget,
    context_length,
    invalid_unicode,
    load_chat_model,
    message_text,
)
from medicalgpt.tool_calls import CallStream, CallTurn, ToolFormat, results_content

logger = logging.getLogger(__name__)
ERROR_NOTE = "\n\n⚠️ "  # starts the note a reply ends with when it failed; dropped from the history sent back
SOURCES_NOTE = "\n\n**Sources**\n"  # starts the sources under a grounded reply; dropped from the history too
TOOL_TITLE = "🛠️ "  # starts the title of a shown tool call
MAX_TOOL_ROUNDS = 4  # rounds of tool calls in one reply before the demo stops a model that keeps calling
DISCLAIMER = ("A research demo of a language model, not a doctor: its answers can be wrong or harmful. It does not "
              "give medical advice; for a diagnosis or treatment see a qualified professional, and in an emergency "
              "call your local emergency number.")
EXAMPLES = ["高血压患者日常饮食要注意什么？", "What are the common symptoms of type 2 diabetes?",
            "儿童发烧38.5度应该怎么处理？", "How is gout diagnosed?"]
TOOL_EXAMPLES = ["What is the usual adult dose of metformin?", "我有头痛，应该挂哪个科？",
                 "Which exam confirms gout?", "儿童布洛芬的剂量是多少？"]  # what the sample tools answer


@dataclass(frozen=True)
class LocalTools:
    """Tools the demo offers the model and runs itself: their schemas, and run(name, arguments) -> result text."""

    schemas: list[dict]
    run: Callable[[str, dict], str]


LOCAL_TOOLS = {"sample": LocalTools(SAMPLE_TOOLS, run_sample_tool)}


@dataclass
class DemoArguments:
    server_name: str = field(default="127.0.0.1", metadata={"help": "Interface to listen on (0.0.0.0: network)."})
    server_port: int = field(default=7860, metadata={"help": "TCP port."})
    share: bool = field(default=False, metadata={"help": "Also publish a temporary public gradio.live link."})
    system_prompt: str = field(default="", metadata={"help": "Initial system prompt; empty = the template's."})
    temperature: float = field(default=0.7, metadata={"help": "Initial temperature; 0 = greedy decoding."})
    top_p: float = field(default=0.9, metadata={"help": "Initial nucleus-sampling top-p."})
    tools: str | None = field(default=None, metadata={"choices": list(LOCAL_TOOLS), "help": (
        "sample: offer the model the sample medical tools (lookup_drug_dose, find_department, recommend_exam, "
        "answering from the knowledge table) and run the calls it makes here, showing each call, its result and "
        "the final answer. Default: no tools.")})
    auth_file: str | None = field(default=None, metadata={
        "help": "Ask for a sign-in: a file of user:password lines. Default: $MEDICALGPT_DEMO_AUTH (user:password); "
                "neither = open to anyone who can reach the page."})


def read_auth(auth_file: str | None) -> list[tuple[str, str]] | None:
    """The (user, password) pairs Gradio's launch(auth=...) takes, from --auth_file or $MEDICALGPT_DEMO_AUTH."""
    source = Path(auth_file).read_text(encoding="utf-8") if auth_file else os.environ.get("MEDICALGPT_DEMO_AUTH", "")
    pairs = [line.strip().partition(":") for line in source.splitlines() if line.strip()]
    if any(not user or not sep or not password for user, sep, password in pairs):
        raise UsageError(f"{auth_file or '$MEDICALGPT_DEMO_AUTH'}: expected user:password (one per line)")
    return [(user, password) for user, _, password in pairs] or None


def normalise_history(history: list[dict]) -> list[dict]:
    """Gradio history as the chat templates take it: role and plain-text content (the browser sends content as
    a list of {"type": "text", "text": ...} parts, gradio_client as a string). A failed reply loses the note that
    ended it: the note is for the reader, not the model; a reasoning model's thoughts are dropped, as its own
    template drops earlier reasoning, and so are the tool calls shown (the answer made with them stays)."""
    messages = [{"role": m["role"], "content": message_text(m["content"])} for m in history
                if not (m.get("metadata") or {}).get("title")]  # a shown thought or tool call: for the reader
    return [{**m, "content": m["content"].partition(ERROR_NOTE)[0].partition(SOURCES_NOTE)[0]}
            if m["role"] == "assistant" else m for m in messages]


def conversation(message: str, history: list[dict], system_prompt: str) -> list[dict]:
    """The messages to answer; an empty message, or text the tokenizer cannot take, is a UsageError."""
    if not message.strip():
        raise UsageError("Type a question first.")
    system = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    messages = system + normalise_history(history) + [{"role": "user", "content": message}]
    for where, text in [("message", message), ("system prompt", system_prompt),
                        *(("history", m["content"]) for m in messages)]:
        if problem := invalid_unicode(text):
            raise UsageError(f"The {where} has {problem}")
    return messages


def call_title(call: dict) -> str:
    """How a tool call is shown: its name and its arguments as JSON, like a function call."""
    return f"{TOOL_TITLE}{call['name']}({json.dumps(call['arguments'], ensure_ascii=False)})"


class ShownReply:
    """A reply as the chatbot shows it while it streams: a reasoning model's think block goes into a collapsible
    thought above the answer (Gradio's ChatMessage with a metadata title), as reasoning_content does in the API.
    With tools, text that may be turning into a call is held until the round ends (a call that does not parse is
    then shown as the text it is), and each call made, with its result, stays above the next round's answer."""

    def __init__(self, reasoning: bool, tool_format: ToolFormat | None = None):
        self.reasoning, self.tool_format = reasoning, tool_format
        self.steps: list = []  # earlier rounds: their thoughts, text and tool calls with results, in order
        self._start_round()

    def _start_round(self) -> None:
        self.splitter = ReasoningSplitter() if self.reasoning else None
        self.calls = CallStream(self.tool_format) if self.tool_format else None
        self.thought, self.answer = "", ""

    def feed(self, piece: str) -> None:
        self._add(self.splitter.feed(piece) if self.splitter else [("content", piece)])

    def finish(self) -> CallTurn | None:
        """Ends the round's text; the tool calls it made (None: it answered)."""
        self._add(self.splitter.flush() if self.splitter else [])
        if not self.calls:
            return None
        call, held = self.calls.finish()
        self.answer += held
        return call

    def _add(self, parts: list[tuple[str, str]]) -> None:
        for kind, text in parts:
            if kind == "content":
                self.answer += self.calls.feed(text) if self.calls else text
            else:
                self.thought += text

    def add_calls(self, calls: list[dict], results: list[str]) -> None:
        """Closes the round that made the calls: its thought and text, then each call (name and arguments) over its
        result, stay shown; the next round starts."""
        self.steps += self._thought(done=True) + ([self.answer.strip()] if self.answer.strip() else [])
        self.steps += [gr.ChatMessage(result, metadata={"title": call_title(call), "status": "done"})
                       for call, result in zip(calls, results, strict=True)]
        self._start_round()

    def view(self, note: str = "", done: bool = False) -> str | list:
        """What the chatbot shows: the answer so far with a note after it, under the thought and tool calls."""
        return self._shown(self.answer + note, done)

    def failed(self, message: str) -> str | list:
        """The reply so far ending with a note saying what went wrong (the note alone when nothing was said)."""
        return self._shown((self.answer + ERROR_NOTE + message).lstrip(), done=True)

    def _thought(self, done: bool) -> list:
        if not (self.splitter and self.splitter.saw_block):
            return []
        return [gr.ChatMessage(self.thought, metadata={"title": "Reasoning", "status": "done" if done else "pending"})]

    def _shown(self, answer: str, done: bool) -> str | list:
        above = self.steps + self._thought(done)
        if not above:
            return answer
        return above + [answer] if answer else above


class Documents:
    """What answers are grounded in: the uploaded documents (indexed in a folder of the demo's own, only new or
    changed files read again), else the --rag_index index, else nothing."""

    def __init__(self, rag_args: RagArguments):
        self.args = rag_args
        self.fixed = RagIndex(rag_args.rag_index, rag_args.reranker_model) if rag_args.rag_index else None
        self.upload_index = str(Path(tempfile.mkdtemp(prefix="medicalgpt-demo-")) / "index")

    def search(self, question: str, files: list[str] | None) -> tuple[list[Hit], list[str]]:
        """The question's best chunks, and a note for each uploaded file that could not be read."""
        index, notes = self.fixed, []
        if files:
            notes = build_index(files, self.upload_index)["skipped"]
            index = RagIndex(self.upload_index, self.args.reranker_model)
        return (index.search(question, self.args.rag_top_k, self.args.retrieval) if index else []), notes


def responder(chat: ChatModel, documents: Documents | None = None,
              tools: LocalTools | None = None) -> Callable[..., Iterator[str | list]]:
    """ChatInterface's fn: yields the reply so far after every generated piece (ShownReply.view), then with the
    sources it was grounded in. With tools, a reply that calls them has them run here, each call and its result
    shown, and the results sent back to the model (function_call and observation turns, the tool messages of the
    API) until it answers.
    It never raises: an error ends the reply with a note saying what went wrong, and the chat stays usable (Gradio
    would leave the textbox disabled)."""

    def respond(message: str, history: list[dict], system_prompt: str, temperature: float, top_p: float,
                max_new_tokens: int, files: list[str] | None = None) -> Iterator[str | list]:
        reply = ShownReply(chat.reasoning, chat.template.tools_format if tools else None)
        try:
            messages = conversation(message, history, system_prompt)
            hits, notes = documents.search(message, files) if documents else ([], [])
            messages = grounded_messages(messages, hits)
            for rounds in itertools.count():
                prompt = chat.encode(messages, tools.schemas if tools else None)
                # The slider's value is a default cut to the room the context leaves; no room is the API's 400.
                budget = completion_budget(len(prompt), None, int(max_new_tokens), context_length(chat.model))
                # Sliders send whole numbers as int (temperature 2), which generate() refuses: coerce.
                for piece in chat.stream(prompt, budget, temperature=float(temperature), top_p=float(top_p)):
                    reply.feed(piece)
                    yield reply.view()
                call = reply.finish()
                if call is None:
                    break
                if rounds == MAX_TOOL_ROUNDS:
                    raise UsageError(f"The model called tools again after {MAX_TOOL_ROUNDS} rounds of calls: "
                                     "stopped there")
                results = [tools.run(c["name"], c["arguments"]) for c in call.calls]
                reply.add_calls(call.calls, results)
                yield reply.view()
                messages = [*messages, {"role": "function_call", "content": call.content()},
                            {"role": "observation", "content": results_content(results)}]
            listed = format_sources(hits, reply.answer).replace("\n", "  \n")  # one line each in Markdown
            sources = "  \n".join([listed, *(f"⚠️ {note}" for note in notes)]).strip()
            yield reply.view(SOURCES_NOTE + sources if hits or notes else "", done=True)
        except UsageError as error:
            yield reply.failed(str(error))
        except Exception as error:
            logger.exception("generation failed")
            yield reply.failed(f"Generation failed: {type(error).__name__}: {error}")

    return respond


def has_text(message: str) -> dict:
    """The textbox's validator: an empty or blank message is not sent."""
    return gr.validate(bool(message.strip()), "Type a question first.")


def build_demo(chat: ChatModel, args: DemoArguments, max_new_tokens: int = 512,
               rag_args: RagArguments | None = None) -> gr.ChatInterface:
    """The chat page, with a disclaimer, example questions and documents to answer from; the chatbot's own trash
    button clears it."""
    controls = [
        gr.Textbox(args.system_prompt, label="System prompt", lines=2),
        gr.Slider(0.0, 2.0, value=args.temperature, step=0.05, label="Temperature (0 = greedy)"),
        gr.Slider(0.05, 1.0, value=args.top_p, step=0.05, label="Top-p"),
        gr.Slider(1, max(2048, max_new_tokens), value=max_new_tokens, step=1, label="Max new tokens"),
        gr.File(label="Documents to answer from (answers cite them)", file_count="multiple", type="filepath",
                file_types=list(DOCUMENT_SUFFIXES)),
    ]
    tools = LOCAL_TOOLS[args.tools] if args.tools else None
    respond = responder(chat, Documents(rag_args or RagArguments()), tools)
    examples = TOOL_EXAMPLES if tools else EXAMPLES
    return gr.ChatInterface(respond, additional_inputs=controls, title="MedicalGPT", description=DISCLAIMER,
                            examples=[[question] for question in examples],  # the settings stay as they are
                            additional_inputs_accordion=gr.Accordion("Settings", open=False),
                            validator=has_text, api_name="chat", analytics_enabled=False)  # no calls home: offline


def main(argv: list[str] | None = None) -> None:
    model_args, serve_args, demo_args, rag_args = parse_args(
        (BaseModelArguments, ServeArguments, DemoArguments, RagArguments), argv)
    auth = read_auth(demo_args.auth_file)
    chat = load_chat_model(model_args, serve_args)
    if not auth and (demo_args.share or demo_args.server_name not in LOOPBACK):
        logger.warning("Serving the chat on %s without a sign-in: anyone who can reach it can use it (set "
                       "MEDICALGPT_DEMO_AUTH=user:password or --auth_file)",
                       "a public gradio.live link" if demo_args.share else demo_args.server_name)
    demo = build_demo(chat, demo_args, serve_args.max_new_tokens, rag_args)
    demo.queue().launch(server_name=demo_args.server_name, server_port=demo_args.server_port, share=demo_args.share,
                        auth=auth)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    run_cli(main)

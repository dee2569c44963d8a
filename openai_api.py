"""An OpenAI-compatible chat API for a trained model: GET /v1/models and POST /v1/chat/completions.

    MEDICALGPT_API_KEY=sk-local python openai_api.py --base_model outputs-merged --port 8000
    python openai_api.py --base_model Qwen/Qwen2.5-0.5B-Instruct --lora_model outputs-sft
    curl http://127.0.0.1:8000/v1/chat/completions -H "Authorization: Bearer sk-local" \
        -H "Content-Type: application/json" \
        -d '{"model": "medicalgpt", "messages": [{"role": "user", "content": "高血压用什么药？"}]}'

Any OpenAI client works (base_url=http://127.0.0.1:8000/v1). One model serves one request at a time;
the others queue. With --rag_index (an index built by rag.py) each request's last user turn is answered from the
top --rag_top_k chunks, and the response carries them as an extra top-level field "sources" (in the first chunk
when streamed): [{"id": n, "file", "page", "line", "score", "text"}], where [n] in the answer cites source n.
--backend vllm hands the same flags to vLLM's own OpenAI server (CUDA GPU only).
"""

import importlib.util
import logging
import os
import secrets
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import anyio
import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from transformers import StoppingCriteria

from medicalgpt.args import ModelArguments, parse_args
from medicalgpt.errors import UsageError, run_cli
from medicalgpt.modeling import model_path
from medicalgpt.openai_protocol import (
    INVALID_UNICODE,
    ApiError,
    ChatCompletionRequest,
    ChunkWriter,
    StopStrings,
    completion_body,
    error_body,
    sse,
    token_logprob,
)
from medicalgpt.rag.grounding import grounded_messages, last_user_text, sources
from medicalgpt.rag.index import Hit, RagArguments, RagIndex
from medicalgpt.reasoning import ReasoningSplitter, split_reasoning
from medicalgpt.serving import (
    LOOPBACK,
    BaseModelArguments,
    ChatModel,
    ContextLengthError,
    ServeArguments,
    completion_budget,
    context_length,
    load_chat_model,
)
from medicalgpt.templates import CHAT_TEMPLATE_DIR, get_template
from medicalgpt.tool_calls import CallStream, CallTurn

logger = logging.getLogger(__name__)
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024  # far more text than any context holds


@dataclass
class ApiArguments:
    host: str = field(default="127.0.0.1", metadata={
        "help": "Interface to listen on; 0.0.0.0 exposes the server to the network (set an API key then)."})
    port: int = field(default=8000, metadata={"help": "TCP port."})
    api_key_file: str | None = field(default=None, metadata={
        "help": "A file whose first line is the key every request must send as `Authorization: Bearer <key>`. "
                "Default: $MEDICALGPT_API_KEY; neither = no key needed. (No flag takes the key itself: `ps` shows "
                "command lines.)"})
    model_name: str = field(default="medicalgpt", metadata={"help": "The model id clients ask for."})
    max_model_len: int | None = field(default=None, metadata={
        "help": "Most tokens a request may use, prompt + completion; longer ones get a 400. Default: the model's "
                "max_position_embeddings."})
    max_request_bytes: int = field(default=DEFAULT_MAX_REQUEST_BYTES, metadata={
        "help": "Largest request body accepted; larger ones get a 413 before they are read."})
    docs: bool = field(default=False, metadata={
        "help": "Serve the interactive API docs at /docs and /redoc (their pages load scripts from a CDN)."})
    backend: str = field(default="transformers", metadata={
        "help": "vllm: exec vLLM's OpenAI server with these flags (needs vllm and a CUDA GPU).",
        "choices": ["transformers", "vllm"]})


class TokenCounter(StoppingCriteria):
    """Counts the generated tokens (usage) and remembers the last one (finish_reason); never stops anything."""

    def __init__(self, prompt_length: int):
        self.prompt_length = prompt_length
        self.generated = 0
        self.last_token: int | None = None

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        self.generated = input_ids.shape[1] - self.prompt_length
        self.last_token = int(input_ids[0, -1])
        return False


class Completion:
    """One request's generation: its text cut at the stop strings, its token usage and finish reason."""

    def __init__(self, chat: ChatModel, request: ChatCompletionRequest, max_new_tokens: int,
                 max_model_len: int | None = None, hits: list[Hit] | None = None):
        self.chat, self.request = chat, request
        tools = request.tool_schemas()
        self.prompt = chat.encode(grounded_messages(request.conversation(), hits or []), tools)
        # A required (or named) call is started in the model's mouth; the parser reads it from there.
        required, name = request.forced_call()
        self.call_prefix = chat.template.tools_format.forced_prefix(name) if tools and required else ""
        self.prompt += chat.tokenizer.encode(self.call_prefix, add_special_tokens=False) if self.call_prefix else []
        self.calls = CallStream(chat.template.tools_format, self.call_prefix) if tools else None
        self.max_new_tokens = completion_budget(len(self.prompt), request.max_completion_tokens or request.max_tokens,
                                                max_new_tokens, max_model_len)
        self.stop = threading.Event()  # set when the client goes away
        self.counter = TokenCounter(len(self.prompt))
        self.stop_strings = StopStrings(request.stop_strings())
        self.outputs: list = []  # generate()'s output, with the logits of each step, when logprobs are asked for

    def pieces(self) -> Iterator[str]:
        """The completion's text, piece by piece; generation errors propagate."""
        stream = self.chat.stream(self.prompt, self.max_new_tokens, stop=self.stop, stopping_criteria=[self.counter],
                                  temperature=self.request.temperature, top_p=self.request.top_p,
                                  seed=self.request.seed, outputs=self.outputs if self.request.logprobs else None)
        try:
            for piece in stream:
                if text := self.stop_strings.feed(piece):
                    yield text
                if self.stop_strings.hit:
                    return
            if tail := self.stop_strings.flush():
                yield tail
        finally:
            stream.close()  # ends the generation thread and frees the model for the next request

    @property
    def finish_reason(self) -> str:
        eos = self.chat.model.generation_config.eos_token_id or []
        ran_out = self.counter.generated >= self.max_new_tokens and self.counter.last_token not in eos
        return "length" if ran_out and not self.stop_strings.hit else "stop"

    def logprobs(self, text: str) -> dict | None:
        """OpenAI's logprobs of each generated token of `text` (up to the end-of-turn token or the stop string)
        from the model's raw logits, with the top_logprobs most likely alternatives; None unless asked for."""
        if not self.request.logprobs:
            return None
        output, eos = self.outputs[0], self.chat.model.generation_config.eos_token_id or []
        decode = self.chat.tokenizer.decode
        content, shown = [], 0
        for token_id, logits in zip(output.sequences[0, len(self.prompt):].tolist(), output.logits, strict=True):
            if token_id in eos or shown >= len(text):
                break
            shown += len(decode([token_id]))
            logprobs = torch.log_softmax(logits[0].float(), dim=-1)
            top = torch.topk(logprobs, self.request.top_logprobs or 0)
            content.append({**token_logprob(decode([token_id]), logprobs[token_id].item()), "top_logprobs": [
                token_logprob(decode([i]), value) for value, i in zip(top.values.tolist(), top.indices.tolist())]})
        return {"content": content}

    def tool_call(self, text: str) -> tuple[CallTurn | None, str]:
        """A whole reply as (its tool call, its text); a call that does not parse stays text."""
        if self.calls is None:
            return None, text
        sent = self.calls.feed(text)
        call, rest = self.calls.finish()
        return (call, call.text) if call else (None, sent + rest)

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.prompt), "completion_tokens": self.counter.generated,
                "total_tokens": len(self.prompt) + self.counter.generated}

    def _deltas(self, writer: ChunkWriter, parts: list[tuple[str, str]]) -> Iterator[str]:
        """Chunks of reasoning and content pieces; content that may be a tool call is held by self.calls."""
        for field_name, part in parts:
            if field_name == "content" and self.calls:
                part = self.calls.feed(part)
            if part:
                yield writer.choice({field_name: part})

    def events(self, writer: ChunkWriter) -> Iterator[str]:
        """The server-sent events; a generation error becomes an error event, and [DONE] always ends them."""
        yield writer.choice({"role": "assistant", "content": ""})
        splitter = ReasoningSplitter() if self.chat.reasoning else None
        try:
            for text in self.pieces():
                yield from self._deltas(writer, splitter.feed(text) if splitter else [("content", text)])
            yield from self._deltas(writer, splitter.flush() if splitter else [])
            call, rest = self.calls.finish() if self.calls else (None, "")
            if rest:  # held as a possible call, but it is text
                yield writer.choice({"content": rest})
            yield from writer.tool_calls(call) if call else []
            yield writer.choice({}, "tool_calls" if call else self.finish_reason)
            if self.request.stream_options and self.request.stream_options.include_usage:
                yield writer.usage(self.usage())
        except Exception as error:  # the status line is long gone: tell the client in the stream
            logger.exception("generation failed")
            yield sse(error_body(failure_message(error), "server_error"))
        yield sse("[DONE]")


def failure_message(error: Exception) -> str:
    return f"Generation failed: {type(error).__name__}: {error}"  # queue.Empty (a stalled generation) has no text


async def stream_events(completion: Completion, writer: ChunkWriter, turn: anyio.Lock) -> AsyncIterator[str]:
    """Completion.events once it is this request's turn, each step in a worker thread."""
    events = completion.events(writer)
    async with turn:
        try:
            while (event := await run_in_threadpool(next, events, None)) is not None:
                yield event
        finally:
            # Also reached when the client disconnects (Starlette cancels this task): stop generating now and
            # free the model. Shielded, because in a cancelled task every await would be cancelled again.
            completion.stop.set()
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(events.close)


class BodySizeLimit:
    """ASGI middleware: a request body over max_bytes is a 413, refused from its Content-Length before any of it
    is read, or as soon as a chunked body grows past the limit (Starlette has no such limit of its own)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        declared = int(length) if length.isdigit() else 0
        received = 0

        def too_large() -> HTTPException:  # FastAPI answers an HTTPException raised while it reads the body
            return HTTPException(413, f"The request body is larger than {self.max_bytes} bytes (the server's "
                                      "--max_request_bytes).")

        async def limited_receive() -> dict:
            nonlocal received
            if declared > self.max_bytes:
                raise too_large()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large()
            return message

        await self.app(scope, limited_receive, send)


async def complete(completion: Completion, turn: anyio.Lock, http_request: Request) -> str:
    """The whole completion text once it is this request's turn. A client that disconnects, while queued or during
    generation, stops it: nobody would read the answer, and the requests queued behind it would wait."""

    async def stop_on_disconnect() -> None:
        while (await http_request.receive())["type"] != "http.disconnect":
            pass
        completion.stop.set()

    text, failure = "", None
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(stop_on_disconnect)
        try:
            async with turn:
                text = await run_in_threadpool(lambda: "".join(completion.pieces()))
        except Exception as error:  # raised outside the task group, which would wrap it in an ExceptionGroup
            failure = error
        tasks.cancel_scope.cancel()
    if failure:
        raise ApiError(500, failure_message(failure), "server_error") from failure
    return text


def require_api_key(api_key: str | None):
    """A dependency that checks `Authorization: Bearer <api_key>` (no check without a key)."""

    def check(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if api_key and not (scheme.lower() == "bearer" and secrets.compare_digest(token.encode(), api_key.encode())):
            raise ApiError(401, "Invalid or missing API key: send `Authorization: Bearer <key>`.",
                           code="invalid_api_key")

    return check


def add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI shapes it: {"error": {"message", "type", "param", "code"}}."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body, status_code=error.status)

    @app.exception_handler(ContextLengthError)
    async def context_length_error(request: Request, error: ContextLengthError) -> JSONResponse:
        return JSONResponse(error_body(str(error), "invalid_request_error", "messages", "context_length_exceeded"),
                            status_code=400)

    @app.exception_handler(UsageError)  # e.g. a conversation the chat template cannot end with
    async def usage_error(request: Request, error: UsageError) -> JSONResponse:
        return JSONResponse(error_body(str(error), "invalid_request_error"), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        if first["type"] == "json_invalid" or tuple(first["loc"]) == ("body",):
            message = "The body must be a JSON object, sent with Content-Type: application/json"
            return JSONResponse(error_body(message, "invalid_request_error"), status_code=400)
        # Text that cannot be tokenised is a bad request (400); other schema problems are 422s.
        unicode = [e for e in error.errors() if e["type"] == INVALID_UNICODE]
        errors, status = (unicode, 400) if unicode else (error.errors(), 422)
        # Every problem in the message (a union field reports one per alternative); the top-level field as param.
        message = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in errors)
        return JSONResponse(error_body(message, "invalid_request_error", str(errors[0]["loc"][1])), status_code=status)

    @app.exception_handler(HTTPException)  # unknown paths, wrong methods
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(error.detail), "invalid_request_error"), status_code=error.status_code,
                            headers=error.headers)


def create_app(chat: ChatModel, model_name: str = "medicalgpt", api_key: str | None = None,
               max_new_tokens: int = 512, max_model_len: int | None = None, docs: bool = False,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               search: Callable[[str], list[Hit]] | None = None) -> FastAPI:
    """The API around one chat model; max_model_len defaults to the model's context length. With `search` (a
    question's document chunks), answers are grounded in them and return them as "sources".

    Requests wait for their `turn` in the event loop, not in worker threads: queued requests then cannot fill
    the thread pool that the running generation needs to make progress.
    """
    app = FastAPI(title="MedicalGPT", dependencies=[Depends(require_api_key(api_key))],
                  **({} if docs else {"docs_url": None, "redoc_url": None}))
    app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    add_error_handlers(app)
    turn = anyio.Lock()
    max_model_len = max_model_len or context_length(chat.model)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "medicalgpt"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, http_request: Request):
        if request.model != model_name:
            raise ApiError(404, f"The model '{request.model}' does not exist; this server serves '{model_name}'.",
                           param="model", code="model_not_found")
        if unsupported := request.unsupported():
            raise ApiError(400, unsupported[1], param=unsupported[0])
        # Rendering and tokenising a long prompt takes a while: in a worker thread, so other requests go on.
        hits = await run_in_threadpool(search, last_user_text(request.conversation())) if search else None
        extra = {"sources": sources(hits)} if hits is not None else {}
        completion = await run_in_threadpool(Completion, chat, request, max_new_tokens, max_model_len, hits)
        if request.stream:
            return StreamingResponse(stream_events(completion, ChunkWriter(model_name, extra), turn),
                                     media_type="text/event-stream")
        text = await complete(completion, turn, http_request)
        logprobs = await run_in_threadpool(completion.logprobs, text)  # a softmax over the vocabulary per token
        reasoning, text = split_reasoning(text) if chat.reasoning else (None, text)
        call, text = completion.tool_call(text)
        return {**completion_body(model_name, text, completion.finish_reason, completion.usage(), logprobs,
                                  reasoning, call), **extra}

    return app


def check_vllm() -> None:
    """--backend vllm needs both the package and a CUDA GPU; say which is missing and what to do instead."""
    missing = [need for need, present in (("the vllm package", importlib.util.find_spec("vllm") is not None),
                                          ("a CUDA GPU", torch.cuda.is_available())) if not present]
    if missing:
        raise UsageError(f"--backend vllm needs {' and '.join(missing)}: use --backend transformers, "
                         "or run vllm_deployment.sh on a GPU machine")


def vllm_command(model_args: ModelArguments, serve_args: ServeArguments, api_args: ApiArguments) -> list[str]:
    """vLLM's own OpenAI server with our flags; a LoRA adapter is served under --model_name."""
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise UsageError("--backend vllm: pass vLLM's own --quantization through vllm_deployment.sh instead")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path(model_args),
           "--host", api_args.host, "--port", str(api_args.port), "--dtype", model_args.dtype]
    if api_args.max_model_len:
        cmd += ["--max-model-len", str(api_args.max_model_len)]
    if model_args.trust_remote_code:
        cmd.append("--trust-remote-code")
    if serve_args.template_name:
        cmd += ["--chat-template", str(CHAT_TEMPLATE_DIR / f"{get_template(serve_args.template_name).name}.jinja")]
    if serve_args.lora_model:
        return cmd + ["--served-model-name", f"{api_args.model_name}-base", "--enable-lora",
                      "--lora-modules", f"{api_args.model_name}={serve_args.lora_model}"]
    return cmd + ["--served-model-name", api_args.model_name]


def read_api_key(path: str) -> str:
    try:
        key = next(iter(Path(path).read_text(encoding="utf-8").splitlines()), "").strip()
    except OSError as error:
        raise UsageError(f"--api_key_file {path}: {error.strerror}") from None
    if not key:
        raise UsageError(f"--api_key_file {path}: the first line is empty; put the key there")
    return key


def main(argv: list[str] | None = None) -> None:
    model_args, serve_args, api_args, rag_args = parse_args(
        (BaseModelArguments, ServeArguments, ApiArguments, RagArguments), argv)
    api_key = read_api_key(api_args.api_key_file) if api_args.api_key_file else os.environ.get("MEDICALGPT_API_KEY")
    if api_args.backend == "vllm":
        if rag_args.rag_index:
            raise UsageError("--rag_index works with --backend transformers only (vLLM's server has no retrieval)")
        check_vllm()
        cmd = vllm_command(model_args, serve_args, api_args)
        os.execvpe(cmd[0], cmd, {**os.environ, "VLLM_API_KEY": api_key} if api_key else dict(os.environ))
    search = partial(RagIndex(rag_args.rag_index, rag_args.reranker_model).search, k=rag_args.rag_top_k,
                     retrieval=rag_args.retrieval) if rag_args.rag_index else None  # a stale index stops here
    chat = load_chat_model(model_args, serve_args)
    if api_args.host not in LOOPBACK and not api_key:
        logger.warning("Serving on %s without an API key: anyone who can reach it can use it", api_args.host)
    uvicorn.run(create_app(chat, api_args.model_name, api_key, serve_args.max_new_tokens, api_args.max_model_len,
                           api_args.docs, api_args.max_request_bytes, search), host=api_args.host, port=api_args.port)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    run_cli(main)

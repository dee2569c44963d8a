"""Load test for an OpenAI-compatible chat server (openai_api.py, vLLM, or any other): many concurrent streaming
requests, each checked for well-formed server-sent events ending in [DONE] and for one completion id.

Prints latency and time-to-first-token percentiles and the tokens/s, and writes JSON (default
benchmarks/results/serve_load.json).

    export MEDICALGPT_API_KEY=sk-local       # the server and this client both read it; keys stay off command lines
    python openai_api.py --base_model outputs-merged &
    python -m benchmarks.serve_load --base_url http://127.0.0.1:8000/v1 --num_requests 64
"""

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from medicalgpt.answering import read_requests
from medicalgpt.args import parse_args
from medicalgpt.errors import run_cli


@dataclass
class LoadArguments:
    base_url: str = field(default="http://127.0.0.1:8000/v1", metadata={"help": "The server's /v1 URL."})
    model: str = field(default="medicalgpt", metadata={"help": "The model id to ask for."})
    questions_file: str = field(default="data/sft/validation", metadata={
        "help": "Prompts: the conversations of these data files (repeated, each copy made distinct, if too few)."})
    num_requests: int = field(default=64, metadata={"help": "Requests in all."})
    concurrency: int = field(default=64, metadata={"help": "Requests in flight at once."})
    max_tokens: int = field(default=32, metadata={"help": "max_tokens of every request."})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy."})
    timeout: float = field(default=600.0, metadata={"help": "Seconds a request may take, queueing included."})
    output_file: str = field(default="benchmarks/results/serve_load.json")


@dataclass
class StreamResult:
    """One streamed request as the client saw it."""

    status: int
    text: str = ""
    ids: set[str] = field(default_factory=set)  # completion ids of its chunks: exactly one when well-formed
    finish_reason: str | None = None
    completion_tokens: int = 0  # from the usage chunk
    done: bool = False  # the stream ended with `data: [DONE]`
    problems: list[str] = field(default_factory=list)  # SSE format violations and error events
    first_token_s: float | None = None
    latency_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and len(self.ids) == 1 and not self.problems


def distinct_prompts(questions_file: str, n: int) -> list[list[dict]]:
    """n conversations; repeats get ' (copy k)' on their last turn, so no two requests ask the same."""
    conversations = [request.get("messages") or [{"role": "user", "content": request["prompt"]}]
                     for request in read_requests(questions_file)]
    prompts = []
    for i in range(n):
        messages, copy = conversations[i % len(conversations)], i // len(conversations)
        last = {**messages[-1], "content": f"{messages[-1]['content']} (copy {copy})"} if copy else messages[-1]
        prompts.append([*messages[:-1], last])
    return prompts


def read_event(result: StreamResult, data: str, start: float) -> None:
    """Fold one `data:` payload into the result."""
    if result.done:
        result.problems.append(f"data after [DONE]: {data[:80]}")
        return
    if data == "[DONE]":
        result.done = True
        return
    try:
        chunk = json.loads(data)
    except ValueError:
        result.problems.append(f"not JSON: {data[:80]}")
        return
    if "error" in chunk:
        result.problems.append(f"error event: {chunk['error'].get('message')}")
        return
    result.ids.add(chunk["id"])
    if chunk.get("usage"):
        result.completion_tokens = chunk["usage"]["completion_tokens"]
    for choice in chunk["choices"]:
        if content := choice["delta"].get("content"):
            result.first_token_s = result.first_token_s or time.perf_counter() - start
            result.text += content
        result.finish_reason = choice.get("finish_reason") or result.finish_reason


def stream_chat(client: httpx.Client, messages: list[dict], args: LoadArguments) -> StreamResult:
    """One streaming chat completion, read event by event: `data: <json>` lines, each followed by a blank line."""
    body = {"model": args.model, "messages": messages, "max_tokens": args.max_tokens,
            "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    try:
        with client.stream("POST", "chat/completions", json=body) as response:
            result = StreamResult(response.status_code)
            if response.status_code == 200:
                read_events(result, response.iter_lines(), start)
            else:
                result.problems.append(response.read().decode(errors="replace")[:200])
    except httpx.HTTPError as error:  # refused, reset, timed out: a failed request, not a failed run
        result = StreamResult(0, problems=[f"{type(error).__name__}: {error}"])
    result.latency_s = time.perf_counter() - start
    return result


def read_events(result: StreamResult, lines, start: float) -> None:
    """Each event must be one `data: ...` line followed by a blank line."""
    expect_blank = False
    for line in lines:
        if line.startswith("data: ") and not expect_blank:
            read_event(result, line[len("data: "):], start)
        elif line or not expect_blank:
            result.problems.append(f"unexpected line: {line[:80]!r}")
        expect_blank = bool(line)
    if expect_blank:
        result.problems.append("the stream ended inside an event")


def run_load(prompts: list[list[dict]], args: LoadArguments) -> tuple[list[StreamResult], float]:
    """Every prompt streamed, args.concurrency at a time; the results in prompt order and the wall time."""
    # The key comes from the environment only: `ps` shows command lines.
    api_key = os.environ.get("MEDICALGPT_API_KEY") or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    with httpx.Client(base_url=args.base_url.rstrip("/") + "/", headers=headers, timeout=args.timeout,
                      limits=limits) as client, ThreadPoolExecutor(args.concurrency) as pool:
        start = time.perf_counter()
        results = list(pool.map(lambda messages: stream_chat(client, messages, args), prompts))
        return results, time.perf_counter() - start


def percentiles(values: list[float]) -> dict:
    p50, p95, p99 = np.percentile(values, [50, 95, 99]) if values else (float("nan"),) * 3
    return {"p50": round(float(p50), 4), "p95": round(float(p95), 4), "p99": round(float(p99), 4)}


def summarize(results: list[StreamResult], wall_s: float) -> dict:
    """Percentiles over the requests that succeeded; throughput over the whole run."""
    ok = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    return {"requests": len(results), "succeeded": len(ok), "wall_s": round(wall_s, 3),
            "requests_per_s": round(len(ok) / wall_s, 2), "completion_tokens": tokens,
            "tokens_per_s": round(tokens / wall_s, 1),
            "latency_s": percentiles([r.latency_s for r in ok]),
            "first_token_s": percentiles([r.first_token_s for r in ok if r.first_token_s is not None])}


def print_table(summary: dict) -> None:
    print("| seconds | p50 | p95 | p99 |\n|---|---|---|---|")
    for name, key in (("latency", "latency_s"), ("time to first token", "first_token_s")):
        row = summary[key]
        print(f"| {name} | {row['p50']:.3f} | {row['p95']:.3f} | {row['p99']:.3f} |")
    print(f"\n{summary['succeeded']}/{summary['requests']} requests succeeded in {summary['wall_s']:.2f} s: "
          f"{summary['requests_per_s']:.1f} requests/s, {summary['completion_tokens']} completion tokens, "
          f"{summary['tokens_per_s']:.0f} tokens/s")


def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args((LoadArguments,), argv)
    results, wall_s = run_load(distinct_prompts(args.questions_file, args.num_requests), args)
    summary = summarize(results, wall_s)
    print_table(summary)
    failures = [{"status": r.status, "problems": r.problems[:3]} for r in results if not r.ok]
    output = {"settings": asdict(args), **summary, "failures": failures[:10]}
    Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output_file).write_text(json.dumps(output, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return output


if __name__ == "__main__":
    run_cli(main)

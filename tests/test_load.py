"""openai_api.py under load, as a user starts it (its own process, uvicorn on a loopback port, an API key): 64
concurrent streams that must each be well-formed and carry their own answer, then bad requests that must get
OpenAI-shaped errors without hurting the server."""

import json
from collections.abc import Iterator

import httpx
import pytest
from test_serving import model_dir  # noqa: F401  (the fixture: a tiny model whose greedy answers differ by prompt)

from benchmarks.serve_load import LoadArguments, distinct_prompts, print_table, run_load, summarize
from tests.ports import api_server

KEY = "sk-load-test"
MAX_TOKENS = 8
HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory) -> Iterator[str]:  # noqa: F811
    """openai_api.py in a subprocess; its /v1 URL once it answers."""
    with api_server(model_dir, KEY, tmp_path_factory.mktemp("server") / "server.log") as url:
        yield url


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def chat(url: str, body: dict | bytes, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body)
    return httpx.post(f"{url}/chat/completions", content=content, timeout=60,
                      headers={"content-type": "application/json", **(auth() if headers is None else headers)})


def test_64_concurrent_streams_are_well_formed_and_each_carries_its_own_answer(server):
    prompts = distinct_prompts("data/sft/validation", 64)
    args = LoadArguments(base_url=server, max_tokens=MAX_TOKENS, timeout=120)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDICALGPT_API_KEY", KEY)
        results, wall_s = run_load(prompts, args)
    summary = summarize(results, wall_s)
    print_table(summary)  # shown with pytest -s
    assert [r.problems for r in results if not r.ok] == []  # 200, data lines + blank lines, one id, [DONE]
    assert len({id_ for r in results for id_ in r.ids}) == 64
    assert all(r.completion_tokens >= 1 and r.finish_reason in ("stop", "length") for r in results)
    # The same prompts one at a time, not streamed: a chunk delivered to the wrong stream would show here.
    alone = [chat(server, {"model": "medicalgpt", "messages": m, "max_tokens": MAX_TOKENS, "temperature": 0})
             .json()["choices"][0]["message"]["content"] for m in prompts]
    assert [r.text for r in results] == alone
    assert len(set(alone)) > 32  # the answers differ, so the comparison can tell streams apart


LONG = " ".join(["fever"] * 3000)  # more tokens than the tiny model's 2048 positions


@pytest.mark.parametrize("body, headers, status, param, code", [
    (b'{"model": "medicalgpt", "messages": [', None, 400, None, None),
    ({"model": "medicalgpt", "messages": [{"role": "user", "content": LONG}]}, None, 400, "messages",
     "context_length_exceeded"),
    ({"model": "medicalgpt", "messages": HELLO, "max_tokens": 5000}, None, 400, "messages", "context_length_exceeded"),
    ({"model": "medicalgpt", "messages": HELLO, "max_tokens": -1}, None, 422, "max_tokens", None),
    ({"model": "medicalgpt", "messages": HELLO, "temperature": 2.5}, None, 422, "temperature", None),
    ({"model": "medicalgpt", "messages": HELLO, "n": 3}, None, 400, "n", None),
    ({"model": "gpt-4o", "messages": HELLO}, None, 404, "model", "model_not_found"),
    ({"model": "medicalgpt", "messages": HELLO}, {}, 401, None, "invalid_api_key"),
    ({"model": "medicalgpt", "messages": HELLO}, auth("sk-wrong"), 401, None, "invalid_api_key"),
])
def test_bad_requests_get_openai_shaped_errors(server, body, headers, status, param, code):
    for stream in (False, True):  # a streaming request fails the same way, before any event
        sent = body if isinstance(body, bytes) else {**body, "stream": stream}
        response = chat(server, sent, headers)
        assert response.status_code == status
        error = response.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
        assert (error["param"], error["code"]) == (param, code)


def test_the_server_still_answers_afterwards(server):
    response = chat(server, {"model": "medicalgpt", "messages": HELLO, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1

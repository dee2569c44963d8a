"""A free loopback port, and openai_api.py started as a user starts it, for the tests that need a real server."""

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def api_server(model_dir: str, api_key: str, log: Path, timeout: float = 90) -> Iterator[str]:
    """openai_api.py on model_dir in its own process (uvicorn on a loopback port, the key in its environment);
    its /v1 URL once it answers, and the process stopped afterwards."""
    url = f"http://127.0.0.1:{(port := free_port())}/v1"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "openai_api.py", "--base_model", model_dir, "--port", str(port)],
                                   cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                        "MEDICALGPT_API_KEY": api_key})
    try:
        deadline = time.monotonic() + timeout
        while not answers(url, api_key):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(10)


def answers(url: str, api_key: str) -> bool:
    try:
        return httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False

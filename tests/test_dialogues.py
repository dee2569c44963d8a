"""generate_dialogues.py: personas (MedicalGPT's seed format, the knowledge table), role play against a
fault-injecting stub API (429s, 500s, dropped connections, malformed JSON: retried, resumed, nothing lost or
duplicated), the reviewer, one-line endpoint errors, and the end-to-end path: our openai_api.py on the tiny model
-> dialogues -> validate_data.py -> a few SFT steps."""

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_serving import model_dir  # noqa: F401  (the fixture: a tiny model whose greedy answers differ by prompt)

import generate_dialogues
import supervised_finetuning
import validate_data
from medicalgpt.errors import DataError, UsageError
from medicalgpt.synthesis import content_id, knowledge_personas, read_personas
from tests.ports import api_server, free_port

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-stub"
# Lines as MedicalGPT's role_play_data/seed_patient_role.jsonl has them (markdown, a leading space).
SEED_LINES = [
    {"system_prompt": "张大爷\n**性别**：男  \n**年龄**：75岁  \n**病情描述**：患有慢性阻塞性肺病，需要长期吸氧。"},
    {"system_prompt": " 李女士\n- **年龄**: 38岁\n- **健康状况**: 慢性腰肌劳损"},
    {"system_prompt": "Mr Green, 52, asks about an overdose of paracetamol"},  # the stub reviewer calls this UNSAFE
    {"id": "twin-a", "system_prompt": "Ms Twin, 30, migraine"},
    {"id": "twin-b", "system_prompt": "Ms Twin, 30, migraine"},  # says what twin-a says: a duplicate
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_seed_personas_are_read_as_medicalgpt_writes_them(tmp_path):
    seed = write_jsonl(tmp_path / "seed_patient_role.jsonl", [*SEED_LINES, SEED_LINES[0]])
    personas = read_personas(str(seed))
    assert [p.id for p in personas] == [content_id(SEED_LINES[0]["system_prompt"]),
                                        content_id(SEED_LINES[1]["system_prompt"].strip()),
                                        content_id(SEED_LINES[2]["system_prompt"]), "twin-a", "twin-b"]
    assert personas[1].system_prompt.startswith("李女士")
    write_jsonl(seed, [SEED_LINES[0], {"prompt": "no system_prompt"}])
    with pytest.raises(DataError, match=r"seed_patient_role.jsonl:2: expected \{\"system_prompt\""):
        read_personas(str(seed))


def test_knowledge_personas_are_distinct_reproducible_and_extendable():
    personas = knowledge_personas(200, "zh", seed=7)
    assert len({p.id for p in personas}) == 200 and len({p.system_prompt for p in personas}) == 200
    assert knowledge_personas(200, "zh", seed=7) == personas
    assert knowledge_personas(50, "zh", seed=7) == personas[:50]  # a larger --num_dialogues extends a run
    assert knowledge_personas(50, "zh", seed=8) != personas[:50]
    assert all("-male-" in p.id for p in knowledge_personas(1000, "en", 0) if "prostatic" in p.id)
    with pytest.raises(UsageError, match="1000 distinct personas"):
        knowledge_personas(1001, "en", 0)


# --- a fault-injecting stub of an OpenAI-compatible API ----------------------------------------------------------


class StubAPI(ThreadingHTTPServer):
    """Chat completions that play both roles and the reviewer predictably (the roles' replies with the speaker
    labels role-playing models write); `faults` are served first, one per chat request: 429, 500, drop (close
    without an answer), malformed (a 200 with broken JSON). It keeps the system prompts it was sent."""

    def __init__(self):
        super().__init__(("127.0.0.1", free_port()), StubHandler)
        self.faults: list[str] = []
        self.chat_requests = 0
        self.system_prompts: list[str] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


def stub_reply(messages: list[dict]) -> str:
    system, said = messages[0]["content"], sum(m["role"] == "assistant" for m in messages)
    if "SAFE or UNSAFE" in system:
        return "UNSAFE" if "overdose" in messages[-1]["content"] else "Verdict: SAFE."
    if "患者资料" in system or "The patient:" in system:  # the patient: two complaints, then the end marker
        who = system.rsplit("\n", 1)[-1].strip()
        return "Thank you, doctor. [END]" if said == 2 else f"患者：{who} complaint {said + 1}"
    return f"Doctor: Advice {said + 1} on: {messages[-1]['content']}"


class StubHandler(BaseHTTPRequestHandler):
    server: StubAPI

    def log_message(self, *args) -> None:
        pass

    def send_json(self, status: int, body: dict | bytes, headers: dict | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"content-type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def authorized(self) -> bool:
        if self.headers.get("authorization") == f"Bearer {KEY}":
            return True
        self.send_json(401, {"error": {"message": "Incorrect API key", "type": "invalid_request_error"}})
        return False

    def do_GET(self) -> None:
        if self.authorized():
            if self.path == "/v1/models":
                self.send_json(200, {"object": "list", "data": [{"id": "stub", "object": "model"}]})
            else:
                self.send_json(404, {"error": {"message": "Not Found"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if not self.authorized():
            return
        with self.server.lock:
            self.server.chat_requests += 1
            self.server.system_prompts.append(body["messages"][0]["content"])
            fault = self.server.faults.pop(0) if self.server.faults else ""
        quick_retry = {"retry-after-ms": "1"}  # the client honours it: no backoff wait in the test
        if fault == "429":
            self.send_json(429, {"error": {"message": "Rate limit reached", "type": "rate_limit_error"}}, quick_retry)
        elif fault == "500":
            self.send_json(500, {"error": {"message": "Internal error", "type": "server_error"}}, quick_retry)
        elif fault == "drop":
            self.close_connection = True  # no status line at all
        elif fault == "malformed":
            self.send_json(200, b'{"id": "chatcmpl-1", "choices": [{"message": ')
        else:
            text = stub_reply(body["messages"])
            self.send_json(200, {
                "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}})


@pytest.fixture(scope="module")
def stub() -> Iterator[StubAPI]:
    server = StubAPI()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def stub_args(stub: StubAPI, personas: Path, output: Path, *extra: str) -> list[str]:
    return ["--base_url", stub.url, "--model", "stub", "--personas", str(personas), "--output_file", str(output),
            "--num_turns", "4", "--concurrency", "3", "--max_retries", "4", "--max_tokens", "32", *extra]


def test_faults_are_retried_unsafe_and_duplicates_dropped_and_reruns_finish_every_persona_once(
        stub, api_key, tmp_path, tiny_model_dir, caplog):
    personas = write_jsonl(tmp_path / "seed.jsonl", SEED_LINES)
    output = tmp_path / "dialogues.jsonl"
    reviewer_prompt = str(ROOT / "configs/dialogue_reviewer_prompt.txt")
    argv = stub_args(stub, personas, output, "--reviewer_prompt_file", reviewer_prompt)
    stub.faults, stub.chat_requests = ["429", "500", "drop", "429", "malformed", "500"], 0

    first = generate_dialogues.main(argv)
    # Every fault but the malformed answer was retried by the client; that one cost its persona this run.
    assert first.failed == 1 and "malformed chat completion" in first.last_error
    requests = sum(role["requests"] for role in first.roles.values())
    retries = sum(role["retries"] for role in first.roles.values())
    assert retries == 5 and stub.chat_requests == requests + retries
    assert json.loads(output.with_suffix(".summary").read_text())["failed"] == 1

    second = generate_dialogues.main(argv)  # the rerun finishes the failed persona and nothing else
    assert (second.already_done, second.failed, second.kept + sum(second.rejected.values())) == (4, 0, 1)
    kept, rejected = read_jsonl(output), read_jsonl(output.with_suffix(".rejected"))
    ids = [r["id"] for r in kept + rejected]
    assert sorted(ids) == sorted(read_personas(str(personas))[i].id for i in range(5))  # each exactly once
    assert sorted(r["rejected"] for r in rejected) == ["duplicate", "unsafe"]
    assert {r["id"] for r in rejected if r["rejected"] == "unsafe"} == {content_id(SEED_LINES[2]["system_prompt"])}
    # The patient ends the consultation after two complaints: two exchanges, patient first, without the patient's
    # closing words, the end marker or the speaker labels.
    for record in kept:
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 2
        assert turns[3]["value"] == f"Advice 2 on: {turns[2]['value']}" and "complaint 2" in turns[2]["value"]
        assert not any(label in t["value"] for t in turns for label in ("[END]", "患者：", "Doctor:", "Thank you"))
    results = validate_data.main([str(output), "--stage", "sft", "--model_name_or_path", tiny_model_dir])
    assert (results[0]["records"], results[0]["bad"], results[0]["format"]) == (3, 0, "sharegpt")

    # A run killed while writing its last line: the unfinished line is cut off and that persona generated again.
    lines = output.read_text(encoding="utf-8").splitlines(keepends=True)
    output.write_text("".join(lines[:-1]) + lines[-1][:25], encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        third = generate_dialogues.main(argv)
    assert "removed an unfinished last line" in caplog.text
    assert (third.already_done, third.kept) == (4, 1)
    assert read_jsonl(output) == kept


def test_openai_messages_output_nurse_personas_and_a_doctor_that_ends_the_consultation(stub, api_key, tmp_path):
    personas = write_jsonl(tmp_path / "seed.jsonl", SEED_LINES[:2])
    nurses = [{"system_prompt": "你是林悦，一名护士。\n性格特点：温柔耐心"}, {"system_prompt": "李强\n职业：护士"}]
    output = tmp_path / "openai.jsonl"
    stub.faults, stub.system_prompts = [], []
    summary = generate_dialogues.main(stub_args(stub, personas, output, "--output_format", "openai", "--end_marker",
                                                "on:", "--doctor_prompt_file",
                                                str(write_jsonl(tmp_path / "seed_nurse_role.jsonl", nurses))))
    # MedicalGPT's nurse seed file: every clinician turn is played by one of its personas.
    assert {p for p in stub.system_prompts if "患者资料" not in p} <= {n["system_prompt"] for n in nurses}
    # The doctor's "Advice 1 on: ..." holds the end marker: kept up to the marker, and the dialogue ends there.
    assert summary.kept == 2
    written = sorted(json.dumps(r["messages"], ensure_ascii=False) for r in read_jsonl(output))  # in finishing order
    assert written == sorted(json.dumps([{"role": "user", "content": f"{p.system_prompt.splitlines()[-1]} complaint 1"},
                                         {"role": "assistant", "content": "Advice 1"}], ensure_ascii=False)
                             for p in read_personas(str(personas)))
    assert summary.roles["doctor"]["prompt_tokens"] == 20 and summary.roles["patient"]["requests"] == 2


def test_wrong_key_url_or_flag_is_one_line_before_any_generation(stub, api_key, tmp_path, monkeypatch):
    personas = write_jsonl(tmp_path / "seed.jsonl", SEED_LINES[:1])
    output = tmp_path / "out.jsonl"
    stub.chat_requests = 0
    cases = [
        ({"OPENAI_API_KEY": "sk-wrong"}, [], r"refused the API key in \$OPENAI_API_KEY \(401\)"),
        ({}, ["--patient_base_url", stub.url.removesuffix("/v1")],
         r"/models does not exist \(404\): --patient_base_url"),
        ({}, ["--base_url", f"http://127.0.0.1:{free_port()}/v1"], r"cannot reach http://127.0.0.1:\d+/v1"),
        ({"DOCTOR_KEY": ""}, ["--doctor_api_key_env", "DOCTOR_KEY"], r"set \$DOCTOR_KEY to the API key"),
    ]
    for env, flags, message in cases:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(UsageError, match=message):
            generate_dialogues.main([*stub_args(stub, personas, output), *flags])
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert stub.chat_requests == 0 and not output.exists()
    stub.faults = ["drop"] * 2  # the server goes away mid-run: after the retries the run stops, to be resumed
    with pytest.raises(UsageError, match=r"cannot reach .*rerun the same command to resume"):
        generate_dialogues.main([*stub_args(stub, personas, output), "--max_retries", "1"])
    assert stub.chat_requests == 2 and not output.exists()
    assert json.loads(output.with_suffix(".summary").read_text())["roles"]["patient"]["failed_requests"] == 1
    with pytest.raises(SystemExit):  # there is no flag for the key itself: `ps` would show it
        generate_dialogues.main([*stub_args(stub, personas, output), "--api_key", KEY])
    with pytest.raises(UsageError, match="--min_turns between 1 and --num_turns"):
        generate_dialogues.main([*stub_args(stub, personas, output), "--min_turns", "5"])
    other = write_jsonl(tmp_path / "sft.jsonl", [{"conversations": [{"from": "human", "value": "hi"}]}])
    with pytest.raises(UsageError, match=r"sft.jsonl:1: not a dialogue this tool wrote"):  # resuming it would mix
        generate_dialogues.main(stub_args(stub, personas, other))


# --- end to end: our own server on the tiny model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory) -> Iterator[str]:  # noqa: F811
    """openai_api.py serving the tiny model in its own process, with an API key; its /v1 URL."""
    with api_server(model_dir, KEY, tmp_path_factory.mktemp("server") / "server.log") as url:
        yield url


def test_dialogues_from_our_server_validate_and_train(served, api_key, tmp_path, tiny_model_dir):
    output = tmp_path / "dialogues.jsonl"
    # Greedy, so the run is the same every time: this model's answers are never empty and differ by prompt, so
    # every dialogue runs its two exchanges.
    summary = generate_dialogues.main(["--base_url", served, "--num_dialogues", "3", "--num_turns", "2",
                                       "--max_tokens", "12", "--temperature", "0", "--output_file", str(output)])
    records = read_jsonl(output)
    assert summary.kept == len(records) == 3 and summary.failed == 0
    assert all(len(r["conversations"]) == 4 for r in records)
    doctor, patient = summary.roles["doctor"], summary.roles["patient"]
    assert doctor["requests"] == patient["requests"] == 6
    assert 6 <= doctor["completion_tokens"] <= 6 * 12 and doctor["prompt_tokens"] > patient["requests"] * 20
    results = validate_data.main([str(output), "--stage", "sft", "--model_name_or_path", tiny_model_dir])
    assert (results[0]["records"], results[0]["bad"]) == (3, 0)
    metrics = supervised_finetuning.main([
        "--model_name_or_path", tiny_model_dir, "--train_file_dir", str(output), "--output_dir", str(tmp_path / "sft"),
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "256", "--report_to", "none",
        "--save_strategy", "no", "--disable_tqdm", "True"])
    assert metrics["train_loss"] > 0

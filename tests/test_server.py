"""`daop serve`: a real server process on a tiny random checkpoint, driven by the official openai client.

The tiny model's text is junk; the tests compare outputs for equality, never their content.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

MODEL_NAME = "tiny-moe"
MAX_BODY = 256 * 1024
CONTEXT = 256  # max_position_embeddings of the tiny checkpoints


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen | None, log: Path | None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text() if log else ''}")
        try:
            status, _ = request(port, "GET", "/health", timeout=2)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server did not become healthy in {timeout} s:\n{log.read_text() if log else ''}")


def request(port: int, method: str, path: str, body: bytes | dict | None = None, timeout: float = 60):
    """(status, decoded JSON or text) for one plain HTTP request."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body is not None else {})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    if resp.getheader("content-type", "").startswith("application/json"):
        return resp.status, json.loads(data)
    return resp.status, data.decode()


class Server:
    def __init__(self, port: int, proc: subprocess.Popen, log: Path) -> None:
        self.port, self.proc, self.log = port, proc, log
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def server(tiny_dir, tmp_path_factory):
    _, ckpt = tiny_dir("mixtral")
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daop.cli", "serve", "--model", str(ckpt), "--host", "127.0.0.1", "--port", str(port),
             "--device", "cpu", "--no-progress", "--model-name", MODEL_NAME, "--max-body-bytes", str(MAX_BODY)],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_healthy(port, proc, log)
        yield Server(port, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def metrics(port: int) -> dict[str, float]:
    """Parse the Prometheus text format: {'name{labels}': value}; every sample line must parse."""
    status, text = request(port, "GET", "/metrics")
    assert status == 200
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (\S+)', line)
        assert m, f"bad metrics line: {line!r}"
        out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def greedy_completion(server: Server, prompt, max_tokens: int = 24, **kw):
    return server.client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def assert_serving(server: Server) -> None:
    out = greedy_completion(server, "still there?", max_tokens=2)
    assert out.usage.completion_tokens >= 1 or out.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------------------------- basics

def test_health_and_models(server):
    assert request(server.port, "GET", "/health") == (200, {"status": "ok", "model": MODEL_NAME})
    assert [m.id for m in server.client.models.list()] == [MODEL_NAME]
    assert server.client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_chat_completion(server):
    out = server.client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    choice = out.choices[0]
    assert out.object == "chat.completion" and out.model == MODEL_NAME and out.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    u = out.usage
    assert u.prompt_tokens > 0 and 1 <= u.completion_tokens <= 12 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    again = server.client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_completion_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    assert again.choices[0].message.content == choice.message.content  # same seed, same sample


def test_stream_equals_non_stream(server):
    messages = [{"role": "user", "content": "Tell me about the summer's day."}]
    full = server.client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=40, temperature=0)
    pieces, finish, usage, roles = [], None, None, []
    for chunk in server.client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=40,
                                                       temperature=0, stream=True, stream_options={"include_usage": True}):
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            roles += [c.delta.role] if c.delta.role else []
            pieces += [c.delta.content] if c.delta.content else []
            finish = c.finish_reason or finish
    assert roles == ["assistant"]
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    counts = {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert usage.model_dump(include=counts) == full.usage.model_dump(include=counts)


def test_completion_stop_string_and_token_ids(server):
    base = greedy_completion(server, "In the beginning was", max_tokens=32)
    text = base.choices[0].text
    assert base.choices[0].finish_reason == "length" and len(text) >= 6, "pick another prompt: this one ends early"
    stop = text[len(text) // 2: len(text) // 2 + 2]
    out = greedy_completion(server, "In the beginning was", max_tokens=32, stop=[stop, "\x00never"])
    assert out.choices[0].finish_reason == "stop"
    assert stop not in out.choices[0].text
    assert out.choices[0].text == text[: text.find(stop)]
    streamed = "".join(c.choices[0].text for c in greedy_completion(server, "In the beginning was", max_tokens=32,
                                                                     stop=stop, stream=True) if c.choices)
    assert streamed == out.choices[0].text
    ids = greedy_completion(server, [1, 40, 41, 42], max_tokens=5)  # a prompt given as token ids
    assert ids.usage.prompt_tokens == 4 and ids.usage.completion_tokens >= 1


def test_concurrent_streams_match_sequential(server):
    prompts = [f"Shall I compare thee {i}" for i in range(8)]
    expected = [greedy_completion(server, p, max_tokens=24).choices[0].text for p in prompts]
    results: dict[int, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(prompts))

    def client(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            stream = server.client.completions.create(model=MODEL_NAME, prompt=prompts[i], max_tokens=24,
                                                      temperature=0, stream=True)
            results[i] = "".join(c.choices[0].text for c in stream if c.choices)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert [results.get(i) for i in range(len(prompts))] == expected


# ------------------------------------------------------------------------------------------ bad requests

def _error(status_body, status: int, code=None, param=None) -> dict:
    got_status, body = status_body
    assert got_status == status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert err["code"] == code and err["param"] == param
    return err


def test_bad_requests_are_answered_and_the_server_keeps_serving(server):
    port = server.port
    chat = "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        (lambda: request(port, "POST", chat, b'{"messages": [{"role": "user", "content": "hi"}'), 400, None, None),
        (lambda: request(port, "POST", chat, b"[1, 2]"), 400, None, None),
        (lambda: request(port, "POST", chat, {"messages": msgs, "temperature": "hot"}), 400, None, "temperature"),
        (lambda: request(port, "POST", chat, {"messages": msgs, "max_tokens": 1.5}), 400, None, "max_tokens"),
        (lambda: request(port, "POST", chat, {"messages": [{"role": "user", "content": 3}]}), 400, None,
         "messages[0].content"),
        (lambda: request(port, "POST", "/v1/completions", {"prompt": "hi", "stop": 7}), 400, None, "stop"),
        (lambda: request(port, "POST", chat, {"messages": msgs, "model": "gpt-4o"}), 404, "model_not_found", "model"),
        (lambda: request(port, "POST", chat, {"messages": msgs, "n": 2}), 400, None, "n"),
        (lambda: request(port, "POST", chat, {"messages": msgs, "logprobs": True}), 400, None, "logprobs"),
        (lambda: request(port, "POST", "/v1/completions", b'{"prompt": "' + b"a" * (MAX_BODY + 150_000) + b'"}'),
         413, "request_too_large", None),
        (lambda: request(port, "GET", "/v1/nothing-here"), 404, None, None),
        (lambda: request(port, "GET", "/v1/completions"), 405, None, None),
    ]
    for send, status, code, param in cases:
        _error(send(), status, code, param)
        assert_serving(server)
    # over the context window: 400 naming the limit, streamed or not
    for stream in (False, True):
        err = _error(request(port, "POST", "/v1/completions", {"prompt": "word " * 400, "stream": stream}), 400)
        assert str(CONTEXT) in err["message"]
        assert_serving(server)
    # the official client maps the answers to its exception classes
    with pytest.raises(openai.BadRequestError):
        server.client.chat.completions.create(model=MODEL_NAME, messages=msgs, n=2)
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="no-such-model", messages=msgs)
    assert_serving(server)


def test_client_disconnect_cancels_generation(server):
    before = metrics(server.port).get("daop_requests_cancelled_total", 0)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = json.dumps({"model": MODEL_NAME, "prompt": "Once", "max_tokens": 240, "temperature": 0, "stream": True})
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    chunks = []
    while len(chunks) < 2:
        line = resp.readline()
        assert line, "stream ended early"
        if line.startswith(b"data: "):
            chunks.append(json.loads(line[6:]))
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    t0 = time.monotonic()
    assert_serving(server)
    assert time.monotonic() - t0 < 10
    deadline = time.monotonic() + 10
    while metrics(server.port).get("daop_requests_cancelled_total", 0) <= before:
        assert time.monotonic() < deadline, "the disconnected stream was not cancelled"
        time.sleep(0.05)


def test_metrics_count_requests(server):
    key = 'daop_requests_total{endpoint="/v1/chat/completions",status="200"}'
    before = metrics(server.port)
    out = server.client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "count me"}],
                                                max_tokens=6, temperature=0)
    deadline = time.monotonic() + 5
    while True:  # the request is counted when its response has been sent: poll briefly
        after = metrics(server.port)
        if after.get(key, 0) == before.get(key, 0) + 1 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert after[key] == before.get(key, 0) + 1
    assert after["daop_tokens_generated_total"] - before.get("daop_tokens_generated_total", 0) == out.usage.completion_tokens
    assert after["daop_prompt_tokens_total"] - before.get("daop_prompt_tokens_total", 0) == out.usage.prompt_tokens
    assert after["daop_decode_tokens_per_second"] > 0
    assert after["daop_queue_depth"] == 0
    assert after['daop_request_duration_seconds_count{endpoint="/v1/chat/completions"}'] >= after[key]
    assert any(k.startswith('daop_requests_total{endpoint="other",status="404"') for k in after)


# ------------------------------------------------------------------- in-process server on a fake engine

class FakeEngine:
    """Just enough of Engine for the server: slow tokens, a prompt that crashes, expert counters."""

    def __init__(self) -> None:
        self.started: list[str] = []

    def encode(self, prompt):
        return [ord(c) for c in prompt] if isinstance(prompt, str) else list(prompt)

    def chat_prompt(self, messages):
        return self.encode(messages[-1]["content"])

    def stream(self, ids, max_new_tokens=256, stats=None, **kw):
        prompt = "".join(map(chr, ids))
        self.started.append(prompt)
        stats.prompt_tokens = len(ids)
        if prompt == "boom":
            raise RuntimeError("unexpected")
        for i in range(max_new_tokens):
            time.sleep(0.02 if prompt.startswith("slow") else 0)
            stats.generated_tokens += 1
            yield f"{i} "
        stats.finish_reason = "length"

    def counters(self):
        return {"cpu_calls": 7, "label": "not a number"}


@contextlib.contextmanager
def in_process_server(engine, name: str):
    """The server app around `engine`, served by uvicorn on a thread of this process; yields its port."""
    import uvicorn

    from daop.server import create_app

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, name), host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        wait_healthy(port, None, None, timeout=20)
        yield port
    finally:
        srv.should_exit = True
        thread.join(15)


@pytest.fixture()
def fake_server():
    engine = FakeEngine()
    with in_process_server(engine, "fake") as port:
        yield port, engine


def test_unexpected_error_is_500_and_server_keeps_serving(fake_server):
    port, _ = fake_server
    _error(request(port, "POST", "/v1/completions", {"prompt": "boom"}), 500)
    status, body = request(port, "POST", "/v1/completions", {"prompt": "fine", "max_tokens": 3})
    assert status == 200 and body["choices"][0]["text"] == "0 1 2 "
    assert metrics(port)["daop_expert_cpu_calls_total"] == 7


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_frees_the_worker_for_queued_requests(fake_server, stream):
    """A slow generation (300 tokens x 20 ms) is cut short when its client leaves; FIFO order is kept."""
    port, engine = fake_server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "slow", "max_tokens": 300, "stream": stream}),
                 headers={"Content-Type": "application/json"})
    if stream:
        assert conn.getresponse().readline().startswith(b"data: ")
    else:
        time.sleep(0.3)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    t0 = time.monotonic()
    status, body = request(port, "POST", "/v1/completions", {"prompt": "next", "max_tokens": 2})
    assert status == 200 and body["choices"][0]["text"] == "0 1 "
    assert time.monotonic() - t0 < 3, "the abandoned generation kept the worker busy"
    assert engine.started == ["slow", "next"]
    assert metrics(port)["daop_requests_cancelled_total"] == 1


def test_missing_fastapi_prints_install_hint():
    code = ("import sys; sys.modules['fastapi'] = None; from daop.cli import main; "
            "sys.exit(main(['serve', '--model', 'nowhere']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "pip install 'daop[server]'" in out.stderr


def test_out_of_memory_in_a_request_is_400_and_the_next_request_is_served(tiny_dir):
    """A real engine whose layer 1 runs out of memory on long prompts, behind a real server."""
    from daop.engine import Engine
    from tiny_models import fail_long_prefills

    _, path = tiny_dir("mixtral")
    engine = Engine.from_pretrained(path, device="cpu", progress=False, policy="daop-exact", expert_ratio=0.5)
    want = engine.generate(list(range(3, 20)), max_new_tokens=6)
    fail_long_prefills(engine, 100)
    with in_process_server(engine, "tiny") as port:
        err = _error(request(port, "POST", "/v1/completions", {"prompt": list(range(3, 203)), "max_tokens": 4}), 400)
        assert "out of CPU memory during prefill of 200 prompt tokens" in err["message"]
        status, body = request(port, "POST", "/v1/completions", {"prompt": list(range(3, 20)), "max_tokens": 6, "temperature": 0})
        assert status == 200 and body["choices"][0]["text"] == want

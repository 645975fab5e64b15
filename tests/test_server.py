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


def request(port: int, method: str, path: str, body: bytes | dict | None = None, timeout: float = 60,
            headers: dict | None = None):
    """(status, decoded JSON or text) for one plain HTTP request."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        sent = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers={**sent, **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    if resp.getheader("content-type", "").startswith("application/json"):
        return resp.status, json.loads(data)
    return resp.status, data.decode()


class Server:
    def __init__(self, port: int, proc: subprocess.Popen, log: Path, api_key: str = "x") -> None:
        self.port, self.proc, self.log = port, proc, log
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0, timeout=60)


@contextlib.contextmanager
def daop_server(ckpt, log: Path, *extra: str, env: dict | None = None):
    """A real `daop serve` process on 127.0.0.1; yields a Server once /health answers, stops it after."""
    port = free_port()
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "daop.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
           "--no-progress", "--model-name", MODEL_NAME, "--max-body-bytes", str(MAX_BODY)]
    cmd += (["--model", str(ckpt)] if ckpt is not None else []) + list(extra)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
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


@pytest.fixture(scope="session")
def server(tiny_dir, tmp_path_factory):
    _, ckpt = tiny_dir("mixtral")
    with daop_server(ckpt, tmp_path_factory.mktemp("server") / "server.log") as srv:
        yield srv


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


def read_events(resp, count: int) -> list[bytes]:
    """The first `count` server-sent events' data from a streaming response."""
    events = []
    while len(events) < count:
        line = resp.readline()
        assert line, "stream ended early"
        if line.startswith(b"data: "):
            events.append(line[6:].strip())
    return events


def test_client_disconnect_cancels_generation(server):
    before = metrics(server.port).get("daop_requests_cancelled_total", 0)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = json.dumps({"model": MODEL_NAME, "prompt": "Once", "max_tokens": 240, "temperature": 0, "stream": True})
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    chunks = [json.loads(e) for e in read_events(resp, 2)]
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

@contextlib.contextmanager
def in_process_server(engine, name: str, api_key: str | None = None, warmup: bool = False, max_batch: int | None = None):
    """The server app around `engine`, served by uvicorn on a thread of this process; yields its port."""
    import uvicorn

    from daop.server import create_app

    port = free_port()
    app = create_app(engine, name, api_key=api_key, warmup=warmup, max_batch=max_batch)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        wait_healthy(port, None, None, timeout=20)
        yield port
    finally:
        srv.should_exit = True
        thread.join(15)


@pytest.fixture()
def rigged_server(tiny_dir):
    """The tiny Mixtral under daop-exact behind a real server, rigged: a prefill of exactly 13 tokens
    fails with an unexpected error, every decode step takes at least 20 ms, and no token ends a
    generation early."""
    from daop.engine import Engine

    _, path = tiny_dir("mixtral")
    engine = Engine.from_pretrained(path, device="cpu", progress=False, policy="daop-exact", expert_ratio=0.5,
                                    max_batch=None)  # as `daop serve` loads it: rows for concurrent requests
    forward, decode = engine.decoder.forward, engine.decoder.decode

    def failing_forward(ids, *args, **kwargs):
        if ids.shape[1] == 13:
            raise RuntimeError("unexpected")
        return forward(ids, *args, **kwargs)

    def slow_decode(*args, **kwargs):
        time.sleep(0.02)
        return decode(*args, **kwargs)

    engine.decoder.forward, engine.decoder.decode = failing_forward, slow_decode
    engine.eos_ids = frozenset()  # every generation runs to its max_tokens
    with in_process_server(engine, "tiny") as port:
        yield port, engine


def test_unexpected_error_is_500_and_server_keeps_serving(rigged_server):
    port, _ = rigged_server
    _error(request(port, "POST", "/v1/completions", {"prompt": list(range(3, 16)), "max_tokens": 3}), 500)
    status, body = request(port, "POST", "/v1/completions", {"prompt": list(range(3, 10)), "max_tokens": 3})
    assert status == 200 and body["usage"]["completion_tokens"] == 3
    assert metrics(port)["daop_expert_cpu_calls_total"] > 0


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_cancels_the_generation_and_others_are_served(rigged_server, stream):
    """A slow generation (200 steps x 20 ms) leaves the batch when its client goes away; a request
    arriving meanwhile is served beside it at once."""
    port, _ = rigged_server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": list(range(3, 12)), "max_tokens": 200,
                                                             "stream": stream}),
                 headers={"Content-Type": "application/json"})
    if stream:
        assert conn.getresponse().readline().startswith(b"data: ")
    else:
        time.sleep(0.3)
    t0 = time.monotonic()
    status, body = request(port, "POST", "/v1/completions", {"prompt": list(range(3, 8)), "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] <= 2
    assert time.monotonic() - t0 < 3, "a running generation kept the next request waiting"
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 5
    while metrics(port).get("daop_requests_cancelled_total", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    m = metrics(port)
    assert m["daop_requests_cancelled_total"] == 1
    assert m["daop_batch_running"] == 0 and m["daop_tokens_generated_total"] < 200


def test_missing_fastapi_prints_install_hint():
    code = ("import sys; sys.modules['fastapi'] = None; from daop.cli import main; "
            "sys.exit(main(['serve', '--model', 'nowhere']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "pip install '.[server]'" in out.stderr


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


def test_warm_up_runs_every_batch_size_before_listening_and_leaves_nothing_behind(tiny_dir):
    """`daop serve`'s warm-up: the decode rows go 1..max_batch and back to none before the server
    answers; afterwards no row is in use, /metrics counts none of its work, and a request gives the
    tokens it gives alone."""
    from daop.engine import Engine

    _, path = tiny_dir("mixtral")
    engine = Engine.from_pretrained(path, device="cpu", progress=False, policy="daop-exact", expert_ratio=0.5,
                                    max_batch=None)
    want = engine.generate(list(range(3, 20)), max_new_tokens=6)
    cpu_calls = engine.counters()["cpu_calls"]
    with in_process_server(engine, "tiny", warmup=True, max_batch=4) as port:
        assert engine.counters()["cpu_calls"] > cpu_calls  # the warm-up ran CPU experts
        after = metrics(port)
        assert after.get("daop_expert_cpu_calls_total", 0) == 0 and after.get("daop_tokens_generated_total", 0) == 0
        assert after["daop_batch_running"] == 0 and after["daop_queue_depth"] == 0
        status, body = request(port, "POST", "/v1/completions", {"prompt": list(range(3, 20)), "max_tokens": 6, "temperature": 0})
        assert status == 200 and body["choices"][0]["text"] == want
        assert metrics(port)["daop_expert_cpu_calls_total"] > 0


def test_warm_up_rows_and_failure(tiny_dir):
    """The warm-up's batch grows to max_batch rows and empties; a failing warm-up says so."""
    from daop.engine import Engine
    from daop.server.metrics import Metrics
    from daop.server.worker import Worker
    from tiny_models import fail_long_prefills

    _, path = tiny_dir("mixtral")
    engine = Engine.from_pretrained(path, device="cpu", progress=False, policy="daop-exact", expert_ratio=0.5,
                                    max_batch=None)
    worker = Worker(engine, Metrics(), max_batch=3, warmup=True)
    assert worker.warm_up() > 0
    rows = worker.warmup_rows
    assert max(rows) == 3 and rows[-1] == 0 and sorted(set(rows)) == [0, 1, 2, 3]
    assert rows.index(3) < len(rows) - 1 - rows[::-1].index(1)  # up to 3 rows, then down through 1
    assert worker.batcher.idle() and worker.batcher.running == 0
    fail_long_prefills(engine, 1)  # every prefill now runs out of memory
    with pytest.raises(Exception, match="warm-up failed"):
        worker.warm_up()
    assert worker.batcher.idle()
    stopping = Worker(engine, Metrics(), max_batch=3, warmup=True)
    stopping.begin_stop()  # a server told to stop while it warms up ends the warm-up at once
    stopping.warm_up()
    assert stopping.warmup_rows == [] and stopping.batcher.idle()


# ------------------------------------------------------------------------------------ conformance (issue 15)

def test_unknown_roles_and_unsupported_fields_are_400_naming_them(server):
    port, chat = server.port, "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0].role"),
        ({"messages": msgs, "response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": msgs, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"messages": msgs, "logit_bias": {"5": 10}}, "logit_bias"),
        ({"messages": msgs, "tool_choice": "auto"}, "tool_choice"),
        ({"messages": msgs, "guided_json": {"type": "object"}}, "guided_json"),
        ({"messages": [{"role": "user", "content": "hi", "tool_calls": [{"id": "x"}]}]}, "messages[0].tool_calls"),
    ]
    for body, param in cases:
        err = _error(request(port, "POST", chat, {**body, "max_tokens": 2}), 400, None, param)
        assert param.split(".")[-1].split("[")[0] in err["message"], err
    err = _error(request(port, "POST", "/v1/completions", {"prompt": "hi", "response_format": {"type": "json_object"}}),
                 400, None, "response_format")
    # values that mean "off", bookkeeping fields and an assistant message sent back as received are accepted
    ok = {"messages": msgs + [{"role": "assistant", "content": "hello", "refusal": None, "tool_calls": []},
                              {"role": "user", "content": "again"}],
          "max_tokens": 2, "response_format": {"type": "text"}, "user": "someone", "logprobs": False, "tools": None}
    status, body = request(port, "POST", chat, ok)
    assert status == 200, body
    with pytest.raises(openai.BadRequestError, match="response_format"):
        server.client.chat.completions.create(model=MODEL_NAME, messages=msgs, response_format={"type": "json_object"})


def test_prompt_plus_max_tokens_beyond_the_context_is_400(server):
    prompt = list(range(3, 3 + CONTEXT - 20))  # 236 prompt tokens of a 256-token context
    for stream in (False, True):
        err = _error(request(server.port, "POST", "/v1/completions",
                             {"prompt": prompt, "max_tokens": 40, "stream": stream}), 400)
        assert f"maximum context length is {CONTEXT} tokens" in err["message"]
        assert f"{len(prompt) + 40} tokens ({len(prompt)} in the prompt, 40 in the completion)" in err["message"]
    fits = greedy_completion(server, prompt, max_tokens=20)
    assert fits.usage.prompt_tokens == len(prompt)
    unset = request(server.port, "POST", "/v1/completions", {"prompt": prompt, "temperature": 0})
    assert unset[0] == 200 and unset[1]["usage"]["completion_tokens"] <= 20  # no max_tokens: up to the context
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        server.client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=CONTEXT)


@pytest.fixture(scope="module")
def tiny_engine(tiny_dir):
    from daop.engine import Engine

    _, ckpt = tiny_dir("mixtral")
    return Engine.from_pretrained(ckpt, device="cpu", progress=False)


@pytest.mark.parametrize("kw", [dict(repetition_penalty=3.0), dict(frequency_penalty=2.0, presence_penalty=1.5),
                                dict(temperature=1.0, min_p=0.2, seed=5)], ids=["repetition", "frequency", "min_p"])
def test_sampling_extensions_reach_the_sampler(server, tiny_engine, kw):
    prompt = [5, 6, 7, 5, 6, 7, 5, 6]
    kw = {"temperature": 0, **kw}
    want = tiny_engine.generate(prompt, max_new_tokens=24, **kw)
    plain = tiny_engine.generate(prompt, max_new_tokens=24, **{**kw, **{k: v for k, v in (("repetition_penalty", 1.0),
                                 ("frequency_penalty", 0.0), ("presence_penalty", 0.0), ("min_p", 0.0)) if k in kw}})
    assert want != plain, "pick another prompt: the option changes nothing here"
    native = {k: kw.pop(k) for k in ("frequency_penalty", "presence_penalty") if k in kw}
    sent = dict(model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=kw.pop("temperature"), **native)
    if "seed" in kw:
        sent["seed"] = kw.pop("seed")
    out = server.client.completions.create(**sent, extra_body=kw)
    assert out.choices[0].text == want


def test_api_key_is_required_everywhere_but_health(tiny_dir, tmp_path):
    _, ckpt = tiny_dir("mixtral")
    env = dict(os.environ, DAOP_API_KEY="s3cret-key")
    with daop_server(ckpt, tmp_path / "serve.log", env=env) as srv:
        port = srv.port
        assert request(port, "GET", "/health")[0] == 200
        for method, path, body in (("GET", "/v1/models", None), ("GET", "/metrics", None),
                                   ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                                   ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                                   ("GET", "/v1/nothing-here", None)):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"},
                            {"Authorization": "Basic s3cret-key"}):
                _error(request(port, method, path, body, headers=headers), 401, "invalid_api_key")
        good = {"Authorization": "Bearer s3cret-key"}
        assert request(port, "GET", "/v1/models", headers=good)[0] == 200
        assert request(port, "GET", "/metrics", headers=good)[0] == 200
        with pytest.raises(openai.AuthenticationError):
            srv.client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2)  # api_key "x"
        keyed = Server(port, srv.proc, srv.log, api_key="s3cret-key")
        assert greedy_completion(keyed, "hi", max_tokens=2).usage.prompt_tokens > 0
        assert [m.id for m in keyed.client.models.list()] == [MODEL_NAME]


def test_api_key_comparison_is_constant_time(monkeypatch):
    import hmac

    from daop.server.auth import ApiKeyMiddleware

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    mw = ApiKeyMiddleware(None, "k3y")
    assert mw.authorized({"headers": [(b"authorization", b"Bearer k3y")]})
    assert not mw.authorized({"headers": [(b"authorization", b"Bearer k3")]})
    assert calls == [(b"k3y", b"k3y"), (b"k3", b"k3y")]


def test_empty_api_key_is_refused_before_loading(tmp_path):
    out = subprocess.run([sys.executable, "-m", "daop", "serve", "--model", str(tmp_path / "missing"), "--api-key", " "],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == "daop: error: --api-key must not be empty"


def test_shutdown_during_a_stream_ends_it_with_an_error_and_done(tmp_path):
    """SIGTERM while the shipped model streams: an error event, then [DONE]; the server exits quickly, no traceback."""
    import signal

    env = dict(os.environ, OMP_NUM_THREADS="1")
    with daop_server(None, tmp_path / "serve.log", env=env) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        conn.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                     body=json.dumps({"prompt": "In the beginning", "max_tokens": 900, "temperature": 0, "stream": True}))
        resp = conn.getresponse()
        assert resp.status == 200
        events = read_events(resp, 3)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        rest = resp.read().decode()
        conn.close()
        events += [line[6:] for line in rest.splitlines() if line.startswith("data: ")]
        srv.proc.wait(15)
        elapsed = time.monotonic() - t0
    assert events[-1] in ("[DONE]", b"[DONE]")
    error = json.loads(events[-2])
    assert error["error"]["message"] == "the server is shutting down" and error["error"]["type"] == "server_error"
    assert elapsed < 4, f"shutdown took {elapsed:.1f} s"
    log = srv.log.read_text()
    assert "Traceback" not in log, log

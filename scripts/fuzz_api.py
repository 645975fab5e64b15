#!/usr/bin/env python
"""Fuzz a local `daop serve` with schemathesis: no 5xx, every 4xx in OpenAI's error format.

    python scripts/fuzz_api.py --serve path/to/checkpoint --device cpu      # starts and stops a server
    python scripts/fuzz_api.py --base-url http://127.0.0.1:8000 --max-examples 300 --seconds 120

Needs `pip install schemathesis==4.32.5`. The schema is the server's /openapi.json when it serves one;
`daop serve` does not (its handlers read raw requests), so the script then builds the OpenAPI document
from daop.server's own request models, the ones that validate every body. Cases come in both of
schemathesis' modes: positive (bodies the schema allows) and negative (bodies it forbids), for every
operation, plus a few raw bodies no schema describes. Bounded: --max-examples cases per operation and
mode, --seconds in all, --max-tokens-cap on the tokens a positive case asks for. Each failure is
printed as a curl command; the last stdout line is a JSON summary; the exit status is 1 on failures.
Only loopback addresses are accepted.
"""
from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling serverctl module, also when loaded by path
from serverctl import free_port, http_get, start_server, stop_server  # noqa: E402

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
ERROR_KEYS = {"message", "type", "param", "code"}
TEXT = {"type": "string", "minLength": 1, "maxLength": 200}
RAW_BODIES = [b"", b"{", b"null", b"[]", b'"text"', b"\xff\xfe", b'{"prompt": NaN}', b'{"prompt": "\\ud800"}',
              b'{"messages": [{"role": "user", "content": "\\udfff x"}]}', b'{"prompt": "a", "a": ' + b"[" * 5000 + b"]" * 5000 + b"}"]


# ------------------------------------------------------------------------------------------ the schema

def openapi_from_models(model_name: str, max_tokens_cap: int) -> dict[str, Any]:
    """An OpenAPI 3.1 document for daop serve, built from the pydantic models that validate requests."""
    from daop.server import ChatCompletionRequest, CompletionRequest

    components: dict[str, Any] = {}

    def body_schema(model: Any) -> dict[str, Any]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        props = schema.setdefault("properties", {})
        props["model"] = {"enum": [model_name]}  # other names are a plain 404; negative cases still try them
        for key in ("max_tokens", "max_completion_tokens"):
            if key in props:
                props[key] = {"type": "integer", "minimum": 1, "maximum": max_tokens_cap}
        # Fields typed Any in the models are checked by validators; describe what those accept.
        props["stop"] = {"anyOf": [{"type": "null"}, TEXT, {"type": "array", "items": TEXT, "maxItems": 16}]}
        if "prompt" in props:
            props["prompt"] = {"anyOf": [TEXT, {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1000},
                                                "minItems": 1, "maxItems": 64}]}
        return schema

    def post(model: Any) -> dict[str, Any]:
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": body_schema(model)}}},
                "responses": {"200": {"description": "completion (JSON, or server-sent events when stream is true)"},
                              "4XX": {"description": "OpenAI-style error"}}}

    def get() -> dict[str, Any]:
        return {"responses": {"200": {"description": "ok"}}}

    completions, chat = post(CompletionRequest), post(ChatCompletionRequest)
    message = components.get("ChatMessage", {}).get("properties", {})
    if "content" in message:
        part = {"type": "object", "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}},
                "required": ["type", "text"]}
        message["content"] = {"anyOf": [{"type": "string"}, {"type": "array", "items": part, "maxItems": 4}]}
    name_param = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "daop serve", "version": "1"},
        "paths": {
            "/health": {"get": get()},
            "/metrics": {"get": get()},
            "/v1/models": {"get": get()},
            "/v1/models/{name}": {"get": {**get(), "parameters": name_param}},
            "/v1/completions": {"post": completions},
            "/v1/chat/completions": {"post": chat},
        },
        "components": {"schemas": components},
    }


# ----------------------------------------------------------------------------------------- the checks

def problems(status: int, content_type: str, body: bytes, streamed: bool, complete: bool = True) -> list[str]:
    """What is wrong with one response: a 5xx, a 4xx not in OpenAI's shape, a broken 200.

    `complete` is False when the client kept only part of the body (schemathesis reads a bounded number
    of server-sent events), so the end of a stream is then not checked.
    """
    if status == 0:
        return [f"no response: {body[:300].decode('utf-8', 'replace')}"]
    if status >= 500:
        return [f"server error {status}: {body[:300]!r}"]
    if 400 <= status < 500:
        try:
            data = json.loads(body)
        except ValueError:
            return [f"{status} body is not JSON: {body[:200]!r}"]
        err = data.get("error") if isinstance(data, dict) else None
        if not isinstance(data, dict) or set(data) != {"error"} or not isinstance(err, dict) or set(err) != ERROR_KEYS:
            return [f"{status} body is not {{'error': {{message, type, param, code}}}}: {body[:200]!r}"]
        out = []
        if not isinstance(err["message"], str) or not err["message"]:
            out.append(f"{status} error message is empty or not a string")
        if err["type"] != "invalid_request_error":
            out.append(f"{status} error type is {err['type']!r}")
        for key in ("param", "code"):
            if err[key] is not None and not isinstance(err[key], str):
                out.append(f"{status} error {key} is {err[key]!r}")
        return out
    if status == 200 and streamed:
        if not content_type.startswith("text/event-stream"):
            return [f"stream answered with content-type {content_type!r}"]
        if complete and not body.rstrip().endswith(b"data: [DONE]"):
            return [f"stream does not end with [DONE]: {body[-200:]!r}"]
        for line in body.splitlines():
            if line.startswith(b"data: ") and line != b"data: [DONE]" and (complete or line.endswith(b"}")):
                event = json.loads(line[6:])
                if "error" in event:
                    return [f"stream carries an error event: {line[:300]!r}"]
        return []
    if status == 200 and content_type.startswith("application/json"):
        try:
            json.loads(body)
        except ValueError:
            return [f"200 body is not JSON: {body[:200]!r}"]
    return []


# ------------------------------------------------------------------------------------------ fuzzing

def fuzz(base_url: str, max_examples: int, seconds: float, max_tokens_cap: int = 8, seed: int | None = None,
         proc: subprocess.Popen | None = None, log: str | None = None) -> dict[str, Any]:
    """Run the cases against base_url; a report with status counts and failures (at most 50, each with curl).

    With the server's log file, each 5xx failure also carries `cause`: the last exception line the
    server logged for it (requests are sent one at a time, so the log's new lines are that request's).
    """
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    url = urlsplit(base_url)
    host, port = url.hostname or "", url.port or 80
    status, raw = http_get(host, port, "/v1/models")
    model_name = json.loads(raw)["data"][0]["id"]
    status, raw = http_get(host, port, "/openapi.json")
    doc = json.loads(raw) if status == 200 else openapi_from_models(model_name, max_tokens_cap)
    source = "/openapi.json" if status == 200 else "daop.server request models (the server has no /openapi.json)"
    schema = schemathesis.openapi.from_dict(copy.deepcopy(doc))

    deadline = time.monotonic() + seconds
    session = requests.Session()
    counts: dict[str, int] = {}
    failures: list[dict[str, Any]] = []
    sent = [0]
    skipped: list[str] = []

    log_seen = [os.path.getsize(log) if log else 0]

    def new_log_cause() -> str | None:
        if not log:
            return None
        with open(log, "rb") as f:
            f.seek(log_seen[0])
            text = f.read().decode("utf-8", "replace")
            log_seen[0] = f.tell()
        causes = [line for line in text.splitlines() if re.match(r"^[A-Za-z_.]*(Error|Exception)\b.*: ", line)]
        return causes[-1] if causes else None

    def record(label: str, status: int, content_type: str, body: bytes, streamed: bool, curl: str,
               complete: bool = True) -> None:
        sent[0] += 1
        counts[str(status)] = counts.get(str(status), 0) + 1
        cause = new_log_cause() if status >= 500 else None
        for p in problems(status, content_type, body, streamed, complete):
            if len(failures) < 50:
                failures.append({"operation": label, "problem": p, "reproduce": curl, "cause": cause})

    for body in RAW_BODIES:  # bodies that are not JSON objects, or JSON that Python accepts and UTF-8 cannot carry
        curl = (f"echo {base64.b64encode(body).decode()} | base64 -d | curl -X POST {base_url}/v1/completions "
                "-H 'Content-Type: application/json' --data-binary @-")
        try:
            resp = session.post(base_url + "/v1/completions", data=body, headers={"Content-Type": "application/json"},
                                timeout=60)
        except requests.RequestException as exc:
            record("raw POST /v1/completions", 0, "", f"{type(exc).__name__}: {exc}".encode(), False, curl)
            continue
        record("raw POST /v1/completions", resp.status_code, resp.headers.get("content-type", ""), resp.content, False, curl)

    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if time.monotonic() > deadline:
                break

            @settings(max_examples=max_examples, deadline=None, database=None, derandomize=seed is None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                if time.monotonic() > deadline:
                    return
                streamed = isinstance(case.body, dict) and case.body.get("stream") is True
                try:
                    resp = case.call(base_url=base_url, session=session, timeout=60)
                except requests.RequestException as exc:
                    record(op.label, 0, "", f"{type(exc).__name__}: {exc}".encode(), False, case.as_curl_command())
                    return
                ctype = resp.headers.get("content-type") or resp.headers.get("Content-Type") or ""
                complete = not (resp.stream_cut_short or resp.is_truncated)
                record(op.label, resp.status_code, ctype[0] if isinstance(ctype, list) else ctype, resp.content,
                       streamed, case.as_curl_command(), complete)

            if seed is not None:
                from hypothesis import seed as hseed
                run = hseed(seed)(run)
            try:
                run()
            except Unsatisfiable:  # nothing to negate (an operation without parameters or body)
                skipped.append(f"{op.label} {mode.value}")

    healthy = False
    try:
        healthy = http_get(host, port, "/health")[0] == 200 and (proc is None or proc.poll() is None)
    except OSError:
        pass
    if not healthy:
        failures.append({"operation": "GET /health", "problem": "the server is not healthy after fuzzing", "reproduce": ""})
    return {"schema": source, "requests": sent[0], "status_counts": dict(sorted(counts.items())),
            "failures": len(failures), "failure_details": failures, "skipped": skipped, "healthy_after": healthy,
            "timed_out": time.monotonic() > deadline}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (loopback only)")
    ap.add_argument("--serve", metavar="CHECKPOINT", default=None, help="start `daop serve` on this checkpoint first")
    ap.add_argument("--device", default=None, help="with --serve: cpu or cuda")
    ap.add_argument("--max-examples", type=int, default=100, help="cases per operation and mode")
    ap.add_argument("--seconds", type=float, default=60.0, help="stop generating cases after this long")
    ap.add_argument("--max-tokens-cap", type=int, default=8, help="largest max_tokens a positive case asks for")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: derandomized, repeatable)")
    args = ap.parse_args()
    if not 1 <= args.max_examples <= 10_000 or not 0 < args.seconds <= 3600:
        ap.error("need 1 <= --max-examples <= 10000 and 0 < --seconds <= 3600")
    try:
        import schemathesis  # noqa: F401
    except ImportError:
        ap.error("schemathesis is not installed: pip install schemathesis==4.32.5")

    proc, log = None, None
    if args.serve:
        port = free_port()
        proc, log = start_server(args.serve, args.device, port, timeout=300, label="fuzz")
        base_url = f"http://127.0.0.1:{port}"
        print(f"server up on {base_url} (log: {log})", file=sys.stderr)
    else:
        base_url = args.base_url.rstrip("/")
        host = urlsplit(base_url).hostname or ""
        if host not in LOOPBACK:
            ap.error(f"refusing non-loopback host {host!r}: this tool only fuzzes a local server")
    t0 = time.monotonic()
    try:
        report = fuzz(base_url, args.max_examples, args.seconds, args.max_tokens_cap, args.seed, proc, log)
    finally:
        if proc is not None:
            stop_server(proc)
    report["wall_s"] = round(time.monotonic() - t0, 2)
    for f in report["failure_details"][:20]:
        cause = f"\n  server log: {f['cause']}" if f.get("cause") else ""
        print(f"FAIL {f['operation']}: {f['problem']}{cause}\n  {f['reproduce']}", file=sys.stderr)
    print(json.dumps({k: v for k, v in report.items() if k != "failure_details"}))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

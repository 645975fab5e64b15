"""The command line as a user meets it (issue 15): real `python -m daop` processes."""
from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

BAD_BYTES = b"caf\xe9 \xff hello"
REPLACED = "daop: warning: the prompt is not valid UTF-8; undecodable bytes were replaced with U+FFFD"


def daop(*argv, stdin: bytes | None = None, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """`python -m daop ARGV` with stdout and stderr as text (argv items may be bytes: raw argv)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "daop", *argv], input=stdin if stdin is not None else b"",
                          capture_output=True, timeout=timeout, env=env)
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    return proc


@pytest.fixture(scope="module")
def ckpt(tiny_dir):
    return str(tiny_dir("mixtral")[1])


def gen(ckpt, *extra, stdin=None, env=None):
    return daop("generate", "--model", ckpt, "--device", "cpu", "--no-progress", "-n", "8", *extra, stdin=stdin, env=env)


# ------------------------------------------------------------------------------------------ conventions

def test_version_and_python_dash_m():
    import daop as pkg

    out = daop("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"daop {pkg.__version__}"
    help_ = daop("--help")
    assert help_.returncode == 0 and "generate" in help_.stdout and "serve" in help_.stdout


def test_every_flag_has_help_and_shows_its_default():
    from daop.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, sub in subs.choices.items():
        for action in sub._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            flag = f"{name} {action.option_strings[0]}"
            if not action.help:
                missing.append(f"{flag}: no help")
            elif action.nargs != 0 and "default" not in action.help and not action.required:
                missing.append(f"{flag}: no default shown")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("dtype", ["auto", "bfloat16", "float16", "float32", "bf16", "fp32"])
def test_dtype_names(ckpt, capsys, dtype):
    from daop.cli import main

    assert main(["generate", "--model", ckpt, "--device", "cpu", "--no-progress", "-n", "4", "--dtype", dtype,
                 "--stats", "hello"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("dtype, loaded", [("auto", "float32"), ("bfloat16", "bfloat16"), ("fp16", "float16")])
def test_dtype_names_load_that_dtype(ckpt, dtype, loaded):
    from daop.engine import Engine

    assert str(Engine.from_pretrained(ckpt, device="cpu", dtype=dtype, progress=False).decoder.dtype) == f"torch.{loaded}"


# ------------------------------------------------------------------------------------------ bad input

def test_non_utf8_argv_is_decoded_with_replacement(ckpt):
    out = gen(ckpt, BAD_BYTES)
    assert out.returncode == 0, out.stderr
    assert REPLACED in out.stderr.splitlines() and "Traceback" not in out.stderr
    assert out.stdout.strip()


def test_non_utf8_stdin_is_decoded_with_replacement(ckpt):
    for prompt in ([], ["-"]):
        out = gen(ckpt, *prompt, stdin=BAD_BYTES)
        assert out.returncode == 0, out.stderr
        assert REPLACED.replace("the prompt", "standard input") in out.stderr.splitlines()
        assert "Traceback" not in out.stderr


@pytest.mark.parametrize("flags, needle", [
    (["--temperature", "-1"], "temperature"), (["--temperature", "nan"], "temperature"), (["--top-p", "0"], "top_p"),
    (["--top-k", "-3"], "top_k"), (["--min-p", "1.5"], "min_p"), (["--repetition-penalty", "0"], "repetition_penalty"),
    (["--presence-penalty", "3"], "presence_penalty"), (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--seed", "-1"], "seed"), (["--expert-ratio", "2"], "--expert-ratio 2.0 must be between 0 and 1"),
    (["--gpu-memory", "lots"], "malformed memory size"), (["--threads", "0"], "--threads"),
    (["--cpu-threads", "0"], "--cpu-threads"), (["--max-context", "0"], "--max-context")])
def test_values_are_checked_before_the_model_loads(tmp_path, capsys, flags, needle):
    """The model folder does not exist: an error about the value proves it was checked first."""
    from daop.cli import main

    assert main(["generate", "--model", str(tmp_path / "not-loaded"), *flags, "hello"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("daop: error:") and needle in err, err


def test_a_bad_value_ends_the_process_with_one_line(tmp_path):
    out = daop("generate", "--model", str(tmp_path / "not-loaded"), "--temperature", "-1", "hello")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("daop: error:") and "temperature" in out.stderr, out.stderr


def test_hub_id_gets_a_download_hint():
    out = daop("generate", "--model", "someone/Some-MoE-v1", "hello")
    assert out.returncode == 2
    assert out.stderr.strip() == ("daop: error: model folder not found: someone/Some-MoE-v1; daop reads local folders "
                                  "only: huggingface-cli download someone/Some-MoE-v1 --local-dir DIR, then --model DIR")


def test_context_full_is_named(ckpt):
    out = gen(ckpt, "--temperature", "0", "--max-new-tokens", "1000000", "hello")
    assert out.returncode == 0
    assert "(length: the context window of 256 tokens is full)" in out.stderr


# ------------------------------------------------------------------------------------------ threads

def test_threads_flag_sets_the_dense_path_threads(ckpt):
    out = gen(ckpt, "--threads", "1", "--stats", "hello", env={"OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr
    assert "dense-path threads 1" in out.stderr


def test_sampling_flags_reach_the_engine(ckpt):
    from daop.engine import Engine

    engine = Engine.from_pretrained(ckpt, device="cpu", progress=False)
    prompt = "hello" + engine.generate("hello", max_new_tokens=6)  # what greedy would say next is in the prompt
    kw = dict(repetition_penalty=3.0, frequency_penalty=1.0)
    want = engine.generate(prompt, max_new_tokens=8, **kw)
    assert want != engine.generate(prompt, max_new_tokens=8)
    out = gen(ckpt, "--repetition-penalty", "3", "--frequency-penalty", "1", prompt)
    assert out.returncode == 0 and out.stdout == want + "\n"


# ------------------------------------------------------------------------------------------ chat

def chat(ckpt, lines: bytes):
    return daop("chat", "--model", ckpt, "--device", "cpu", "--no-progress", "-n", "6", stdin=lines)


def test_chat_commands_are_not_sent_to_the_model(ckpt):
    out = chat(ckpt, b"/help\n/reset\n/nonsense\n/exit\nnever read\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "> " * 4  # four prompts, no reply
    assert "/reset" in out.stderr and "unknown command /nonsense" in out.stderr
    eof = chat(ckpt, b"")  # Ctrl-D
    assert eof.returncode == 0 and eof.stdout == "> "


def test_non_utf8_chat_line_keeps_the_session(ckpt):
    out = chat(ckpt, BAD_BYTES + b"\nhello again\n")
    assert out.returncode == 0, out.stderr
    assert "daop: warning: that line is not valid UTF-8; undecodable bytes were replaced with U+FFFD" in out.stderr
    assert "Traceback" not in out.stderr
    assert out.stdout.count("> ") >= 3 and len(out.stdout.replace("> ", "").strip()) > 0  # two replies


def read_until(stream, pred, deadline: float) -> bytes:
    data = b""
    while not pred(data):
        assert time.monotonic() < deadline, f"timed out; got {data[-400:]!r}"
        if select.select([stream], [], [], 0.5)[0]:
            chunk = os.read(stream.fileno(), 4096)
            assert chunk, f"stream closed; got {data[-400:]!r}"
            data += chunk
    return data


def test_ctrl_c_stops_the_reply_not_the_chat():
    """SIGINT while the shipped model writes a long reply: the reply stops, the next question is answered."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "daop", "chat", "--device", "cpu", "--no-progress", "-n", "2000"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        proc.stdin.write(b"Tell me everything about the beginning.\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 90
        read_until(proc.stdout, lambda d: len(d.replace(b"> ", b"").strip()) > 20, deadline)
        proc.send_signal(signal.SIGINT)
        err = read_until(proc.stderr, lambda d: b"[reply stopped]" in d, time.monotonic() + 20)
        assert proc.poll() is None, "the chat ended"
        proc.stdin.write(b"And then?\n")
        proc.stdin.flush()
        after = read_until(proc.stdout, lambda d: len(d.replace(b"> ", b"").strip()) > 20, time.monotonic() + 90)
        assert after
        proc.send_signal(signal.SIGINT)  # stops the second (long) reply too
        err += read_until(proc.stderr, lambda d: b"[reply stopped]" in d, time.monotonic() + 20)
        _, rest = proc.communicate(b"/exit\n", timeout=30)
        err += rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0
    assert b"Traceback" not in err and b"interrupted" not in err


# ------------------------------------------------------------------------------------------ eval progress

def test_eval_progress_bar(ckpt, tmp_path):
    data = tmp_path / "docs.txt"
    data.write_text("\n\n".join(" ".join(f"word{i} w{j}" for i in range(60)) for j in range(3)))
    args = ["eval", "--model", ckpt, "--device", "cpu", "--data", str(data), "--max-docs", "2", "--prompt-tokens", "16",
            "--continuation-tokens", "8", "--gen-tokens", "4", "--expert-ratio", "0.5", "--policy", "daop-paper"]
    shown = daop(*args)
    assert shown.returncode == 0, shown.stderr
    assert "eval reference (gpu)" in shown.stderr and "eval daop-paper" in shown.stderr
    assert "4/4" in shown.stderr.replace(" ", "")  # two documents: perplexity + greedy continuation each
    assert json.loads(shown.stdout.strip().splitlines()[-1])["policy"] == "daop-paper"
    quiet = daop(*args, "--no-progress")
    assert quiet.returncode == 0 and "eval " not in quiet.stderr

"""Terminal input for the CLI: prompts from argv or stdin, and the interactive chat loop.

Text that is not valid UTF-8 (argv and stdin reach Python as bytes) is decoded with replacement:
each undecodable byte becomes U+FFFD, with one warning line on stderr; it is never an error.
"""
from __future__ import annotations

import re
import sys
from typing import Any

from daop.errors import DaopError

CHAT_HELP = """commands (not sent to the model):
  /help        this list
  /reset       forget the conversation (keeps --system)
  /exit        leave (also /quit or Ctrl-D)
Ctrl-C stops the reply being written; the conversation goes on."""

_SURROGATES = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> tuple[str, bool]:
    """(text with undecodable bytes as U+FFFD, whether any were replaced).

    Python hands undecodable argv/stdin bytes over as lone surrogates (surrogateescape), which
    no tokenizer accepts; they are decoded again with replacement.
    """
    if not _SURROGATES.search(text):
        return text, False
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), True
    except UnicodeEncodeError:  # surrogates that are not escaped bytes
        return _SURROGATES.sub("\ufffd", text), True


def warn_replaced(what: str) -> None:
    print(f"daop: warning: {what} is not valid UTF-8; undecodable bytes were replaced with U+FFFD", file=sys.stderr)


def read_prompt(arg: str | None) -> str:
    """The prompt: the argument, or all of stdin when it is absent or '-'."""
    if arg is not None and arg != "-":
        text, replaced = clean_text(arg)
        if replaced:
            warn_replaced("the prompt")
        return text
    if sys.stdin is None:
        raise DaopError("no prompt given and no standard input to read it from")
    if sys.stdin.isatty():
        print("daop: reading the prompt from standard input; end it with Ctrl-D", file=sys.stderr)
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:
        text, replaced = clean_text(sys.stdin.read())
    else:
        raw = buffer.read()
        try:
            text, replaced = raw.decode("utf-8"), False
        except UnicodeDecodeError:
            text, replaced = raw.decode("utf-8", "replace"), True
    if replaced:
        warn_replaced("standard input")
    return text


def _line_editing() -> None:
    """Arrow keys, line editing and history for input() where the readline module exists."""
    if sys.stdin is not None and sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (importing it is what turns it on)
        except ImportError:
            pass


def _read_line() -> str | None:
    """The next line typed, cleaned; None at end of input (Ctrl-D). Ctrl-C here only starts a new line."""
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return None
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /exit leaves)", file=sys.stderr)
            continue
        except UnicodeDecodeError:
            print("daop: warning: that line is not valid UTF-8 and could not be read; nothing was sent", file=sys.stderr)
            continue
        line, replaced = clean_text(line)
        if replaced:
            warn_replaced("that line")
        return line


def _reply(engine: Any, messages: list[dict[str, str]], sampling: dict[str, Any]) -> None:
    """Stream the assistant's reply to messages[-1] and append it; Ctrl-C keeps what was written so far."""
    pieces: list[str] = []
    gen = None
    try:
        gen = engine.stream(engine.chat_prompt(messages), **sampling)
        for piece in gen:
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        print("[reply stopped]", file=sys.stderr)
    except DaopError as exc:
        print(f"daop: error: {exc}", file=sys.stderr)
        pieces = []
    finally:
        if gen is not None:
            gen.close()  # frees the KV cache of an unfinished reply
    sys.stdout.flush()
    reply = "".join(pieces).strip()
    if reply:
        messages.append({"role": "assistant", "content": reply})
    else:
        messages.pop()  # nothing was answered: the question is not kept either


def chat(engine: Any, system: str | None, sampling: dict[str, Any]) -> int:
    """The interactive loop of `daop chat`."""
    if system:
        system, replaced = clean_text(system)
        if replaced:
            warn_replaced("--system")
    start: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    _line_editing()
    if sys.stdin is not None:
        try:
            sys.stdin.reconfigure(errors="surrogateescape")  # bad bytes reach clean_text instead of raising
        except (AttributeError, ValueError):
            pass
    print(f"daop chat with {engine.model_dir.name} on {engine.device}. /help lists commands; /exit or Ctrl-D leaves.",
          file=sys.stderr)
    while True:
        line = _read_line()
        if line is None:
            return 0
        command = line.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            messages = list(start)
            print("(conversation forgotten)", file=sys.stderr)
            continue
        if command in ("/help", "/?"):
            print(CHAT_HELP, file=sys.stderr)
            continue
        if command.startswith("/") and " " not in command:
            print(f"unknown command {command}; /help lists the commands", file=sys.stderr)
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        _reply(engine, messages, sampling)

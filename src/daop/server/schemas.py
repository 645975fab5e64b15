"""Request bodies: reading and checking the JSON body, the pydantic models that validate it, sampling
parameters, and the OpenAI-shaped error type."""
from __future__ import annotations

import json
import re
from typing import Any, Optional

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import ClientDisconnect

from daop.errors import DaopError
from daop.sampling import SamplingParams

DEFAULT_MAX_TOKENS = 256
OPENAI_DEFAULTS: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
                                   "presence_penalty": 0.0, "frequency_penalty": 0.0}
DEFAULT_MAX_BODY_BYTES = 1 << 20
DRAIN_BYTES = 8 << 20          # how much of an oversized body is read and dropped so the 413 reaches the client


# ----------------------------------------------------------------------------------------------- errors

class ApiError(Exception):
    """An error answered to the client in OpenAI's JSON shape."""

    TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
             413: "invalid_request_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self.TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class ClientGone(Exception):
    """The client disconnected while its request waited or ran."""


def _param_name(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _validation_error(exc: ValidationError) -> ApiError:
    err = exc.errors(include_url=False)[0]
    param = _param_name(tuple(err.get("loc", ())))
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return ApiError(400, f"Invalid value for '{param}': {msg}" if param else msg, param=param or None)


# --------------------------------------------------------------------------------------------- requests

class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: Optional[bool] = None


# Fields other servers honour and this one does not: asking for them is an error, not a silent no-op;
# only the values that mean "off" pass.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
    "tool_choice": (None, "none"), "function_call": (None, "none"), "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]), "audio": (None,),
    "prediction": (None,), "web_search_options": (None,), "reasoning_effort": (None,),
}
# Fields that change nothing in the answer (bookkeeping on OpenAI's side), accepted and ignored.
_IGNORED = frozenset({"user", "metadata", "store", "service_tier"})
# Message fields accepted when empty (an assistant message sent back as the client received it).
_EMPTY_MESSAGE_FIELDS = frozenset({"refusal", "tool_calls", "function_call", "audio", "annotations"})
CHAT_ROLES = ("system", "developer", "user", "assistant")


def check_fields(data: dict[str, Any], model: type[BaseModel]) -> None:
    """A 400 naming the first field this server does not support (unknown fields are not dropped silently)."""
    for key, allowed in _UNSUPPORTED.items():
        if key in data and data[key] not in allowed:
            raise ApiError(400, f"'{key}' is not supported by this server", param=key)
    known = set(model.model_fields) | set(_UNSUPPORTED) | _IGNORED
    for key in data:
        if key not in known and data[key] is not None:
            raise ApiError(400, f"Unrecognized request argument supplied: '{key}' is not supported by this server",
                           param=key)
    messages = data.get("messages")
    if isinstance(messages, list):
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                continue
            for key, value in m.items():
                empty = value is None or (key in _EMPTY_MESSAGE_FIELDS and value in ([], {}, ""))
                if key not in ChatMessage.model_fields and not empty:
                    raise ApiError(400, f"'messages[{i}].{key}' is not supported by this server",
                                   param=f"messages[{i}].{key}")


class _Common(_Strict):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    stop: Any = None
    n: Optional[int] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
            raise ValueError("expected a non-empty string or a list of non-empty strings")
        if len(v) > 16:
            raise ValueError("at most 16 stop strings")
        return v

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens

    def max_new_tokens(self) -> int:
        requested = self.requested_max_tokens()
        return requested if requested is not None else DEFAULT_MAX_TOKENS

    def sampling(self, defaults: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Keyword arguments of Engine.stream, validated by SamplingParams. A field the request leaves out takes
        the checkpoint's generation_config.json value (`defaults`), else OpenAI's default (temperature 1.0)."""
        given = {k: getattr(self, k) for k in ("temperature", "top_p", "min_p", "repetition_penalty",
                                               "presence_penalty", "frequency_penalty")}
        given["top_k"] = None if self.top_k is None else max(self.top_k, 0)  # -1 is vLLM's "off"
        kw = {**OPENAI_DEFAULTS, **(defaults or {})}
        kw.update({k: v for k, v in given.items() if v is not None})
        kw.update(max_new_tokens=self.max_new_tokens(), seed=self.seed, stop=tuple(self.stop or ()))
        try:
            SamplingParams(**kw)
        except DaopError as exc:
            raise ApiError(400, str(exc)) from exc
        return kw


class CompletionRequest(_Common):
    prompt: Any

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], (str, list)):
            v = v[0]  # a batch of one
        if isinstance(v, str):
            return v
        if isinstance(v, list) and v and all(type(t) is int for t in v):
            return v
        if isinstance(v, list) and v and all(isinstance(t, (str, list)) for t in v):
            raise ValueError("only one prompt per request is supported")
        raise ValueError("expected a string or a non-empty list of token ids")


class ChatMessage(_Strict):
    role: str
    content: Any = None
    name: Optional[str] = None

    @field_validator("role", mode="after")
    @classmethod
    def _check_role(cls, v: str) -> str:
        if v not in CHAT_ROLES:
            raise ValueError(f"unsupported role {v!r}; this server accepts {', '.join(CHAT_ROLES)}")
        return v

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, v: Any) -> Any:
        if isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                       for p in v):
            return "\n".join(p["text"] for p in v)
        raise ValueError("expected a string or a list of {type: 'text', text} parts")


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in self.messages]


# ------------------------------------------------------------------------------------------------- body

async def read_json(request: Request, max_bytes: int) -> dict[str, Any]:
    """The request body as a JSON object; 413 past max_bytes, 400 when it is not a JSON object."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_n = int(declared)
        except ValueError:
            raise ApiError(400, "invalid Content-Length header") from None
        if declared_n > max_bytes + DRAIN_BYTES:
            raise _too_large(max_bytes)
    body = bytearray()
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes + DRAIN_BYTES:
                break
            if total <= max_bytes:
                body += chunk
    except ClientDisconnect:
        raise ApiError(400, "the client disconnected while sending the request body") from None
    if total > max_bytes:
        raise _too_large(max_bytes)

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(bytes(body), parse_constant=no_constants)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    if _SURROGATE_ESCAPE.search(body):  # JSON may spell a lone UTF-16 surrogate, which no tokenizer accepts
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except (UnicodeEncodeError, RecursionError):
            raise ApiError(400, "The request body contains an unpaired surrogate escape (\\ud800-\\udfff); "
                                "strings must be valid Unicode.") from None
    return data


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"Request body is larger than the server's limit of {max_bytes} bytes (--max-body-bytes).",
                    code="request_too_large")

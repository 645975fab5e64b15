"""API-key check: every request but those to the open paths needs `Authorization: Bearer <key>`."""
from __future__ import annotations

import hmac
from typing import Any

from daop.server.schemas import ApiError


class ApiKeyMiddleware:
    """Answers 401 in OpenAI's error shape unless the request carries the key (compared in constant time)."""

    def __init__(self, app: Any, api_key: str, open_paths: tuple[str, ...] = ("/health",)) -> None:
        self.app, self.open_paths = app, open_paths
        self.expected = api_key.encode("utf-8")

    def authorized(self, scope: dict) -> bool:
        header = b""
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in self.open_paths or self.authorized(scope):
            return await self.app(scope, receive, send)
        response = ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>' with the key the "
                                 "server was started with (--api-key / DAOP_API_KEY).", code="invalid_api_key").response()
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)

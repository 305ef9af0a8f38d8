"""HEAD answered wherever GET is (uptime monitors and load balancers probe with HEAD).

An ASGI middleware: a HEAD request runs as GET and its body is dropped, so the status and
headers (Content-Length included) are exactly GET's. Paths without GET answer 405 as
before, with `Allow` naming their method.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, Any]


class HeadAsGet:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app(dict(scope, method="GET"), receive, send_without_body)

"""Request body size limit: an ASGI middleware that answers 413 before the app reads a byte too many.

    Content-Length over the limit      413 at once, the body is never read
    chunked body growing over it       reading stops at the limit, 413

The body is read here (at most `max_bytes`) and replayed to the app, so the app and the
JSON parser never see more than the limit; later `receive` calls (the client's
disconnect) pass through untouched. Only requests with a body (POST, PUT, PATCH) are
checked. The answer is OpenAI's error JSON (serving.errors.PayloadTooLarge).
"""

from __future__ import annotations

from serving.errors import PayloadTooLarge, error_response

BODY_METHODS = ("POST", "PUT", "PATCH")


class BodyLimit:
    """ASGI middleware: request bodies over `max_bytes` get 413 in OpenAI's error shape."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in BODY_METHODS:
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                too_big = False  # the server rejects a malformed Content-Length itself
            if too_big:
                return await self._refuse(scope, receive, send, int(declared))
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send, None)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, declared: int | None) -> None:
        got = f"{declared} bytes" if declared is not None else "more"
        error = PayloadTooLarge(f"The request body is {got}; the limit is {self.max_bytes} bytes.")
        await error_response(error)(scope, receive, send)

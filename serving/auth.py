"""Optional API keys: `Authorization: Bearer <key>` on every path but /health.

Keys come from a file (`api.api_keys_file`, one key per line, `#` comments) or from an
environment variable (`api.api_keys_env`, comma-separated), never from a command-line
value. No keys configured: no auth. A configured file that is missing, unreadable or
empty is an error at start, so a typo never serves an open server by mistake.

Keys are held as their SHA-256 digests and compared with `hmac.compare_digest` against
every key (no early exit), so the time taken says nothing about which byte differed or
which key came close.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from mode_cotd.errors import ConfigError
from serving.errors import Unauthorized, error_response
from serving.settings import ApiSettings

OPEN_PATHS = frozenset({"/health"})
"""Paths answered without a key (load balancers' health checks)."""


def load_api_keys(settings: ApiSettings, environ: dict[str, str] | None = None) -> list[str]:
    """The accepted keys: the file's lines, else the environment variable's comma-separated values."""
    environ = os.environ if environ is None else environ
    if settings.api_keys_file:
        path = Path(settings.api_keys_file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"api.api_keys_file {path}: cannot read the API keys ({e})") from e
        keys = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
        if not keys:
            raise ConfigError(f"api.api_keys_file {path}: holds no keys")
        return keys
    raw = environ.get(settings.api_keys_env, "") if settings.api_keys_env else ""
    return [k.strip() for k in raw.split(",") if k.strip()]


class KeyChecker:
    """Constant-time check of a presented key against the accepted ones."""

    def __init__(self, keys: list[str]):
        if any(len(k) < 8 for k in keys):
            raise ConfigError("API keys must be at least 8 characters")
        self._digests = [hashlib.sha256(k.encode("utf-8")).digest() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def accepts(self, presented: str | None) -> bool:
        digest = hashlib.sha256((presented or "").encode("utf-8")).digest()
        matched = False
        for accepted in self._digests:  # all of them, always
            matched |= hmac.compare_digest(digest, accepted)
        return matched and presented is not None


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class ApiKeyAuth:
    """ASGI middleware: 401 in OpenAI's error shape unless the request carries an accepted key."""

    def __init__(self, app, checker: KeyChecker):
        self.app = app
        self.checker = checker

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if not self.checker.accepts(bearer_token(scope.get("headers") or [])):
            error = Unauthorized("Incorrect or missing API key: send `Authorization: Bearer <key>`.")
            return await error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)

"""What the ingress keeps about one request while it is served: its timing, and the client going away."""

from __future__ import annotations

import time

from serving.protocol import GenerationDelta

CLIENT_CLOSED_REQUEST = 499
"""Status recorded for a request whose client went away (nginx's convention; nobody receives it)."""


class ClientDisconnected(Exception):
    """The client went away before its response was ready."""


class RequestTiming:
    """Arrival, first token and token count of one request."""

    def __init__(self) -> None:
        self.arrival = time.perf_counter()
        self.first_token: float | None = None

    def seen(self, delta: GenerationDelta) -> None:
        if self.first_token is None and delta.num_tokens > 0:
            self.first_token = time.perf_counter()

    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

"""One mode-cotd app under a local Ray Serve on 127.0.0.1, for the integration tests (started once per module)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from serving.settings import ServeSettings

STARTUP_TIMEOUT_S = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_app(settings: ServeSettings) -> Iterator[tuple[str, float]]:
    """Ray (2 CPUs), Serve's proxy on settings.port and the app of `settings`; yields its base URL and the seconds
    it took to answer /health with 200, then shuts Serve and Ray down."""
    import ray
    from ray import serve

    from serving.app import build_app

    started = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": settings.port})
        serve.run(build_app(settings), name=settings.app_name, route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{settings.port}"
        while httpx.get(f"{base}/health", timeout=10).status_code != 200:
            assert time.monotonic() - started < STARTUP_TIMEOUT_S, f"{settings.app_name} did not start"
            time.sleep(1)
        yield base, time.monotonic() - started
    finally:
        serve.shutdown()
        ray.shutdown()

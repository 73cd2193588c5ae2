"""How HTTP reaches the ingress deployment under `mode-cotd serve`: straight into the ingress replica, or through
Serve's proxy.

    direct   the ingress replica itself listens on host:port (Ray Serve's direct ingress): a streamed chunk
             crosses the student replica and the ingress, not also the proxy. Serve still starts its proxy,
             which binds a free local port and carries no traffic.
    proxy    Serve's HTTP proxy listens on host:port and forwards every request and chunk to an ingress replica.

Direct needs the Serve processes to start with Serve's direct-ingress environment, which only a Ray that
`mode-cotd serve` starts itself inherits, and one ingress replica (it takes the one port). "auto" picks direct where
both hold. `serve run` and a Ray cluster (deploy/) use the proxy unless their environment sets these variables.
"""

from __future__ import annotations

import socket

from mode_cotd.errors import ConfigError
from serving.settings import ServeSettings

HTTP_PATHS = ("auto", "direct", "proxy")


def choose_http_path(settings: ServeSettings, joins_cluster: bool) -> str:
    """"direct" or "proxy" for settings.http_path; ConfigError when "direct" cannot be had, saying why."""
    if settings.http_path not in HTTP_PATHS:
        raise ConfigError(f"http_path: expected one of {', '.join(HTTP_PATHS)}, got {settings.http_path!r}")
    front = settings.front()  # the ingress, or the colocated deployment
    single = front.autoscaling is None and front.num_replicas == 1
    why_not = ("it joins a running Ray cluster (--ray-address), whose Serve processes did not start with the "
               "direct-ingress environment" if joins_cluster else
               None if single else "the ingress has more than one replica, and direct HTTP gives the port to one")
    if why_not is None:
        return "proxy" if settings.http_path == "proxy" else "direct"
    if settings.http_path == "direct":
        raise ConfigError(f"http_path direct: not possible here, as {why_not}; use --http-path proxy (or auto)")
    return "proxy"


def direct_ingress_env(port: int) -> dict[str, str]:
    """Serve's environment for direct HTTP on `port`: the ingress replica gets exactly that port, and leaves at
    shutdown without Serve's 30 s wait for load balancers (there are none in front of it)."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}


def free_port(host: str) -> int:
    """A port on `host` that nothing listens on now (for the idle proxy of direct HTTP)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def require_free_port(host: str, port: int) -> None:
    """ConfigError when something already listens on host:port. Checked before Ray starts: with direct HTTP the
    ingress replica would otherwise retry in the background while another server answered /health on the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # closed connections in TIME_WAIT do not count
        try:
            s.bind((host, port))
            s.listen(1)
        except OSError as e:
            raise ConfigError(f"{host}:{port} is in use ({e.strerror}): is another server running there? Stop it, "
                              "or serve on another --port") from None

"""`mode-cotd serve`'s HTTP path: direct into the ingress replica where it can be, else Serve's proxy."""

from __future__ import annotations

import socket

import pytest

from mode_cotd.errors import ConfigError
from serving.http_path import choose_http_path, direct_ingress_env, free_port, require_free_port
from serving.settings import AutoscalingSettings, DeploymentSettings, ServeSettings


def _settings(http_path: str = "auto", replicas: int = 1, autoscaling: bool = False) -> ServeSettings:
    ingress = DeploymentSettings(num_replicas=replicas, autoscaling=AutoscalingSettings() if autoscaling else None)
    return ServeSettings(http_path=http_path, ingress=ingress)


def test_auto_is_direct_with_one_ingress_replica_on_a_ray_of_its_own():
    assert choose_http_path(_settings(), joins_cluster=False) == "direct"
    assert choose_http_path(_settings("direct"), joins_cluster=False) == "direct"
    assert choose_http_path(_settings("proxy"), joins_cluster=False) == "proxy"


@pytest.mark.parametrize(("replicas", "autoscaling", "joins"), [(2, False, False), (1, True, False), (1, False, True)])
def test_auto_falls_back_to_the_proxy_and_direct_says_why_it_cannot(replicas, autoscaling, joins):
    for path, expected in (("auto", "proxy"), ("proxy", "proxy")):
        assert choose_http_path(_settings(path, replicas, autoscaling), joins_cluster=joins) == expected
    with pytest.raises(ConfigError, match="--ray-address" if joins else "more than one replica"):
        choose_http_path(_settings("direct", replicas, autoscaling), joins_cluster=joins)


def test_an_unknown_path_is_refused():
    with pytest.raises(ConfigError, match="http_path.*'fast'"):
        choose_http_path(_settings("fast"), joins_cluster=False)


def test_the_direct_environment_gives_the_ingress_exactly_the_port():
    env = direct_ingress_env(8123)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    low, high = int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]), int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"])
    assert list(range(low, high)) == [8123]  # Serve allocates from range(min, max)
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "0"


def test_the_proxy_port_is_free():
    port = free_port("127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # raises if something held it


def test_a_port_something_listens_on_is_refused_before_anything_starts():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port} is in use"):
            require_free_port("127.0.0.1", port)
    require_free_port("127.0.0.1", port)  # closed: free again

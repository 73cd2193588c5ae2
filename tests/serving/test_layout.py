"""The app's layout: split (ingress, router and student deployments) or colocated (one deployment holds all three)."""

from __future__ import annotations

import pytest

from mode_cotd.errors import ConfigError
from serving.http_path import choose_http_path
from serving.settings import DeploymentSettings, ServeSettings


def _colocated(**student) -> ServeSettings:
    return ServeSettings(layout="colocated", ingress=DeploymentSettings(max_ongoing_requests=900,
                                                                        max_queued_requests=77),
                         student_deployment=DeploymentSettings(num_cpus=1.5, **student))


def test_the_colocated_deployment_takes_the_students_size_and_the_ingress_limits():
    front = _colocated(num_replicas=3).front()
    assert (front.num_cpus, front.num_replicas) == (1.5, 3)
    assert (front.max_ongoing_requests, front.max_queued_requests) == (900, 77)
    assert ServeSettings().front() == ServeSettings().ingress  # split: HTTP goes to the ingress


def test_an_unknown_layout_is_refused_by_name():
    with pytest.raises(ConfigError, match="layout: expected 'split' or 'colocated', got 'merged'"):
        ServeSettings(layout="merged").front()


def test_direct_http_follows_the_colocated_replicas():
    assert choose_http_path(_colocated(), joins_cluster=False) == "direct"
    assert choose_http_path(_colocated(num_replicas=2), joins_cluster=False) == "proxy"
    with pytest.raises(ConfigError, match="more than one replica"):
        choose_http_path(ServeSettings(layout="colocated", http_path="direct",
                                       student_deployment=DeploymentSettings(num_replicas=2)), joins_cluster=False)


@pytest.mark.parametrize("layout", ["split", "colocated"])
def test_the_app_binds_the_deployments_of_its_layout(tiny_bundle, tiny_student, layout):
    pytest.importorskip("ray")
    from serving.app import build_app

    settings = ServeSettings(bundle=str(tiny_bundle), student=str(tiny_student), layout=layout,
                             student_deployment=DeploymentSettings(num_cpus=0.5))
    app = build_app(settings)
    front = app._bound_deployment
    assert front.name == ("colocated" if layout == "colocated" else "ingress")
    children = [a for a in front.init_args if hasattr(a, "_bound_deployment")]
    names = sorted(a._bound_deployment.name for a in children)
    assert names == ([] if layout == "colocated" else ["router", "student"])
    if layout == "colocated":
        assert front.ray_actor_options["num_cpus"] == 0.5

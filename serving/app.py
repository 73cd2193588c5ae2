"""The Ray Serve application: ingress -> (router) -> student, built from ServeSettings.

    serve run serving.app:build_app bundle=bundles/default       (args as key=value)
    serve run deploy/serve_config.yaml                            (args from the YAML)
    mode-cotd serve                                               (serving.cli)

`build_app` takes a nested dict (a Serve config's `args:`) or a ServeSettings; it resolves
paths and checks the bundle against the student here, in the driver, so a bad bundle
fails at once with a message naming the file instead of inside a replica.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from mode_cotd.settings import nest_dotted
from serving import components
from serving.deployments import IngressDeployment, RouterDeployment, StudentDeployment
from serving.settings import ServeSettings, from_dict


def settings_from_args(args: dict[str, Any] | ServeSettings | None) -> ServeSettings:
    """ServeSettings from a Serve config's args (nested dict; "a.b": v keys also accepted)."""
    if isinstance(args, ServeSettings):
        return args
    return from_dict(ServeSettings, nest_dotted(args or {}))


def build_app(args: dict[str, Any] | ServeSettings | None = None) -> Application:
    """The bound Serve application (ingress, router when the bundle has a gate, student)."""
    settings = components.resolve_settings(settings_from_args(args))
    bundle = components.load_serving_bundle(settings)
    student = StudentDeployment.options(**settings.student_deployment.serve_options()).bind(settings)
    router = None
    if bundle.gate is not None:
        router = RouterDeployment.options(**settings.router.serve_options()).bind(settings)
    return IngressDeployment.options(**settings.ingress.serve_options()).bind(settings, router, student)

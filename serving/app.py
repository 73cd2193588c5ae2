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

from mode_cotd.bundle import read_manifest
from mode_cotd.settings import nest_dotted
from serving import components
from serving.bundle_source import local_bundle
from serving.deployments import ColocatedDeployment, IngressDeployment, RouterDeployment, StudentDeployment
from serving.settings import ServeSettings, from_dict


def settings_from_args(args: dict[str, Any] | ServeSettings | None) -> ServeSettings:
    """ServeSettings from a Serve config's args (nested dict; "a.b": v keys also accepted)."""
    if isinstance(args, ServeSettings):
        return args
    return from_dict(ServeSettings, nest_dotted(args or {}))


def build_app(args: dict[str, Any] | ServeSettings | None = None) -> Application:
    """The bound Serve application: ingress, router when the bundle has a gate, and student; or, in the
    "colocated" layout, the one deployment that holds all three."""
    return app_for(components.resolve_settings(settings_from_args(args)))


def app_for(settings: ServeSettings) -> Application:
    """build_app for settings already resolved (components.resolve_settings, which validated the bundle: reading
    a bundle of a thousand experts takes ~30 s, so `mode-cotd serve` reads it once before Ray starts)."""
    if settings.layout == "colocated":
        return ColocatedDeployment.options(**settings.front().serve_options()).bind(settings)
    student = StudentDeployment.options(**settings.student_deployment.serve_options()).bind(settings)
    router = None
    if read_manifest(local_bundle(settings.bundle)).gate is not None:
        router = RouterDeployment.options(**settings.router.serve_options()).bind(settings)
    return IngressDeployment.options(**settings.ingress.serve_options()).bind(settings, router, student)

"""`mode-cotd serve`: start a local Ray (or join one), deploy the app, wait until the student is loaded.

With no arguments it serves the repo's `bundles/residual` over the default student on
http://127.0.0.1:8000/v1: the gate over residual experts on top of the shared all_data adapter (the route that
beat all_data on the seen tasks in the powered table, docs/results.md), all_data also served alone as
`mode-cotd:all_data`. Every field of ServeSettings has a flag (`--engine-max-loras`,
`--batching-max-batch-size`, `--student-deployment-num-gpus`, ...), with the field's
docstring as its help; `--config` reads the same tree from YAML (a Serve config's `args:`
or a plain mapping), and flags override it. Ctrl-C (or SIGTERM) shuts Serve and Ray down.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from mode_cotd import paths
from mode_cotd.errors import ConfigError, StudentError
from mode_cotd.settings import add_settings_flags, load_config_file, nest_dotted
from serving.components import resolve_settings
from serving.http_path import choose_http_path, direct_ingress_env, free_port, require_free_port
from serving.settings import ServeSettings, from_dict

DEFAULT_BUNDLE = paths.REPO_ROOT / "bundles" / "residual"
"""The bundle `mode-cotd serve` serves when neither --bundle nor --config names one."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mode-cotd serve",
        description="Serve a bundle over Ray Serve + vLLM: OpenAI API, /metrics, /health. "
                    f"Defaults: bundle {DEFAULT_BUNDLE}, the default student, http://127.0.0.1:8000.",
    )
    parser.add_argument("--config", type=Path, help="YAML with settings (a Serve config's first app args, or a mapping)")
    parser.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    parser.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--startup-timeout-s", type=float, default=900.0, help="how long to wait for the student")
    parser.add_argument("--export-runtime", type=Path, default=None, metavar="OUT",
                        help="do not serve: write the bundle plus its runtime routes (runtime.state_dir) as a new "
                             "bundle at OUT, which `mode-cotd serve --bundle OUT` serves")
    group = parser.add_argument_group("settings (serving/settings.py; flags override --config)")
    add_settings_flags(group, ServeSettings, ServeSettings(bundle=str(DEFAULT_BUNDLE)))  # mappings: --config only
    return parser


def _config_file(path: Path) -> dict[str, Any]:
    """The settings tree in a YAML file: a Serve config's first application's args, or a plain mapping."""
    data = load_config_file(path)
    if isinstance(data, dict) and "applications" in data:
        data = (data["applications"] or [{}])[0].get("args", {}) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    return data


def settings_from_cli(args: argparse.Namespace) -> ServeSettings:
    """The settings tree: --config first, then every flag given on the command line."""
    top = {f.name for f in dataclasses.fields(ServeSettings)}
    flags = {dest: value for dest, value in vars(args).items() if dest.split(".")[0] in top}  # not CLI-only flags
    tree = nest_dotted(flags, _config_file(args.config) if args.config else {})
    tree.setdefault("bundle", str(DEFAULT_BUNDLE))
    return from_dict(ServeSettings, tree)


def _wait_until_ready(url: str, timeout_s: float) -> float:
    import httpx

    started = time.monotonic()
    next_note = started + 15
    while time.monotonic() - started < timeout_s:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        if time.monotonic() >= next_note:
            print(f"mode-cotd serve: loading the student ({time.monotonic() - started:.0f} s)...", flush=True)
            next_note += 15
        time.sleep(0.5)
    raise StudentError(f"the student did not become ready within {timeout_s:.0f} s (GET {url} never returned 200)")


def _stop(signum, frame):
    raise KeyboardInterrupt


def _export_runtime(settings: ServeSettings, out: Path) -> int:
    from serving.components import load_serving_bundle, runtime_state

    settings = resolve_settings(dataclasses.replace(settings, runtime=dataclasses.replace(settings.runtime,
                                                                                         enabled=True)))
    state = runtime_state(settings, load_serving_bundle(settings))
    snapshot = state.snapshot()
    state.export_bundle(out)
    print(f"mode-cotd serve: exported {settings.bundle} with {len(snapshot.experts)} runtime experts and "
          f"{len(snapshot.compositions)} runtime compositions (state {state.folder}, version {snapshot.version}) "
          f"to {out}", flush=True)
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from_cli(args)
    if args.export_runtime is not None:
        return _export_runtime(settings, args.export_runtime)

    from serving.app import app_for  # pulls in Ray Serve: imported when serving, not for --help

    settings = resolve_settings(settings)  # a missing or bad bundle fails here, before Ray starts
    import ray
    from ray import serve

    require_free_port(settings.host, settings.port)
    proxy_port = settings.port
    if choose_http_path(settings, joins_cluster=args.ray_address is not None) == "direct":
        os.environ.update(direct_ingress_env(settings.port))  # before ray.init: its processes inherit them
        proxy_port = free_port(settings.host)
    started = time.monotonic()
    try:
        ray.init(address=args.ray_address, num_cpus=args.ray_num_cpus, include_dashboard=False)
        for stop_signal in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which sets its own SIGTERM handler
            signal.signal(stop_signal, _stop)
        serve.start(http_options={"host": settings.host, "port": proxy_port})
        serve.run(app_for(settings), name=settings.app_name, route_prefix=settings.route_prefix, blocking=False)
        base = f"http://{settings.host}:{settings.port}{settings.route_prefix.rstrip('/')}"
        _wait_until_ready(f"{base}/health", args.startup_timeout_s)
        print(f"mode-cotd serve: ready in {time.monotonic() - started:.0f} s. OpenAI API at {base}/v1 "
              f"(bundle {settings.bundle}); metrics at {base}/metrics. Ctrl-C stops.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("mode-cotd serve: shutting down...", flush=True)
        return 0
    finally:
        for stop_signal in (signal.SIGINT, signal.SIGTERM):  # let nothing interrupt the clean-up
            signal.signal(stop_signal, signal.SIG_IGN)
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        print("mode-cotd serve: stopped.", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

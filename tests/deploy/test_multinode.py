"""A real two-node Ray cluster on this machine: the app deployed with `serve deploy`, placed by resources,
a student replica killed with SIGKILL and restored, and a new bundle rolled out in place.
Marked `manual` (about 5 minutes):
    flock /tmp/heavy.lock .venv/bin/python -m pytest -q -s -m manual tests/deploy/test_multinode.py

    head    127.0.0.2  `ray start --head`, 1 CPU, {"mode_cotd_cpu": 100}: Serve controller, HTTP proxy,
                        ingress and router (they ask for mode_cotd_cpu, as in deploy/serve_config.gpu.yaml)
    worker  127.0.0.3  `ray start --address=...`, 2 CPUs, {"student_node": 2}: the stand-in for a GPU node;
                        the student deployment asks for one student_node instead of one GPU (two fit, for
                        the surge replica of a rollout)

The Serve config is deploy/serve_config.gpu.yaml with the sizes of a tiny student and the bundle as a
file:// URI, which each node fetches into its own cache (serving/bundle_source.py). Completions go through
the ingress with the openai client. The output (pytest -s) shows which node runs which replica (Ray's state
API), how long requests failed after the student's process was killed, and how the rollout went. The
cluster is stopped by the PIDs it started (tests/deploy/ray_cluster.py), never with `ray stop`.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from mode_cotd.bundle import add_composition

from .conftest import DEPLOY, wait_healthy
from .ray_cluster import SERVE, LocalRayCluster, free_port

# About 5 minutes on 2 cores: past what `make test` can spend, so it runs by hand (deploy/README.md).
pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.vllm, pytest.mark.manual]

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
STARTUP_TIMEOUT_S = 420
RECOVERY_TIMEOUT_S = 300
PROMPT = "Infer the correct answer for the question.\n\nQ: Tom has 3 apples and buys 4 more. How many?\nA:"


def serve_config(bundle_uri: str, student: str, port: int, composites: str) -> dict:
    """deploy/serve_config.gpu.yaml, sized for the tiny student on a 1-CPU head and a 2-CPU worker, no GPU."""
    config = yaml.safe_load((DEPLOY / "serve_config.gpu.yaml").read_text())
    config["proxy_location"] = "HeadOnly"  # one HTTP proxy: both nodes share this machine's ports
    config["http_options"] = {"host": HEAD_IP, "port": port}
    args = config["applications"][0]["args"]
    args.update(bundle=bundle_uri, student=student)
    args["ingress"].update(num_cpus=0.25)
    args["router"].update(num_cpus=0.25, autoscaling=None, num_replicas=1)
    args["student_deployment"].update(num_cpus=1.0, num_gpus=0.0, resources={"student_node": 1},
                                      autoscaling=None, num_replicas=1, max_surge_percent=100)
    args["engine"] = {"max_model_len": 1024, "max_loras": 4, "max_cpu_loras": 8, "max_num_seqs": 16,
                      "enforce_eager": True, "kv_cache_memory_bytes": 64 * 2**20}
    args["batching"] = {"max_batch_size": 8, "batch_wait_timeout_s": 0.02}
    args["cache"] = {"dir": composites, "max_entries": 16}
    args["api"] = {"default_max_tokens": 16}
    return config


@dataclass
class App:
    cluster: LocalRayCluster
    base: str
    config: dict
    config_path: Path
    ready_s: float

    @property
    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key="none", max_retries=0, timeout=30)

    def complete(self, model: str, **extra) -> openai.types.Completion:
        return self.client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0, **extra)

    def deploy(self, config: dict) -> None:
        self.config_path.write_text(yaml.safe_dump(config))
        done = self.cluster.run(SERVE, "deploy", str(self.config_path), "--address", self.cluster.dashboard_url)
        assert done.returncode == 0, done.stdout + done.stderr
        self.config = config

    def replicas(self) -> dict[str, list[dict]]:
        """Deployment (or Serve actor) name -> its live replicas' {pid, node_ip}, from Ray's state API."""
        nodes = {n["node_id"]: n["node_ip"] for n in self.cluster.alive_nodes()}
        found: dict[str, list[dict]] = {}
        for actor in self.cluster.state("actors", "state=ALIVE"):
            kind = actor["class_name"]
            if kind.startswith("ServeReplica:") or kind in ("ServeController", "ProxyActor"):
                found.setdefault(kind.rsplit(":", 1)[-1], []).append(
                    {"pid": actor["pid"], "node_ip": nodes.get(actor["node_id"])})
        return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, heavy_lock_for_module):
    root = Path(tempfile.mkdtemp(prefix="mcd-ray-", dir="/tmp"))  # short: Ray's socket paths live under it
    caches = tmp_path_factory.mktemp("node-caches")
    cluster = LocalRayCluster(root)
    try:
        cluster.start_head(HEAD_IP, num_cpus=1, resources={"mode_cotd_cpu": 100},
                           env={"MODE_COTD_CACHE": str(caches / "head")})
        cluster.add_worker("worker", WORKER_IP, num_cpus=2, resources={"student_node": 2},
                           env={"MODE_COTD_CACHE": str(caches / "worker")})
        cluster.wait_for_nodes(timeout_s=120)
        yield cluster
    finally:
        killed = cluster.stop()
        print(f"\ncluster stopped: SIGTERM to each `ray start`, then {len(killed)} leftover processes killed by PID")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def app(cluster, deploy_bundle, tiny_student, tmp_path_factory):
    started = time.monotonic()
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port(HEAD_IP)
    app = App(cluster, f"http://{HEAD_IP}:{port}", {}, tmp / "serve.yaml", 0.0)
    app.deploy(serve_config(deploy_bundle.resolve().as_uri(), str(tiny_student), port, str(tmp / "composites")))
    wait_healthy(app.base, STARTUP_TIMEOUT_S - (time.monotonic() - started))
    app.ready_s = time.monotonic() - started
    return app


def test_replicas_run_where_their_resources_are(app):
    placed = app.replicas()
    print(f"\napp up through `serve deploy` in {app.ready_s:.0f} s. Placement (Ray state API):")
    for name in ("ServeController", "ProxyActor", "ingress", "router", "student"):
        for replica in placed[name]:
            node = {HEAD_IP: "head", WORKER_IP: "worker"}[replica["node_ip"]]
            print(f"  {name:<16} {node:<6} {replica['node_ip']}  pid {replica['pid']}")
    assert [r["node_ip"] for r in placed["student"]] == [WORKER_IP]  # the only node offering student_node
    assert [r["node_ip"] for r in placed["ingress"] + placed["router"]] == [HEAD_IP] * 2  # only it has mode_cotd_cpu

    routes = {app.complete(model, **extra).model_extra["mode_cotd"]["route"] for model, extra in [
        ("mode-cotd", {}), ("mode-cotd:alpha", {}),
        ("mode-cotd", {"extra_body": {"mixture": {"alpha": 0.5, "beta": 0.5}}})]}
    assert routes == {"gate", "expert", "mixture"}
    fetched = {n.name: [p.name for p in (Path(n.env["MODE_COTD_CACHE"]) / "bundles").glob("*")]
               for n in app.cluster.nodes}
    assert len(fetched["worker"]) == 1, fetched  # the worker fetched the bundle URI into its own cache


def test_a_killed_student_replica_is_restored(app):
    before = app.complete("mode-cotd:beta").choices[0].text
    placed = app.replicas()
    (victim,) = [r["pid"] for r in placed["student"]]
    assert app.cluster.node_of_session(victim) is app.cluster.nodes[1], "not a process of this cluster's worker"
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    failures, errors = 0, set()
    while True:
        try:
            after = app.complete("mode-cotd:beta")
            break
        except (openai.APIError, httpx.HTTPError) as e:
            failures += 1
            errors.add(str(getattr(e, "status_code", None) or type(e).__name__))
        assert time.monotonic() - killed_at < RECOVERY_TIMEOUT_S, f"no recovery in {RECOVERY_TIMEOUT_S} s"
        time.sleep(0.5)
    recovery_s = time.monotonic() - killed_at

    restored = app.replicas()
    (new,) = restored["student"]
    print(f"\nSIGKILL to the student replica (pid {victim}, worker node): requests failed for {recovery_s:.1f} s "
          f"({failures} failed attempts, errors {sorted(errors)}); then served again by a new replica, pid "
          f"{new['pid']} on {new['node_ip']}")
    assert failures > 0  # the kill did take the only student down
    assert new["pid"] != victim and new["node_ip"] == WORKER_IP
    assert restored["ingress"] == placed["ingress"] and restored["router"] == placed["router"]  # only it was replaced
    assert after.choices[0].text == before  # same weights, greedy decoding: the same answer
    assert httpx.get(f"{app.base}/health", timeout=5).status_code == 200


def test_a_new_bundle_rolls_out_in_place(app, deploy_bundle, tmp_path):
    """`serve deploy` with a new bundle URI while requests flow. Every deployment rolls with a surge replica;
    a new student counts as ready to Serve only once its vLLM engine is loaded (StudentDeployment's
    constructor waits for it), so Serve stops the old one only then: no request fails."""
    bundle_v2 = shutil.copytree(deploy_bundle, tmp_path / "bundle-v2")
    add_composition(bundle_v2, "rolled_out", {"alpha": 0.25, "gamma": 0.75}, "exact", "task_rolled_out")
    old_students = {r["pid"] for r in app.replicas()["student"]}

    outcomes: list[tuple[float, str]] = []
    stop = threading.Event()

    def traffic():
        client = app.client
        while not stop.is_set():
            try:
                out = client.completions.create(model="mode-cotd:alpha", prompt=PROMPT, max_tokens=4, temperature=0)
                outcomes.append((time.monotonic(), out.model_extra["mode_cotd"]["route"]))
            except (openai.APIError, httpx.HTTPError) as e:
                outcomes.append((time.monotonic(), f"ERROR {getattr(e, 'status_code', '')} {getattr(e, 'code', '')}"))
            time.sleep(0.2)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    config = yaml.safe_load(yaml.safe_dump(app.config))
    config["applications"][0]["args"]["bundle"] = bundle_v2.resolve().as_uri()
    started = time.monotonic()
    try:
        app.deploy(config)  # an in-place update: same cluster, new args -> every deployment rolls
        while True:
            models = [m.id for m in app.client.models.list().data]
            students = {r["pid"] for r in app.replicas().get("student", [])}
            if "mode-cotd:rolled_out" in models and students and not students & old_students:
                break
            assert time.monotonic() - started < STARTUP_TIMEOUT_S, "the new bundle did not roll out"
            time.sleep(1)
        rollout_s = time.monotonic() - started
        time.sleep(2)
    finally:
        stop.set()
        sender.join(60)
    failed = [o for o in outcomes if o[1].startswith("ERROR")]
    window = failed[-1][0] - failed[0][0] if failed else 0.0
    print(f"\nrolled out a new bundle in {rollout_s:.0f} s (serve deploy with a new bundle URI); "
          f"{len(outcomes)} requests sent meanwhile, {len(failed)} failed, all within {window:.1f} s: "
          f"{sorted({o[1] for o in failed})}")
    assert outcomes and not failed, failed[:3]
    assert app.complete("mode-cotd:rolled_out").model_extra["mode_cotd"]["route"] == "composition"

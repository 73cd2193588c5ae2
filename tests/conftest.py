"""Shared fixtures: the shared data folder and a tiny student built in code."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mode_cotd import paths


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared MoDE-CoTD data; tests that need it skip with a reason when it is absent."""
    d = paths.data_dir()
    if not d.is_dir():
        pytest.skip(f"shared data not found at {d} (set MODE_COTD_DATA)")
    return d


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> Path:
    """A tiny random Llama student (2 layers, hidden 64) saved as an HF folder."""
    from mode_cotd.tiny import build_tiny_student

    return build_tiny_student(tmp_path_factory.mktemp("tiny-student"))


HEAVY_LOCK = Path(os.environ.get("MODE_COTD_HEAVY_LOCK", "/tmp/heavy.lock"))
"""Held by tests that start vLLM, Ray or the real student, so such runs never overlap on a small machine.
MODE_COTD_HEAVY_LOCK names another file (e.g. for a second checkout that must not queue behind the first)."""


def _lock_held_by_an_ancestor(path: Path) -> bool:
    """True when a process above this one (e.g. `flock /tmp/heavy.lock pytest`) holds the lock."""
    inode, ancestors, pid = os.stat(path).st_ino, set(), os.getpid()
    while pid > 1:
        ancestors.add(pid)
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" not in fields and "FLOCK" in fields and int(fields[4]) in ancestors and int(fields[5].split(":")[2]) == inode:
            return True
    return False


@contextlib.contextmanager
def hold_heavy_lock():
    """Hold HEAVY_LOCK (heavy runs never overlap), unless a parent process already holds it."""
    HEAVY_LOCK.touch(exist_ok=True)
    with HEAVY_LOCK.open("a") as f:
        if not _lock_held_by_an_ancestor(HEAVY_LOCK):
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


@pytest.fixture
def heavy_lock():
    """hold_heavy_lock() for one test."""
    with hold_heavy_lock():
        yield


@pytest.fixture(scope="module")
def heavy_lock_for_module():
    """hold_heavy_lock() for a whole module (one Ray app or server serves all its tests)."""
    with hold_heavy_lock():
        yield


def wait_healthy(base: str, timeout_s: float, alive: Callable[[], None] = lambda: None) -> float:
    """Poll `{base}/health` until it answers 200; the seconds it took. `alive()` raises when the server
    died (so a crash fails at once, not after the timeout); `timeout_s` without a 200 fails the test."""
    import httpx

    started = time.monotonic()
    while True:
        alive()
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        assert time.monotonic() - started < timeout_s, f"{base} was not healthy within {timeout_s:.0f} s"
        time.sleep(1)


@pytest.fixture
def until_healthy() -> Callable[..., float]:
    """wait_healthy, for tests and fixtures that start a server."""
    return wait_healthy

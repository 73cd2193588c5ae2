"""Deploy fixtures: the tiny bundle and fake engine of tests/serving, and the repository's deploy/ folder."""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest

from mode_cotd import paths

DEPLOY = paths.REPO_ROOT / "deploy"


def _load(relative: str, name: str):
    """A conftest of tests/ as a plain module (for its helpers, not its fixtures), loaded by path."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


serving_fixtures = _load("serving/conftest.py", "_mode_cotd_serving_fixtures")
FakeEngine = serving_fixtures.FakeEngine
wait_healthy = _load("conftest.py", "_mode_cotd_root_fixtures").wait_healthy


@pytest.fixture(scope="session")
def deploy_bundle(tiny_student, tmp_path_factory) -> Path:
    """3 tiny experts, 2 compositions and a gate over the tiny student (as in tests/serving)."""
    return serving_fixtures.build_tiny_bundle(tmp_path_factory.mktemp("deploy-bundle") / "tiny", tiny_student)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]

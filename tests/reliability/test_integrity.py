"""Integrity: kill -9 a process while it writes adapters, composites, bundles, reports and checkpoints,
then show that nothing torn is ever loaded as valid (tests/reliability/writers.py is the victim).

After each kill every artifact is either whole (one version throughout, checksums right) or
refused by its loader with a clear error; never half old and half new, never truncated.
CI kills the writer a few times; the manual run kills it many times and prints the counts.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mode_cotd import paths
from mode_cotd.adapter import load_adapter
from mode_cotd.bundle import load_bundle
from mode_cotd.errors import BundleError, DataError
from mode_cotd.mixing import compose_exact
from mode_cotd.mixture import Mixture
from serving.adapter_cache import _FOLDER, AdapterCache
from serving.protocol import AdapterSpec
from training.checkpoint import latest_checkpoint, read_state

WRITER = Path(__file__).with_name("writers.py")


def uniform_value(tensors) -> float:
    """The one value every tensor holds; AssertionError for a torn artifact."""
    values = {float(v) for t in tensors for v in torch.unique(t)}
    assert len(values) == 1, f"torn: {sorted(values)[:5]}"
    return values.pop()


def check_everything(folder: Path) -> Counter:
    """Load every artifact as the real loaders do; count whole / refused / absent per kind."""
    seen: Counter = Counter()

    try:  # a plain adapter folder
        adapter = load_adapter(folder / "adapter")
        uniform_value(adapter.weights.values())
        seen["adapter whole"] += 1
    except BundleError:
        seen["adapter refused"] += 1

    import writers  # the experts and the mixture grid the writer uses

    experts = writers.experts(folder)
    cache = AdapterCache(experts, folder / "composites", max_lora_rank=2 * writers.RANK, max_entries=4)
    specs = {cache.key(s): s for s in (AdapterSpec(Mixture(("one", "two"), ((k + 1) / 8, 1 - (k + 1) / 8)))
                                       for k in range(7))}
    loaded = [load_adapter(p) for p in experts.values()]
    for entry in sorted(p for p in (folder / "composites").iterdir() if _FOLDER.fullmatch(p.name)):
        if cache._valid(entry):  # what the cache would serve
            spec = specs[entry.name]
            expected = compose_exact(loaded, list(spec.mixture.weights))
            served = load_adapter(entry)
            for key, tensor in expected.weights.items():
                torch.testing.assert_close(served.weights[key], tensor, rtol=0, atol=0)
            seen["composite whole"] += 1
        else:
            seen["composite refused (rebuilt on use)"] += 1

    try:  # the bundle: manifest checksums, expert folder and its report must agree
        bundle = load_bundle(folder / "bundle", strict=True)
        if "e" in bundle.experts:
            version = json.loads((folder / "bundle" / "experts" / "e" / "report.json").read_text())["version"]
            assert uniform_value(bundle.experts["e"].load().weights.values()) == version
            seen["bundle whole"] += 1
        else:
            seen["bundle without the expert yet"] += 1
    except BundleError:
        seen["bundle refused"] += 1

    report = folder / "report.json"
    if report.exists():
        data = json.loads(report.read_text())
        assert set(data["values"]) == {data["version"]}
        seen["report whole"] += 1

    checkpoint = latest_checkpoint(folder / "checkpoints")
    if checkpoint is not None:
        try:
            state = read_state(checkpoint)
            assert uniform_value(load_file(checkpoint / "trainable.safetensors").values()) == state.step
            load_file(checkpoint / "optimizer.safetensors")
            seen["checkpoint whole"] += 1
        except DataError:
            seen["checkpoint refused"] += 1
    return seen


def kill_writers(folder: Path, kills: int, seed: int) -> tuple[Counter, Counter]:
    """Start the writer `kills` times and SIGKILL it at a random moment; check everything after each kill."""
    rng = random.Random(seed)
    interrupted: Counter = Counter()
    outcomes: Counter = Counter()
    env = {**os.environ, "PYTHONPATH": f"{paths.REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for i in range(kills):
        proc = subprocess.Popen([sys.executable, str(WRITER), str(folder), str(seed * 100 + i)],
                                stdout=subprocess.PIPE, text=True, cwd=paths.REPO_ROOT, env=env)
        assert proc.stdout.readline().strip() == "ready", "the writer did not start"
        time.sleep(rng.uniform(0.05, 1.5))
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        lines = proc.stdout.read().split("\n")
        proc.stdout.close()
        last = [line for line in lines if line.startswith(("begin", "end"))]
        if last and last[-1].startswith("begin"):
            interrupted[last[-1].split()[1]] += 1
        else:
            interrupted["between writes"] += 1
        outcomes.update(check_everything(folder))
    return interrupted, outcomes


@pytest.fixture(autouse=True)
def writers_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(WRITER.parent))


@pytest.mark.slow
def test_kill_9_mid_write_never_leaves_a_loadable_torn_artifact(tmp_path):
    interrupted, outcomes = kill_writers(tmp_path, kills=3, seed=1)
    print(dict(interrupted), dict(outcomes))
    assert sum(outcomes.values()) >= 3 * 5  # every kind checked after every kill (mid-write kills: printed)


@pytest.mark.manual
def test_kill_9_mid_write_many_times(tmp_path):
    kills = int(os.environ.get("MODE_COTD_KILLS", "40"))
    interrupted, outcomes = kill_writers(tmp_path, kills=kills, seed=int(os.environ.get("MODE_COTD_KILL_SEED", "2")))
    report = {"kills": kills, "interrupted_mid_write": dict(interrupted), "after_each_kill": dict(outcomes)}
    Path(os.environ.get("MODE_COTD_KILL_REPORT", "/tmp/mode-cotd-kill-writers.json")).write_text(
        json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))

"""The many-experts table's pieces: its cached synthetic bundles, its mixtures, its memory reading."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from benchmarks.experts_table import cached_bundle, distinct_mixtures, expert_names, tree_pss_bytes
from mode_cotd.bundle import load_bundle


def test_the_synthetic_bundle_is_built_once_and_reused(tiny_student, tmp_path):
    said = []
    first = cached_bundle(tmp_path, tiny_student, 5, 4, said.append)
    again = cached_bundle(tmp_path, tiny_student, 5, 4, said.append)
    assert first == again == tmp_path / "synthetic-5-r4" and len(said) == 1
    bundle = load_bundle(first, student=tiny_student, strict=True)
    assert sorted(bundle.experts) == expert_names(5) == ["expert-0000", "expert-0001", "expert-0002",
                                                         "expert-0003", "expert-0004"]
    assert not [p for p in tmp_path.iterdir() if p.name != "synthetic-5-r4"]  # no staging folder left behind


def test_mixtures_are_distinct_top_k_on_the_grid_and_seeded():
    experts = expert_names(1000)
    mixtures = distinct_mixtures(experts, 2, 0.05, 64, seed=3)
    assert len({tuple(sorted(m.items())) for m in mixtures}) == 64
    for m in mixtures:
        assert len(m) == 2 and set(m) <= set(experts) and abs(sum(m.values()) - 1) < 1e-9
        assert all(round(w / 0.05) * 0.05 == w or abs(round(w / 0.05) * 0.05 - w) < 1e-9 for w in m.values())
    assert distinct_mixtures(experts, 2, 0.05, 64, seed=3) == mixtures != distinct_mixtures(experts, 2, 0.05, 64, 4)


def test_the_memory_of_a_process_tree_counts_the_children():
    child = subprocess.Popen([sys.executable, "-c", "b = bytearray(200 * 2**20); import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while tree_pss_bytes(child.pid) < 150 * 2**20:  # the child has touched its 200 MiB
            assert time.monotonic() < deadline
            time.sleep(0.2)
        own = psutil.Process().memory_full_info().pss
        assert tree_pss_bytes(os.getpid()) - own >= 150 * 2**20
    finally:
        child.kill()
        child.wait()
    assert tree_pss_bytes(child.pid) == 0  # gone: nothing to count

"""A process that writes every kind of artifact over and over, to be killed (SIGKILL) mid-write.

    python tests/reliability/writers.py <folder> <seed>

Round robin, forever: an adapter folder (save_adapter), a composite in the adapter cache
(AdapterCache build + checksums), a bundle expert (add_expert: folder, then manifest), a
report (write_json_atomic) and a training checkpoint (save_checkpoint). Version v is
written into every tensor value and every JSON field, so a reader can tell a whole
artifact (one v throughout) from a torn one. Before and after each write it prints
`begin <kind> <v>` / `end <kind> <v>` (flushed), so the killer knows what it interrupted.
"""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

import torch

from mode_cotd.adapter import adapter_from_modules, save_adapter
from mode_cotd.atomic import write_json_atomic
from mode_cotd.bundle import add_expert, create_bundle
from mode_cotd.mixture import Mixture
from serving.adapter_cache import AdapterCache
from serving.protocol import AdapterSpec
from training.checkpoint import TrainingState, save_checkpoint

KINDS = ("adapter", "composite", "bundle", "report", "checkpoint")
MODULES = 6
RANK = 16
WIDTH = 2048  # one adapter: 6 modules x (A [16, 2048] + B [2048, 16]) float32 = 1.5 MiB
STUDENT = {"name": "writer-test", "config_sha256": "0" * 64}


def adapter(v: float):
    """Every value of every tensor is v."""
    modules = {f"base_model.model.model.layers.{i}.self_attn.q_proj": (torch.full((RANK, WIDTH), v),
                                                                       torch.full((WIDTH, RANK), v))
               for i in range(MODULES)}
    return adapter_from_modules(modules, RANK, 2 * RANK)


def experts(folder: Path) -> dict[str, Path]:
    return {name: folder / "experts" / name for name in ("one", "two")}


def prepare(folder: Path) -> None:
    """The parts that are only read: two experts for the composites, an empty bundle."""
    for i, path in enumerate(experts(folder).values(), start=1):
        if not path.exists():
            save_adapter(adapter(float(i)), path)
    if not (folder / "bundle" / "manifest.json").exists():
        create_bundle(folder / "bundle", STUDENT)


def write(kind: str, v: int, folder: Path, cache: AdapterCache) -> None:
    if kind == "adapter":
        save_adapter(adapter(float(v)), folder / "adapter")
    elif kind == "composite":
        w = (v % 7 + 1) / 8  # a new mixture (a new folder) each time, up to the cache's limit
        spec = AdapterSpec(Mixture(("one", "two"), (w, 1 - w)))
        asyncio.run(cache._prepare(cache.key(spec), spec))
    elif kind == "bundle":
        add_expert(folder / "bundle", "e", adapter(float(v)), task="t", report={"version": v})
    elif kind == "report":
        write_json_atomic(folder / "report.json", {"version": v, "values": [v] * 200_000})
    elif kind == "checkpoint":
        param = torch.nn.Parameter(torch.full((512, 512), float(v)))
        optimizer = torch.optim.AdamW([param])
        param.grad = torch.ones_like(param)
        optimizer.step()
        with torch.no_grad():
            param.fill_(float(v))
        save_checkpoint(folder / "checkpoints", TrainingState(step=v, fingerprint="f", loss_curve=[float(v)] * 1000),
                        {"w": param}, optimizer)


def main(folder: Path, seed: int) -> None:
    prepare(folder)
    cache = AdapterCache(experts(folder), folder / "composites", max_lora_rank=2 * RANK, max_entries=4)
    rng = random.Random(seed)
    v = seed * 10_000  # versions stay exact in float32 (< 2**24) for seeds below ~1,600
    for kind in KINDS:  # each kind once, unkilled: later kills then interrupt replacements too
        v += 1
        write(kind, v, folder, cache)
    print("ready", flush=True)
    while True:
        kind = rng.choice(KINDS)
        v += 1
        print(f"begin {kind} {v}", flush=True)
        write(kind, v, folder, cache)
        print(f"end {kind} {v}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))

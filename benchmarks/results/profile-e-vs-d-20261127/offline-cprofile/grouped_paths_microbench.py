"""grouped_lora_linear's two paths for several adapters in one step, at SmolLM2's shapes (float32, 1 thread):
the per-group loop (batched=None) against the batched layout (segments.batch_groups). Run from the repository root:

    .venv/bin/python benchmarks/results/profile-e-vs-d-20261127/offline-cprofile/grouped_paths_microbench.py
"""

import functools
import time

import torch

from serving.fast_lora.ops import grouped_lora_linear
from serving.fast_lora.segments import batch_groups, group_rows

SLOTS, RANK, HIDDEN = 10, 8, 576


def time_call(fn, repeats: int = 300) -> float:
    """Mean microseconds of fn() after 20 warm-up calls."""
    for _ in range(20):
        fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats * 1e6


def main() -> None:
    torch.set_num_threads(1)
    for slices in [(576, 192, 192), (1536, 1536), (576,)]:  # qkv, gate/up, o
        for groups_n, per_group in [(8, 2), (8, 16), (4, 4)]:
            rows = groups_n * per_group
            indices = (torch.arange(rows) // per_group)[torch.randperm(rows)]  # [T] slot per row, scattered
            groups = group_rows(indices)
            batched = batch_groups(groups, rows)
            a = tuple(torch.randn(SLOTS, 1, RANK, HIDDEN) for _ in slices)  # [S, 1, R, H]
            b = tuple(torch.randn(SLOTS, 1, n, RANK) for n in slices)  # [S, 1, n, R]
            x, y = torch.randn(rows, HIDDEN), torch.zeros(rows, sum(slices))
            args = (y, x, a, b, groups, 1.0, slices, torch.float32)
            result = {name: time_call(functools.partial(grouped_lora_linear, *args, layout))
                      for name, layout in [("loop", None), ("batched", batched)]}
            print(slices, f"G={groups_n} rows/group={per_group}", {k: f"{v:.0f} us" for k, v in result.items()},
                  "batched" if batched is not None else "(no batched layout)")


if __name__ == "__main__":
    main()

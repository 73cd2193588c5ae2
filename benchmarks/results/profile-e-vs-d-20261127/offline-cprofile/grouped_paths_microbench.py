import time, torch
from serving.fast_lora.ops import grouped_lora_linear
from serving.fast_lora.segments import group_rows, batch_groups
torch.set_num_threads(1)
S, R, H = 10, 8, 576
for slices in [(576, 192, 192), (1536, 1536), (576,)]:
  for G, per in [(8, 2), (8, 16), (4, 4)]:
    T = G * per
    idx = torch.arange(T) // per  # G groups, contiguous
    idx = idx[torch.randperm(T)]   # scattered like a real batch
    groups = group_rows(idx); bt = batch_groups(groups, T)
    a = tuple(torch.randn(S, 1, R, H) for _ in slices); b = tuple(torch.randn(S, 1, n, R) for n in slices)
    x = torch.randn(T, H); y = torch.zeros(T, sum(slices))
    res = {}
    for name, batched in [("loop", None), ("batched", bt)]:
        for _ in range(20): grouped_lora_linear(y, x, a, b, groups, 1.0, slices, torch.float32, batched)
        t = time.perf_counter(); n = 300
        for _ in range(n): grouped_lora_linear(y, x, a, b, groups, 1.0, slices, torch.float32, batched)
        res[name] = (time.perf_counter() - t) / n * 1e6
    print(slices, f"G={G} rows/group={per}", {k: f"{v:.0f} us" for k, v in res.items()}, "batched" if bt is not None else "(no batched layout)")

"""Slot weights gathered from vLLM's stacked LoRA tensors, kept for the next steps while they still hold.

The pair op (serving.fast_lora.ops.pair_lora_linear) gathers, in every layer slice, the blocks of the slots a
step uses: `[G, r, H]` and `[G, n, r]` for its batch, the blocks of a mixture run side by side. A decode step
usually uses the slots its predecessor used, so the same gathers come back step after step; this cache keeps
them. An entry is valid while its stacked tensor is the same object with the same version counter: vLLM writes
a slot in place when it loads or evicts an adapter, which bumps the counter (views share it), so a changed slot
is never read from the cache.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch

DEFAULT_MAX_BYTES = 256 * 2**20
"""What a wrapper's cache may hold: the gathers of ~25 rank-8 experts in every layer of the 135M student (fp32)."""


class GatherCache:
    """Gathers of stacked LoRA tensors by (tensor, key); least recently used entries go past `max_bytes`."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        """Bytes of gathered tensors the cache holds at most (0: keep nothing)."""
        self.entries: OrderedDict[tuple[int, tuple], tuple[weakref.ref, int, torch.Tensor]] = OrderedDict()
        """(data_ptr of the stacked tensor, key) -> (the tensor, its version then, the gathered tensor)."""
        self.bytes = 0
        """Bytes held now."""

    def get(self, stacked: torch.Tensor, key: tuple, gather: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`gather()` of `stacked` for `key` (what the gather depends on besides the tensor: slots, ranks), from the
        cache when the same tensor, unchanged since, was gathered for the same key."""
        where = (stacked.data_ptr(), key)
        entry = self.entries.get(where)
        if entry is not None and entry[0]() is stacked and entry[1] == stacked._version:
            self.entries.move_to_end(where)
            return entry[2]
        value = gather()
        if entry is not None:
            self.bytes -= _nbytes(entry[2])
        self.entries[where] = (weakref.ref(stacked), stacked._version, value)
        self.entries.move_to_end(where)
        self.bytes += _nbytes(value)
        while self.bytes > self.max_bytes and self.entries:
            _, (_, _, old) = self.entries.popitem(last=False)
            self.bytes -= _nbytes(old)
        return value


def cached(cache: GatherCache | None, stacked: torch.Tensor, key: tuple,
           gather: Callable[[], torch.Tensor]) -> torch.Tensor:
    """cache.get(...), or just `gather()` without a cache."""
    return gather() if cache is None else cache.get(stacked, key, gather)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()

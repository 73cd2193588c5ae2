"""The grouped wrapper's in-model entry points as torch custom ops, so that a compiled model can call them.

vLLM's CPU platform turns compilation off whenever LoRA is on. `FastLoraCpuPlatform` can keep it on
(`engine.compile`): Dynamo then traces the model once (vLLM's DYNAMO_TRACE_ONCE, no guards) and
Inductor compiles it. Dynamo must not trace into the wrapper: its grouping of rows by adapter is
Python data that changes every step, and a trace would bake one step's groups into the graph. As
custom ops, the wrapper's `add_lora_linear` and `add_lora_embedding` are opaque to Dynamo and
Inductor, which call them as external kernels; at run time each looks its wrapper up here and runs
the wrapper's eager code on the step's current metadata. (`add_lora_logits` runs outside the
compiled forward, in vLLM's compute_logits, and needs no op.)

Each op mutates `y` in place and returns nothing; its fake (meta) implementation does nothing.

The ops are defined on a plain `torch.library.Library` with one CPU kernel each (as vLLM registers its own,
vllm.utils.torch_utils.direct_register_custom_op), not with `torch.library.custom_op`: that one's Python
layers (autograd, in-place version bumps, redispatch) cost ~35 µs a call here, ~4 ms of every step of the
student (120 calls), the student route's steps included; the dispatcher's own kernels do the same in C++.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch

_wrappers: dict[int, weakref.ref] = {}
_next_key = itertools.count(1)


def register(wrapper: Any) -> int:
    """A key for `wrapper` that the ops take (an int: it goes into the traced graph as a constant)."""
    key = next(_next_key)
    _wrappers[key] = weakref.ref(wrapper, lambda _, key=key: _wrappers.pop(key, None))
    return key


def _wrapper(key: int) -> Any:
    ref = _wrappers.get(key)
    wrapper = ref() if ref is not None else None
    if wrapper is None:
        raise RuntimeError(f"mode-cotd LoRA op: no live punica wrapper under key {key} in this process")
    return wrapper


_LIBRARY = torch.library.Library("mode_cotd", "FRAGMENT")
"""Owns the ops: they live as long as this module."""


def _define(kernel: Any, mutates_args: tuple[str, ...]) -> None:
    """Define mode_cotd::<kernel name> with the schema of the kernel's signature, `kernel` as its CPU kernel and a
    fake kernel that does nothing (the op returns nothing)."""
    name = kernel.__name__
    _LIBRARY.define(name + torch.library.infer_schema(kernel, mutates_args=mutates_args))
    _LIBRARY.impl(name, kernel, "CPU")
    torch.library.register_fake(f"mode_cotd::{name}", lambda *args: None, lib=_LIBRARY)


def lora_linear(y: torch.Tensor, x: torch.Tensor, lora_a: list[torch.Tensor], lora_b: list[torch.Tensor],
                scale: float, output_slices: list[int], wrapper: int) -> None:
    """PunicaWrapperGrouped.add_lora_linear of wrapper `wrapper`: y `[T, Σnᵢ]` += the step's LoRA of x `[T, H]`."""
    _wrapper(wrapper).eager_lora_linear(y, x, tuple(lora_a), tuple(lora_b), scale, tuple(output_slices))


def lora_embedding(y: torch.Tensor, x: torch.Tensor, lora_b: torch.Tensor, add_inputs: bool, wrapper: int) -> None:
    """PunicaWrapperGrouped.add_lora_embedding of wrapper `wrapper`: y `[T, D]` (+)= x `[T, R]` @ B[s]ᵀ per row."""
    _wrapper(wrapper).eager_lora_embedding(y, x, lora_b, add_inputs)


_define(lora_linear, ("y",))
_define(lora_embedding, ("y",))

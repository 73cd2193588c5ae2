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


@torch.library.custom_op("mode_cotd::lora_linear", mutates_args=("y",))
def lora_linear(y: torch.Tensor, x: torch.Tensor, lora_a: list[torch.Tensor], lora_b: list[torch.Tensor],
                scale: float, output_slices: list[int], wrapper: int) -> None:
    """PunicaWrapperGrouped.add_lora_linear of wrapper `wrapper`: y `[T, Σnᵢ]` += the step's LoRA of x `[T, H]`."""
    _wrapper(wrapper).eager_lora_linear(y, x, tuple(lora_a), tuple(lora_b), scale, tuple(output_slices))


@lora_linear.register_fake
def _lora_linear_fake(y, x, lora_a, lora_b, scale, output_slices, wrapper) -> None:
    return None


@torch.library.custom_op("mode_cotd::lora_embedding", mutates_args=("y",))
def lora_embedding(y: torch.Tensor, x: torch.Tensor, lora_b: torch.Tensor, add_inputs: bool, wrapper: int) -> None:
    """PunicaWrapperGrouped.add_lora_embedding of wrapper `wrapper`: y `[T, D]` (+)= x `[T, R]` @ B[s]ᵀ per row."""
    _wrapper(wrapper).eager_lora_embedding(y, x, lora_b, add_inputs)


@lora_embedding.register_fake
def _lora_embedding_fake(y, x, lora_b, add_inputs, wrapper) -> None:
    return None

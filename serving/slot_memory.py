"""The memory vLLM's LoRA slots take, checked before the engine allocates them.

vLLM gives every LoRA slot (`max_loras` of them: the route table's own plus one per pinned expert of the
mixture union) a full-size tensor per LoRA layer, sized at `max_lora_rank`, whatever the rank of the adapter
it holds:

    bytes per slot ≈ max_lora_rank · (layers · Σ_linear (in + out) + vocab) · bytes of the dtype

(the vocab term: the lm_head/embedding LoRA buffers). For SmolLM2-135M at rank 16 in float32 that is ~23 MB,
as docs/performance.md measured. vLLM's LoRA manager also keeps every loaded adapter's own tensors in its host
cache, beside the slot it copies them into; on the CPU platform both are host memory, so each pinned expert
costs a slot plus

    bytes per adapter ≈ rank · layers · Σ_linear (in + out) · bytes of the dtype

(measured: 22.3 MiB per rank-8 expert in float32 between unions of 10 and 100 experts, against 10.8 + 9.3 MiB
estimated; benchmarks/results/many-experts-20261206/). A union of a thousand experts pins a thousand slots;
when they cannot fit in the memory left, the engine would die mid-start with the OS's OOM killer, so the
serving side refuses first, with the numbers.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mode_cotd.architecture import architecture_of, read_config
from mode_cotd.compute_dtype import student_dtype
from mode_cotd.errors import ConfigError

logger = logging.getLogger(__name__)

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per LoRA weight by the engine's dtype (vLLM's lora_dtype follows the model's)."""
SLOT_MEMORY_SHARE = 0.8
"""The slots may take at most this share of the memory available when the engine starts."""


def _shape(student: Path, dtype: str) -> tuple[int, int, int] | None:
    """(layers · Σ_linear (in + out), vocab, bytes per weight) of `student` in `dtype`; None when not known."""
    if dtype == "auto":  # vLLM takes the student's own dtype (float32 when its config names none)
        dtype = student_dtype(student) or "float32"
    try:
        arch = architecture_of(student)
        config, _ = read_config(student)
    except ConfigError:
        return None
    vocab = config.get("vocab_size")
    if dtype not in DTYPE_BYTES or not isinstance(vocab, int):
        return None
    return arch.num_hidden_layers * sum(i + o for i, o in arch.linear_modules.values()), vocab, DTYPE_BYTES[dtype]


def slot_bytes(student: Path, max_lora_rank: int, dtype: str) -> int | None:
    """Estimated bytes of one LoRA slot of `student` (the formula above); None for an architecture or dtype this
    module does not know."""
    shape = _shape(student, dtype)
    return None if shape is None else max_lora_rank * (shape[0] + shape[1]) * shape[2]


def adapter_bytes(student: Path, rank: int, dtype: str) -> int | None:
    """Estimated bytes of one adapter of rank `rank` on every linear module of `student` (an upper bound for
    adapters on fewer modules); None when not known."""
    shape = _shape(student, dtype)
    return None if shape is None else rank * shape[0] * shape[2]


def check_slot_memory(slots: int, pinned: int, per_slot: int | None, available: int,
                      per_pinned_copy: int = 0) -> None:
    """ConfigError when `slots` slots of `per_slot` bytes, plus the host copies of the `pinned` experts
    (`per_pinned_copy` bytes each), would take over SLOT_MEMORY_SHARE of `available` bytes; logs the estimate
    otherwise."""
    if per_slot is None:
        return
    need = slots * per_slot + pinned * per_pinned_copy
    logger.info("LoRA memory: %d slots x %.1f MiB + %d pinned host copies x %.1f MiB = %.2f GiB, %.2f GiB available",
                slots, per_slot / 2**20, pinned, per_pinned_copy / 2**20, need / 2**30, available / 2**30)
    if need > SLOT_MEMORY_SHARE * available:
        raise ConfigError(
            f"the engine's {slots} LoRA slots ({pinned} pinned experts of the mixture union + the route table's "
            f"own) need ~{need / 2**30:.1f} GiB ({per_slot / 2**20:.1f} MiB each at max_lora_rank and the engine's "
            f"dtype, plus {per_pinned_copy / 2**20:.1f} MiB per pinned expert for vLLM's host copy), over "
            f"{SLOT_MEMORY_SHARE:.0%} of the {available / 2**30:.1f} GiB available: keep fewer experts in slots "
            "(--engine-resident-experts K: the others paged in on demand), serve a bundle with fewer experts, "
            "lower engine.max_lora_rank or engine.max_loras, use bfloat16, or turn the union off "
            "(--no-engine-mixture-union: mixtures as composites, experts loaded on demand)")

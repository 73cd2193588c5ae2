"""The dtype the student runs in when the user asked for "auto".

vLLM's "auto" is the student's own dtype: bfloat16 for SmolLM2. On a CPU without bf16 arithmetic
(oneDNN then emulates it; this project's 2-core AMD EPYC with AVX2 is one) bfloat16 is the slow
choice: the same `mode-cotd serve`, same prompts, ran at 9.6 output tok/s in bfloat16 and 28.4 in
float32 (TTFT p50 44 s against 11 s; `docs/performance.md`). There "auto" means float32. On a GPU,
or a CPU with AVX512-BF16 / AMX, "auto" stays the student's dtype. An explicit dtype is never changed.
"""

from __future__ import annotations

import json
from pathlib import Path

HALF_DTYPES = ("bfloat16", "float16")


def student_dtype(student: Path) -> str | None:
    """The dtype in the student's config.json (`dtype`, or the older `torch_dtype`), if any."""
    config = Path(student) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text())
    value = data.get("dtype") or data.get("torch_dtype")
    return str(value) if value else None


def cpu_has_bf16_arithmetic() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16, AMX, or AVX-512 it accepts for bf16)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without oneDNN: no native bf16 either
        return False


def runs_on_cpu() -> bool:
    """Whether vLLM will run on the CPU here: no CUDA device is visible to torch."""
    import torch

    return not torch.cuda.is_available()


def resolve_dtype(setting: str, student: Path, on_cpu: bool | None = None, cpu_bf16: bool | None = None) -> str:
    """`setting` as vLLM should get it: "auto" becomes "float32" for a half-precision student on a CPU
    without bf16 arithmetic; every other case returns `setting` unchanged (vLLM resolves "auto" itself).

    `on_cpu` and `cpu_bf16` default to what this machine says (`runs_on_cpu`, `cpu_has_bf16_arithmetic`).
    """
    if setting != "auto" or student_dtype(student) not in HALF_DTYPES:
        return setting
    if not (runs_on_cpu() if on_cpu is None else on_cpu):
        return setting
    if cpu_has_bf16_arithmetic() if cpu_bf16 is None else cpu_bf16:
        return setting
    return "float32"

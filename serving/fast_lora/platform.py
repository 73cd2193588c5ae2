"""`FastLoraCpuPlatform`: vLLM's CPU platform, with mode-cotd's grouped punica wrapper.

vLLM selects it through its platform-plugin seam (serving.fast_lora.plugin.register); it is
vLLM's CpuPlatform in every other respect. The switches are read at the moment vLLM asks, from
the engine's own config (`additional_config["mode_cotd"]`, plugin.engine_config) where there is
one, so two engines in one process may differ, and a process that resolved its platform early
(a Ray replica that imported vLLM) still follows its engine's settings.
"""

from __future__ import annotations

from typing import Any

from vllm.platforms.cpu import CpuPlatform

from serving.fast_lora import plugin

WRAPPER = "serving.fast_lora.wrapper.PunicaWrapperGrouped"
"""Qualname of the punica wrapper vLLM builds for each model."""


class FastLoraCpuPlatform(CpuPlatform):
    """vLLM's CPU platform; LoRA layers use serving.fast_lora.wrapper.PunicaWrapperGrouped."""

    @classmethod
    def get_punica_wrapper(cls) -> str:
        """The grouped wrapper, unless the engine being built (vLLM's current config) switched it off."""
        # vllm.config imports this platform, so vLLM's names are imported here, not at module top
        from vllm.config import get_current_vllm_config_or_none

        return WRAPPER if plugin.fast_lora_on(get_current_vllm_config_or_none()) else super().get_punica_wrapper()

    @classmethod
    def check_and_update_config(cls, vllm_config: Any) -> None:
        """vLLM's CPU config, except that with the compile switch on (plugin.compile_on) a LoRA engine is
        compiled as one without LoRA would be (vLLM's CPU platform turns compilation off with LoRA): Dynamo
        traces the model once, Inductor compiles it, and the wrapper's ops run as custom ops
        (serving.fast_lora.compiled_ops). `enforce_eager` still means eager."""
        from vllm.config import CompilationMode  # vllm.config imports this platform: not at module top

        wanted = vllm_config.compilation_config.mode
        super().check_and_update_config(vllm_config)
        if (vllm_config.lora_config is not None and plugin.fast_lora_on(vllm_config) and plugin.compile_on(vllm_config)
                and wanted == CompilationMode.VLLM_COMPILE
                and vllm_config.compilation_config.mode == CompilationMode.NONE):
            vllm_config.compilation_config.mode = CompilationMode.DYNAMO_TRACE_ONCE

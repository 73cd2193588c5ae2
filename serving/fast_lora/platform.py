"""`FastLoraCpuPlatform`: vLLM's CPU platform, with mode-cotd's grouped punica wrapper.

vLLM selects it through its platform-plugin seam (serving.fast_lora.plugin.register); it is
vLLM's CpuPlatform in every other respect. The switch (MODE_COTD_FAST_LORA) is read again
here, at the moment vLLM asks, so a process that resolved its platform before the switch was
set (a Ray replica that imported vLLM early) still follows it.
"""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform

from serving.fast_lora import plugin

WRAPPER = "serving.fast_lora.wrapper.PunicaWrapperGrouped"
"""Qualname of the punica wrapper vLLM builds for each model."""


class FastLoraCpuPlatform(CpuPlatform):
    """vLLM's CPU platform; LoRA layers use serving.fast_lora.wrapper.PunicaWrapperGrouped."""

    @classmethod
    def get_punica_wrapper(cls) -> str:
        return WRAPPER if plugin.enabled() else super().get_punica_wrapper()

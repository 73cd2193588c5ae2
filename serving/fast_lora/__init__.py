"""A fast multi-LoRA path for vLLM's CPU backend, plugged in through vLLM's platform-plugin seam.

    segments.py   a step's rows grouped by LoRA slot (computed once per step)
    ops.py        the grouped ops: one dense matmul pair per adapter slot in the step
    reference.py  plain per-row definitions of the ops, for tests
    wrapper.py    PunicaWrapperGrouped: vLLM's CPU punica wrapper with the grouped ops
    platform.py   FastLoraCpuPlatform: vLLM's CPU platform returning that wrapper
    plugin.py     the `vllm.platform_plugins` entry point, version check, off switch

Nothing here patches vLLM: vLLM asks its platform for a punica wrapper class, and the
platform plugin answers. Only plugin.py may be imported without vLLM installed.
"""

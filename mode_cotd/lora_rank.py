"""The LoRA rank an engine is sized for: the smallest `max_lora_rank` vLLM accepts that fits.

vLLM takes only the ranks of its `MaxLoRARanks` (1, 8, 16, 32, ... in vLLM 0.32). This module reads them
from vLLM when asked, inside the function: importing mode_cotd never imports vLLM, and only the callers
that start vLLM anyway (the serving engine, offline evaluation) call it.
"""

from __future__ import annotations

import typing


def supported_lora_rank(needed: int) -> int:
    """The smallest max_lora_rank vLLM accepts that is >= needed (vLLM takes only 1, 8, 16, 32, ...); the largest
    one when none is."""
    from vllm.config.lora import MaxLoRARanks

    ranks = sorted(typing.get_args(MaxLoRARanks))
    return next((r for r in ranks if r >= needed), ranks[-1])

"""The LoRA rank an engine is sized for: the smallest `max_lora_rank` the engine accepts that fits.

vLLM takes only the ranks of its `MaxLoRARanks` (1, 8, 16, 32, ... in vLLM 0.32). The callers that start vLLM
(the serving engine, offline evaluation) read those from vLLM and pass them in: mode_cotd never imports vLLM.
"""

from __future__ import annotations

from collections.abc import Iterable

from mode_cotd.errors import ConfigError


def supported_lora_rank(needed: int, accepted: Iterable[int]) -> int:
    """The smallest of the `accepted` ranks that is >= needed; the largest one when none is."""
    ranks = sorted(accepted)
    if not ranks:
        raise ConfigError("supported_lora_rank: the engine accepts no LoRA rank")
    return next((r for r in ranks if r >= needed), ranks[-1])

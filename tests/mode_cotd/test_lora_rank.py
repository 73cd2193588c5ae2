"""mode_cotd.lora_rank: the smallest accepted LoRA rank that fits."""

import pytest

from mode_cotd.errors import ConfigError
from mode_cotd.lora_rank import supported_lora_rank


@pytest.mark.parametrize(("needed", "expected"), [(1, 1), (2, 8), (8, 8), (9, 16), (24, 32), (80, 128), (200, 256), (999, 512)])
def test_the_smallest_accepted_rank_that_fits(needed, expected):
    assert supported_lora_rank(needed, (512, 1, 8, 16, 32, 64, 128, 256)) == expected


def test_no_accepted_rank_is_an_error():
    with pytest.raises(ConfigError, match="accepts no LoRA rank"):
        supported_lora_rank(8, ())


def test_vllm_ranks_reach_the_engine():
    pytest.importorskip("vllm")
    from serving.engine import vllm_lora_rank

    assert vllm_lora_rank(24) == 32 and vllm_lora_rank(8) == 8

"""LoRA slot memory: the estimate from the student's config, and a clear refusal before vLLM allocates too much."""

from __future__ import annotations

import json

import pytest

from mode_cotd.errors import ConfigError
from serving.slot_memory import adapter_bytes, check_slot_memory, slot_bytes

SMOLLM2_135M = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "torch_dtype": "bfloat16"}


@pytest.fixture()
def student(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_135M))
    return tmp_path


def test_one_slot_of_the_default_student_is_what_docs_measured(student):
    # per layer Σ(in + out) = 2·(576+576) + 2·(576+192) + 3·(576+1536) = 10176; rank 16, float32
    assert slot_bytes(student, 16, "float32") == 16 * (30 * 10176 + 49152) * 4  # 22.7 MB: docs say ~23
    assert slot_bytes(student, 16, "auto") == slot_bytes(student, 16, "bfloat16") == slot_bytes(student, 16,
                                                                                                "float32") // 2
    assert slot_bytes(student, 16, "int8") is None
    assert adapter_bytes(student, 8, "float32") == 8 * 30 * 10176 * 4  # 9.3 MiB: vLLM's host copy of an expert


def test_an_unknown_architecture_is_not_estimated(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**SMOLLM2_135M, "model_type": "mamba"}))
    assert slot_bytes(tmp_path, 16, "float32") is None
    check_slot_memory(10_000, 10_000, None, 1)  # no estimate: nothing refused


def test_a_thousand_pinned_experts_beyond_memory_are_refused_with_the_numbers(student):
    per_slot = slot_bytes(student, 16, "float32")
    with pytest.raises(ConfigError, match=r"1064 LoRA slots \(1000 pinned experts.*~22\.5 GiB.*21\.6 MiB each"):
        check_slot_memory(1064, 1000, per_slot, 24 * 2**30)
    check_slot_memory(1064, 1000, slot_bytes(student, 8, "bfloat16"), 24 * 2**30)  # 5.6 GiB: fits


def test_the_host_copies_of_pinned_experts_count_too(student):
    """Rank 8 in float32: 1064 slots take 11.2 GiB, which fits in 0.8 x 24 GiB; with vLLM's host copy of each of
    the 1000 pinned experts (9.3 MiB each) they take 20.3 GiB, which does not."""
    slot, copy = slot_bytes(student, 8, "float32"), adapter_bytes(student, 8, "float32")
    check_slot_memory(1064, 1000, slot, 24 * 2**30)
    with pytest.raises(ConfigError, match=r"~20\.3 GiB.*plus 9\.3 MiB per pinned expert"):
        check_slot_memory(1064, 1000, slot, 24 * 2**30, copy)

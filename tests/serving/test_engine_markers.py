"""The experts' end marker: passed to vLLM as a stop string, and kept in the text of the choice it ended."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from serving.engine import _kept_marker, sampling_params
from serving.protocol import SamplingSettings

SAMPLING = SamplingSettings(max_tokens=8, stop=("\n\n",), end_markers=(" END",))


def choice(finish_reason, stop_reason):
    return SimpleNamespace(finish_reason=finish_reason, stop_reason=stop_reason)


@pytest.mark.parametrize(
    "finish_reason, stop_reason, kept",
    [
        ("stop", " END", " END"),  # the marker ended it: the text keeps it, as evaluation does
        ("stop", "\n\n", ""),  # a user's stop string is dropped (OpenAI semantics)
        ("stop", 2, ""),  # eos (vLLM reports a token id)
        ("length", None, ""),
        (None, None, ""),  # not finished yet
    ],
)
def test_only_the_marker_that_ended_a_choice_is_kept(finish_reason, stop_reason, kept):
    assert _kept_marker(choice(finish_reason, stop_reason), SAMPLING) == kept


@pytest.mark.vllm
def test_vllm_stops_on_user_stops_and_markers():
    params = sampling_params(SAMPLING)
    assert params.stop == ["\n\n", " END"] and not params.include_stop_str_in_output
    assert sampling_params(SamplingSettings(max_tokens=8)).stop == []

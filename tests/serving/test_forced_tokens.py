"""Forced decoding scores the tokens it forces: the same log p as prompt logprobs, on a real vLLM engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from mode_cotd.adapter import save_adapter
from mode_cotd.tiny import random_adapter
from serving.forced_tokens import FORCED_TOKENS_KEY, ForcedTokens, force_token

TOLERANCE = 2e-3
"""Nats: float32, a prefill row against a decode step of the same position."""


def test_force_token_keeps_one_logit_and_masks_the_rest():
    import torch

    logits = torch.tensor([0.5, -1.0, 3.0, 2.0])  # [V]
    forced = force_token(logits.clone(), 1)
    assert forced[1] == -1.0 and torch.isinf(forced[[0, 2, 3]]).all() and int(forced.argmax()) == 1


@pytest.mark.parametrize("forced, max_tokens", [([], 1), ([1, -2], 2), ([1, "2"], 2), ("12", 2), ([1, 2], 3)])
def test_bad_forced_tokens_are_refused(forced, max_tokens):
    from vllm import SamplingParams

    with pytest.raises(ValueError, match="forced|max_tokens"):
        ForcedTokens.validate_params(SamplingParams(max_tokens=max_tokens, extra_args={FORCED_TOKENS_KEY: forced}))
    ForcedTokens.validate_params(SamplingParams(max_tokens=2, extra_args={FORCED_TOKENS_KEY: [1, 2]}))
    ForcedTokens.validate_params(SamplingParams(max_tokens=2))


@pytest.mark.slow
@pytest.mark.vllm
def test_forced_logprobs_equal_prompt_logprobs(tiny_student, tmp_path, heavy_lock):
    adapter = tmp_path / "lora"
    save_adapter(random_adapter(tiny_student, r=8, lora_alpha=16.0, seed=3, std=0.3), adapter)
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("forced_check.py")), str(tiny_student),
                           str(adapter)], capture_output=True, text=True, timeout=600, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(lines[-1][len("RESULT "):])
    from .forced_check import FORCED, SEQUENCES

    for label in ("lora", "base"):
        run = result[label]
        assert run["emitted"] == [s[-FORCED:] for s in SEQUENCES], label
        assert run["greedy"] != run["emitted"], "greedy decoding emits other tokens: the processor forced them"
        for by_prompt, forced in zip(run["by_prompt"], run["forced"]):
            assert forced == pytest.approx(by_prompt, abs=TOLERANCE), label
    lora, base = ([x for row in result[k]["by_prompt"] for x in row] for k in ("lora", "base"))
    assert max(abs(a - b) for a, b in zip(lora, base)) > 0.05, "the LoRA changed nothing: it was not applied"

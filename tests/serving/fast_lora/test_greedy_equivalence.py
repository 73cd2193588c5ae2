"""Greedy generations with LoRA are the same with and without the fast path, on the default student.

Two vLLM engines, one after the other, each in its own process (vLLM chooses its platform at
import): real experts from bundles/default, one expert for a whole batch, then two experts and
the base interleaved in one batch.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mode_cotd import paths
from mode_cotd.student import resolve_student

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.real_student]

EXPERTS = paths.REPO_ROOT / "bundles" / "default" / "experts"


def _generate(fast_lora: bool, student: Path) -> dict:
    env = {**os.environ, "MODE_COTD_FAST_LORA": "1" if fast_lora else "0"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("greedy_check.py")), str(student),
         str(EXPERTS / "gsm8k"), str(EXPERTS / "last_letter_concatenation")],
        capture_output=True, text=True, timeout=900, env=env, check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_greedy_generations_identical_with_and_without_fast_lora(heavy_lock):
    if not (EXPERTS / "gsm8k").is_dir():
        pytest.skip(f"no default bundle experts at {EXPERTS}")
    student = resolve_student()
    fast, plain = _generate(True, student), _generate(False, student)
    assert fast["wrapper"] == "serving.fast_lora.wrapper.PunicaWrapperGrouped"
    assert plain["wrapper"] == "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
    assert fast["one_expert"] == plain["one_expert"]
    assert fast["mixed"] == plain["mixed"], (fast["mixed_text"], plain["mixed_text"])
    texts = fast["mixed_text"]
    assert texts[0] != texts[2] and texts[1] != texts[2], "the experts changed nothing against the base"

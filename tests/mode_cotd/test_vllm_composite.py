"""vLLM serves a composite written by mode_cotd over the converted default student."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mode_cotd.adapter import load_adapter, save_adapter
from mode_cotd.mixing import compose_exact
from mode_cotd.student import resolve_student
from mode_cotd.tiny import random_adapter

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.real_student]


def test_vllm_serves_two_expert_composite(tmp_path: Path):
    student = resolve_student()
    experts = [random_adapter(student, r=8, seed=seed, std=0.08) for seed in (1, 2)]
    composite_dir = save_adapter(compose_exact(experts, [0.7, 0.6]), tmp_path / "composite")
    composite = load_adapter(composite_dir)
    assert composite.r == 16 and composite.target_modules == ["q_proj", "v_proj"]

    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("vllm_composite_check.py")), str(student), str(composite_dir)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert result, proc.stdout[-4000:] + proc.stderr[-4000:]
    outputs = json.loads(result[-1][len("RESULT ") :])
    print(outputs)
    assert outputs["base"].strip(), "the base student produced no text"
    assert outputs["composite"] != outputs["base"], outputs
    assert outputs["composite"] == outputs["composite_again"], "greedy decoding with the composite is not stable"

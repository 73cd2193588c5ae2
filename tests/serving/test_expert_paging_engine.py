"""Paging the union's experts through a real vLLM engine (paging_check.py, in a subprocess: vLLM spawns workers).

With 2 of the default bundle's 10 experts resident, a mixture served again after both its experts were paged out
and back in generates the same greedy tokens; 8 requests over 8 experts at once all finish; vLLM then holds
only the resident experts (paged-out ones are removed from its slots and host cache); an expert whose folder
is gone fails its request with an error that names it, and the engine goes on serving.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mode_cotd import paths
from mode_cotd.student import resolve_student

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.real_student]

EXPERTS = paths.REPO_ROOT / "bundles" / "default" / "experts"


def test_experts_page_in_and_out_of_a_real_engine(heavy_lock):
    if not (EXPERTS / "gsm8k").is_dir():
        pytest.skip(f"no default bundle experts at {EXPERTS}")
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("paging_check.py")), str(resolve_student()),
                           str(EXPERTS)], capture_output=True, text=True, timeout=900, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["first"] and result["again"] == result["first"]  # paged out and back in: the same generation
    assert all(result["others"]) and all(result["together"]) and result["after"]
    assert result["max_loras"] == 4 + 2  # the route table's slots + 2 for the union, not 10
    assert len(result["resident"]) == 2 and set(result["resident"]) <= set(result["member_ids"])
    members_in_vllm = sorted(set(result["registered"]) & set(result["member_ids"]))
    assert members_in_vllm == result["resident"]  # the paged-out experts left vLLM's slots and host cache
    assert result["page_outs"] >= 10 and result["page_ins"] == result["page_outs"]  # 2 resident at start and end
    error = result["deleted_error"]
    assert error is not None and error.startswith("InternalError") and "tracking_shuffled_objects" in error

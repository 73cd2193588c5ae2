"""A mixture through the union gives the same greedy generations as its exact composite, on the default student.

One vLLM engine with the fast path (union_check.py, in a subprocess: vLLM spawns workers): the
default bundle's experts pinned under member ids; five mixtures (three of 2 experts, one of 3, one
of 8), each as a mixture id and as a composite written by compose_exact, over three prompts, in one
batch with a member and the base; the same mixtures over a union with a shared adapter (weight 1
under every mixture id) against the composites of mixture + shared adapter (all but the 8-expert one,
whose composite would pass the engine's max LoRA rank); and the 2-expert
mixtures as sparse mixture ids (the form of unions over 16 routed experts) against their composites. In bfloat16 (the student's dtype, `mode-cotd serve`'s default where the CPU or GPU
has bf16 arithmetic, `mode_cotd.compute_dtype`) the union scales
the rank blocks in float32 where the composite holds wᵢsᵢBᵢ rounded to bf16, so a logit can move
by a rounding step: generations must match token for token, or up to a near tie at the first
difference (test_greedy_equivalence.same_up_to_near_ties). Measured when written (a CPU without bf16
arithmetic): all 9 identical in float32; in bfloat16 7 identical and 2 near-tie flips (tokens 35 and
31, gaps of 0.06 and 0.125 nats, one bf16 step of a logit). On a CPU with AVX512-BF16 (2026-12-06) the
same code gave all 9 identical in float32 and, in bfloat16, 4 flips, each at an exact tie in one of the
two engines (gap 0.0: two tokens with the same bf16 logprob, where either is the argmax). So float32 is
held to token-for-token identity, and in bfloat16 at most 2 flips per 9 generations (4 of the 18, with the
shared union's) may be near ties that were no exact tie in either engine.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mode_cotd import paths
from mode_cotd.student import resolve_student
from serving.fast_lora.plugin import COMPILE_ENV

from .test_greedy_equivalence import same_up_to_near_ties

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.real_student]

EXPERTS = paths.REPO_ROOT / "bundles" / "default" / "experts"


def _union_check(dtype: str, compile_lora: bool = False) -> dict:
    """union_check.py's RESULT, run in a subprocess (vLLM spawns workers) on the default student and bundle."""
    if not (EXPERTS / "gsm8k").is_dir():
        pytest.skip(f"no default bundle experts at {EXPERTS}")
    env = {**os.environ, COMPILE_ENV: "1" if compile_lora else "0"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("union_check.py")), str(resolve_student()), str(EXPERTS),
         dtype], capture_output=True, text=True, timeout=1200, check=False, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_union_mixtures_match_their_composites(heavy_lock, dtype):
    result = _union_check(dtype)
    labels, tokens, logprobs = result["labels"], result["tokens"], result["logprobs"]
    union = [i for i, label in enumerate(labels) if label.startswith(("union-", "shared-union-", "sparse-union-"))]
    assert len(union) == 5 * 3 + 4 * 3 + 3 * 3  # dense, over a shared adapter, sparse ids; 3 prompts each
    pick = lambda rows: {"seq": [tokens[i] for i in rows], "seq_logprobs": [logprobs[i] for i in rows]}
    flips = same_up_to_near_ties(pick(union), pick([i + 1 for i in union]), "seq")  # i + 1: the composite
    plain = [tokens[i] for i in union if labels[i].startswith("union-")]
    over_shared = [tokens[i] for i in union if labels[i].startswith("shared-")]  # the first 4 mixtures, same prompts
    assert all(s != p for s, p in zip(over_shared, plain)), "the shared block changed nothing"
    print(f"\nunion vs composite ({dtype}): identical but for {len(flips)} near-tie flips {flips}")
    if dtype == "float32":
        assert flips == [], flips  # the union is exact: same tokens as the composite
    else:
        not_exact_ties = [f for f in flips if f["gap_fast"] > 0 and f["gap_plain"] > 0]
        # rounding ties are rare (4 of 18 when written): more would mean the outputs drift
        assert len(not_exact_ties) <= len(union) * 4 // 18, flips
    base = [tokens[i] for i, label in enumerate(labels) if label == "base"]
    assert all(tokens[i] not in base for i in union), "a mixture generated exactly what the base did"
    member = [tokens[i] for i, label in enumerate(labels) if label == "member-gsm8k"]
    assert all(m != b for m, b in zip(member, base)), "the pinned expert changed nothing against the base"


def test_a_compiled_lora_engine_generates_what_the_eager_one_does(heavy_lock):
    """engine.compile: the same batch (mixture ids, composites, a member, the base) in float32, eager and compiled
    (Dynamo + Inductor, the grouped ops as custom ops). Inductor fuses the base model's elementwise ops, so a
    logit may move in its last bits: greedy tokens must match up to near ties."""
    eager, compiled = _union_check("float32"), _union_check("float32", compile_lora=True)
    assert eager["compilation_mode"] == "NONE"
    assert compiled["compilation_mode"] == "DYNAMO_TRACE_ONCE"
    pick = lambda result: {"seq": result["tokens"], "seq_logprobs": result["logprobs"]}
    flips = same_up_to_near_ties(pick(compiled), pick(eager), "seq")
    print(f"\ncompiled vs eager, {len(eager['tokens'])} generations: identical but for {len(flips)} near-tie flips "
          f"{flips}")
    assert len(flips) <= 2, flips
    labels, tokens = compiled["labels"], compiled["tokens"]
    base = [tokens[i] for i, label in enumerate(labels) if label == "base"]
    member = [tokens[i] for i, label in enumerate(labels) if label == "member-gsm8k"]
    assert all(m != b for m, b in zip(member, base)), "compiled: the pinned expert changed nothing against the base"
    union = [tokens[i] for i, label in enumerate(labels) if label.startswith("union-")]
    assert all(u not in base for u in union), "compiled: a mixture generated exactly what the base did"

"""The wrapper under torch.compile: one trace, whose LoRA ops read each step's grouping at run time.

vLLM traces a LoRA model once (DYNAMO_TRACE_ONCE) when mode-cotd's compile switch is on. These
tests compile a LoRA linear layer's call with fullgraph=True (no graph break: Dynamo never traces
into the wrapper's Python grouping), then change the step under it, and fail on any recompile: the
compiled call must still give each step's rows their own adapters, the same as the eager call.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from tests.serving.fast_lora.test_union_ops import HIDDEN, IDS, SLICES, STEPS, _stacked, _wrapper

pytestmark = pytest.mark.vllm


def _update(wrapper, step: str) -> int:
    from vllm.lora.layers.utils import LoRAMapping

    tokens, prompts = STEPS[step]
    wrapper.update_metadata(LoRAMapping(tuple(tokens), tuple(prompts), is_prefill=True), IDS, len(IDS) + 1, 64)
    return len(tokens)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_compiled_layer_follows_every_step_without_recompiling(backend):
    torch._dynamo.reset()
    wrapper, _ = _wrapper("decode")
    a, b = _stacked(seed=1)
    base = torch.randn(sum(SLICES), HIDDEN, generator=torch.Generator().manual_seed(5))

    def layer(x: torch.Tensor) -> torch.Tensor:  # a LoRA linear layer: base GEMM, then the wrapper adds LoRA
        y = x @ base.t()
        wrapper.add_lora_linear(y, x, a, b, 0.5, SLICES)
        return torch.relu(y)

    compiled = torch.compile(layer, backend=backend, fullgraph=True, dynamic=True)
    steps = ["decode", "prefill", "no_mixture", "some_experts", "mixtures_only", "decode"]
    for i, step in enumerate(steps):
        t = _update(wrapper, step)
        x = torch.randn(t, HIDDEN, generator=torch.Generator().manual_seed(10 + i))
        with torch.compiler.set_stance("fail_on_recompile") if i else nullcontext():
            got = compiled(x)
        torch.testing.assert_close(got, layer(x), rtol=1e-5, atol=1e-5)
    assert not torch.equal(layer(x), torch.relu(x @ base.t()))  # the steps did add LoRA


def test_the_op_without_its_wrapper_is_a_clear_error():
    from serving.fast_lora import compiled_ops  # noqa: F401  (registers the ops)

    with pytest.raises(RuntimeError, match="no live punica wrapper under key 0"):
        torch.ops.mode_cotd.lora_linear(torch.zeros(1, 2), torch.zeros(1, 2), [], [], 1.0, [], 0)


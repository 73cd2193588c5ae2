"""block_scaled_lora against a plain per-token loop: y[t] + Σᵢ w[t, i] · sᵢ · Bᵢ Aᵢ x[t], in float64.

Both rounding paths (float32 accumulate, the CPU default; input-dtype matmuls, the CUDA default)
run on CPU; with CUDA the device defaults run there too.
"""

from __future__ import annotations

import pytest
import torch

from serving.fast_lora.block_scale import block_scaled_lora, build_union, dense_weights

H, N = 48, 40
RANKS = (4, 8, 2, 8)  # unequal: padded to 8 in the union
SCALES = (0.5, 2.0, -1.0, 1.25)
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}
"""Relative to the output's magnitude (max |reference| + 1)."""

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def _experts(dtype: torch.dtype, device: str, ranks=RANKS, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, H, generator=g).div(H**0.5).to(device, dtype),
             torch.randn(N, r, generator=g).div(r**0.5).to(device, dtype), s) for r, s in zip(ranks, SCALES)]


def _inputs(t: int, dtype: torch.dtype, device: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, H, generator=g).to(device, dtype)
    y = torch.randn(t, N, generator=g).to(device, dtype)
    w = torch.randn(t, len(RANKS), generator=g).to(device)  # negative weights included
    return y, x, w


def _loop_reference(y, x, experts, w) -> torch.Tensor:
    """y[t] + Σᵢ w[t, i] · sᵢ · Bᵢ (Aᵢ x[t]), one token and one expert at a time, float64 on the CPU."""
    out = y.double().cpu().clone()
    for t in range(x.shape[0]):
        xt = x[t].double().cpu()
        for i, (a, b, s) in enumerate(experts):
            out[t] += w[t, i].item() * s * (b.double().cpu() @ (a.double().cpu() @ xt))
    return out


def _assert_close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOL[dtype] * (ref.abs().max().item() + 1 if ref.numel() else 1)
    torch.testing.assert_close(got.double().cpu(), ref, atol=tol, rtol=0)


def _run(y, x, experts, w, native=None) -> torch.Tensor:
    a_union, b_union, r = build_union(experts)
    out = y.clone()
    block_scaled_lora(out, x, a_union, b_union, w, r, native_dtype=native)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("native", [None, False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_matches_per_token_loop(device, native, dtype):
    experts = _experts(dtype, device)
    y, x, w = _inputs(9, dtype, device)
    got = _run(y, x, experts, w, native)
    assert got.dtype == dtype and got.device.type == device
    _assert_close(got, _loop_reference(y, x, experts, w), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_top2_mixtures_and_zero_weights(device):
    experts = _experts(torch.float64, device)
    y, x, _ = _inputs(6, torch.float64, device)
    mixtures = [{0: 0.7, 2: 0.3}, {}, {1: -0.5, 3: 1.5}, {3: 1.0}, {}, {0: 0.25, 1: 0.75}]
    w = dense_weights(mixtures, len(RANKS), dtype=torch.float64, device=device)
    got = _run(y, x, experts, w)
    _assert_close(got, _loop_reference(y, x, experts, w), torch.float64)
    assert torch.equal(got[[1, 4]], y[[1, 4]])  # tokens with no expert: exactly unchanged


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_zero_weights_leave_y_unchanged(device, dtype):
    experts = _experts(dtype, device)
    y, x, w = _inputs(5, dtype, device)
    assert torch.equal(_run(y, x, experts, torch.zeros_like(w)), y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("expert", range(len(RANKS)))
def test_one_hot_equals_single_lora(device, expert):
    experts = _experts(torch.float64, device)
    y, x, _ = _inputs(7, torch.float64, device)
    one_hot = torch.nn.functional.one_hot(torch.full((7,), expert), len(RANKS)).double().to(device)
    a, b, s = experts[expert]
    single = y + s * (x @ a.t()) @ b.t()
    torch.testing.assert_close(_run(y, x, experts, one_hot), single)


@pytest.mark.parametrize("device", DEVICES)
def test_no_tokens(device):
    experts = _experts(torch.float32, device)
    y, x, w = _inputs(0, torch.float32, device)
    out = _run(y, x, experts, w)
    assert out.shape == (0, N)
    assert dense_weights([], 4).shape == (0, 4)


def test_union_layout_pads_unequal_ranks():
    experts = _experts(torch.float32, "cpu")
    a_union, b_union, r = build_union(experts)
    assert r == 8 and a_union.shape == (32, H) and b_union.shape == (N, 32)
    for i, (a, b, s) in enumerate(experts):
        k = a.shape[0]
        assert torch.equal(a_union[i * r : i * r + k], a)
        torch.testing.assert_close(b_union[:, i * r : i * r + k], b * s)
        assert not a_union[i * r + k : (i + 1) * r].any() and not b_union[:, i * r + k : (i + 1) * r].any()
    assert build_union(experts, rank=16)[2] == 16
    assert build_union(experts, dtype=torch.bfloat16)[0].dtype == torch.bfloat16


def test_dense_weights():
    w = dense_weights([{1: 0.5, 0: -0.25}, {}, {2: 1.0}], 3)
    assert torch.equal(w, torch.tensor([[-0.25, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    with pytest.raises(ValueError, match="token 1: expert index 3 outside"):
        dense_weights([{0: 1.0}, {3: 1.0}], 3)


def _bad(case: str):
    t, e, r = 5, 3, 4
    y, x = torch.zeros(t, N), torch.zeros(t, H)
    a, b, w = torch.zeros(e * r, H), torch.zeros(N, e * r), torch.zeros(t, e)
    return {
        "x 1-D": (y, x[0], a, b, w, r),
        "y rows": (y[:4], x, a, b, w, r),
        "weights rows": (y, x, a, b, w[:3], r),
        "a_union H": (y, x, a[:, :10], b, w, r),
        "a_union E·r": (y, x, a[:8], b, w, r),
        "b_union N": (y, x, a, b[:7], w, r),
        "b_union E·r": (y, x, a, b[:, :8], w, r),
        "wrong rank": (y, x, a, b, w, 3),
        "zero rank": (y, x, a, b, w, 0),
        "int weights": (y, x, a, b, w.long(), r),
    }[case]


@pytest.mark.parametrize("case, message", [
    ("x 1-D", r"x must be 2-D, got shape \(48,\)"),
    ("y rows", "y has 4 rows but x has T=5"),
    ("weights rows", "weights has 3 rows but x has T=5"),
    ("a_union H", r"a_union has shape \(12, 10\), expected \[E·r, H\] = \[3·4, 48\]"),
    ("a_union E·r", r"a_union has shape \(8, 48\), expected \[E·r, H\] = \[3·4, 48\]"),
    ("b_union N", r"b_union has shape \(7, 12\), expected \[N, E·r\] = \[40, 3·4\]"),
    ("b_union E·r", r"b_union has shape \(40, 8\), expected \[N, E·r\] = \[40, 3·4\]"),
    ("wrong rank", r"a_union has shape \(12, 48\), expected \[E·r, H\] = \[3·3, 48\]"),
    ("zero rank", "rank must be >= 1, got 0"),
    ("int weights", "weights must be floating point"),
])
def test_bad_shapes_raise(case, message):
    with pytest.raises(ValueError, match=message):
        block_scaled_lora(*_bad(case))


def test_bad_union_raises():
    (a0, b0, s0), (a1, b1, s1) = _experts(torch.float32, "cpu", ranks=(4, 8))
    with pytest.raises(ValueError, match="at least one expert"):
        build_union([])
    with pytest.raises(ValueError, match="expert 1: A .* do not match H=48, N=40"):
        build_union([(a0, b0, s0), (a1[:, :10], b1, s1)])
    with pytest.raises(ValueError, match="expert 1: B has 4 columns but A has rank 8"):
        build_union([(a0, b0, s0), (a1, b0, s1)])
    with pytest.raises(ValueError, match="rank=6 is below the largest expert rank 8"):
        build_union([(a0, b0, s0), (a1, b1, s1)], rank=6)

"""Mixing ops against the plain reference: exact composition, linear merge, SVD compression."""

from __future__ import annotations

import math

import pytest
import torch

from mode_cotd.adapter import LoraAdapter, adapter_from_modules
from mode_cotd.errors import BundleError, ConfigError
from mode_cotd.mixing import compose_exact, compress_svd, delta_weight, merge_linear, mix, reference_delta

SHAPES = {"q_proj": (16, 16), "k_proj": (16, 8), "v_proj": (16, 8), "o_proj": (16, 16)}  # name -> (in, out)


def random_adapter(
    names: list[str], r: int, alpha: float, use_rslora: bool = False, seed: int = 0, layers: int = 2
) -> LoraAdapter:
    """A random adapter over `layers` decoder layers, with non-zero A and B."""
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(layers):
        for name in names:
            n_in, n_out = SHAPES[name]
            path = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            a = torch.randn(r, n_in, generator=gen) / n_in**0.5  # [r, in]
            b = torch.randn(n_out, r, generator=gen)  # [out, r]
            modules[path] = (a, b)
    return adapter_from_modules(modules, r, alpha, use_rslora, "tiny")


@pytest.fixture
def experts() -> list[LoraAdapter]:
    """Three experts: different ranks and alphas, one rsLoRA, partly disjoint modules."""
    return [
        random_adapter(["q_proj", "v_proj"], r=4, alpha=8, seed=1),
        random_adapter(["v_proj", "o_proj"], r=2, alpha=16, use_rslora=True, seed=2),
        random_adapter(["k_proj"], r=3, alpha=3, seed=3),
    ]


WEIGHTS = [0.7, -0.4, 1.3]


def applied(adapter: LoraAdapter, path: str, x: torch.Tensor) -> torch.Tensor:
    """x [N, in] -> s·x·Aᵀ·Bᵀ [N, out] in float64."""
    a, b = adapter.modules()[path]
    return adapter.scaling() * (x @ a.double().T @ b.double().T)


def test_compose_exact_matches_reference(experts):
    composite = compose_exact(experts, WEIGHTS)
    assert composite.r == 9 and composite.lora_alpha == 9 and not composite.use_rslora
    assert composite.scaling() == 1.0
    assert composite.target_modules == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert composite.base_model_name_or_path == "tiny"
    modules = composite.modules()
    assert len(modules) == 8
    x = torch.randn(5, 16, dtype=torch.float64)
    for path, (a, b) in modules.items():
        assert a.dtype == b.dtype == torch.float32
        assert a.shape[0] == b.shape[1] == 9
        want = reference_delta(experts, WEIGHTS, path, x)  # [5, out]
        assert want.abs().max() > 0.1
        torch.testing.assert_close(applied(composite, path, x), want, rtol=1e-5, atol=1e-5)


def test_compose_exact_rejects_bad_input(experts):
    with pytest.raises(ConfigError, match="3 adapters but 2 weights"):
        compose_exact(experts, [1.0, 2.0])
    with pytest.raises(ConfigError, match="finite"):
        compose_exact(experts, [1.0, float("nan"), 0.0])
    other = random_adapter(["q_proj"], r=4, alpha=8)
    path = "base_model.model.model.layers.0.self_attn.q_proj"
    other.weights[path + ".lora_A.weight"] = torch.randn(4, 12)  # in=12 where the others have 16
    with pytest.raises(BundleError, match="q_proj"):
        compose_exact([experts[0], other], [1.0, 1.0])


def test_reference_delta_is_the_dense_sum(experts):
    path = "base_model.model.model.layers.1.self_attn.v_proj"
    x = torch.randn(3, 16)
    dense = 0.7 * delta_weight(experts[0], path) - 0.4 * delta_weight(experts[1], path)  # [out, in]
    torch.testing.assert_close(reference_delta(experts, WEIGHTS, path, x), x @ dense.T, rtol=1e-5, atol=1e-5)
    with pytest.raises(BundleError, match="no expert has module"):
        reference_delta(experts, WEIGHTS, "base_model.model.nowhere", x)


def test_merge_linear_lorahub_is_the_papers_merge():
    same = [random_adapter(["q_proj", "v_proj"], r=4, alpha=8, seed=s) for s in (1, 2)]
    merged = merge_linear(same, [0.7, -0.4])
    assert (merged.r, merged.lora_alpha, merged.scaling()) == (4, 8, 2.0)
    for path, (a, b) in merged.modules().items():
        (a1, b1), (a2, b2) = same[0].modules()[path], same[1].modules()[path]
        torch.testing.assert_close(a, 0.7 * a1 - 0.4 * a2)
        torch.testing.assert_close(b, 0.7 * b1 - 0.4 * b2)


def test_merge_linear_formulas_against_reference():
    experts = [
        random_adapter(["q_proj", "v_proj"], r=4, alpha=8, seed=1),
        random_adapter(["v_proj", "o_proj"], r=4, alpha=6, use_rslora=True, seed=2),
    ]
    w = [0.7, -0.4]
    x = torch.randn(5, 16, dtype=torch.float64)
    lorahub, peft_style = merge_linear(experts, w), merge_linear(experts, w, convention="peft")
    assert peft_style.scaling() == 1.0
    for path in lorahub.modules():
        present = [(e.modules()[path], wi, e.scaling()) for e, wi in zip(experts, w) if path in e.modules()]
        b_sum = sum(wi * s * b.double() for (_, b), wi, s in present)  # [out, r]
        a_sum = sum(wi * a.double() for (a, _), wi, _s in present)  # [r, in]
        torch.testing.assert_close(applied(lorahub, path, x), x @ (b_sum @ a_sum).T, rtol=1e-5, atol=1e-5)
        signed = [(wi * s) for _, wi, s in present]
        a_peft = sum(
            math.copysign(abs(c) ** 0.5, c) * a.double() for ((a, _), _, _), c in zip(present, signed)
        )
        b_peft = sum(abs(c) ** 0.5 * b.double() for ((_, b), _, _), c in zip(present, signed))  # [out, r]
        torch.testing.assert_close(
            applied(peft_style, path, x), x @ (b_peft @ a_peft).T, rtol=1e-5, atol=1e-5
        )
    # A single expert: peft's split is exact, LoraHub's scales by w² (w on A and on B).
    for convention, effective_weight in (("lorahub", 0.16), ("peft", -0.4)):
        alone = merge_linear(experts[1:], [-0.4], convention=convention)
        for path in alone.modules():
            want = reference_delta(experts[1:], [effective_weight], path, x)
            torch.testing.assert_close(applied(alone, path, x), want, rtol=1e-5, atol=1e-5)
    # With two experts the merge is only an approximation of the mixture.
    path = "base_model.model.model.layers.0.self_attn.v_proj"
    assert (applied(lorahub, path, x) - reference_delta(experts, w, path, x)).abs().max() > 1e-3


def test_mix_adds_the_shared_adapter_exactly_on_top_of_either_mode():
    shared = random_adapter(["q_proj", "v_proj", "o_proj"], r=8, alpha=16, seed=7)
    experts = [random_adapter(["q_proj", "v_proj"], r=4, alpha=8, seed=1),
               random_adapter(["v_proj", "o_proj"], r=4, alpha=6, seed=2)]
    w = [0.7, -0.4]
    x = torch.randn(5, 16, dtype=torch.float64)
    for mode in ("exact", "linear"):
        plain, over = mix(experts, w, mode), mix(experts, w, mode, over=shared)
        for path in shared.modules():
            own = applied(plain, path, x) if path in plain.modules() else 0  # the mode's own ΔW, plain reference
            torch.testing.assert_close(applied(over, path, x), applied(shared, path, x) + own, rtol=1e-5,
                                       atol=1e-5)
    for path in experts[0].modules():
        torch.testing.assert_close(applied(mix(experts, w, "exact"), path, x), reference_delta(experts, w, path, x),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="'exact' or 'linear'"):
        mix(experts, w, "ties")


def test_merge_linear_needs_equal_ranks(experts):
    with pytest.raises(BundleError, match="share one rank"):
        merge_linear(experts, WEIGHTS)
    with pytest.raises(ConfigError, match="convention"):
        merge_linear(experts[:1], [1.0], convention="ties")


def test_compress_svd_exact_when_rank_fits(experts):
    composite = compose_exact(experts, WEIGHTS)  # rank 9
    x = torch.randn(4, 16, dtype=torch.float64)
    for rank in (9, 12):
        compressed, error = compress_svd(composite, rank)
        assert error < 1e-5
        assert compressed.r == 9 and compressed.scaling() == 1.0
        for path in composite.modules():
            want = reference_delta(experts, WEIGHTS, path, x)
            torch.testing.assert_close(applied(compressed, path, x), want, rtol=1e-5, atol=1e-5)


def test_compress_svd_truncation_reports_the_optimal_error(experts):
    composite = compose_exact(experts, WEIGHTS)
    compressed, error = compress_svd(composite, 2)
    assert compressed.r == 2 and all(a.shape[0] == 2 for a, _ in compressed.modules().values())
    assert error > 0.01
    worst = 0.0
    for path in composite.modules():
        dense = delta_weight(composite, path).double()  # [out, in]
        got = delta_weight(compressed, path).double()
        sigma = torch.linalg.svdvals(dense)
        best = (sigma[2:].square().sum() / sigma.square().sum()).sqrt().item()  # Eckart–Young
        measured = ((dense - got).norm() / dense.norm()).item()
        assert measured == pytest.approx(best, rel=1e-4, abs=1e-6)
        worst = max(worst, measured)
    assert error == pytest.approx(worst, rel=1e-4)
    with pytest.raises(ConfigError, match="rank"):
        compress_svd(composite, 0)


def test_merge_linear_peft_convention_matches_peft():
    """merge_linear(convention="peft") equals peft's add_weighted_adapter(combination_type="linear")."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj = torch.nn.Linear(16, 16), torch.nn.Linear(16, 8)

    torch.manual_seed(0)
    configs = {
        "one": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "two": LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["v_proj"]),
    }
    model = get_peft_model(Tiny(), configs["one"], adapter_name="one")
    model.add_adapter("two", configs["two"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    adapters = []
    for name, cfg in configs.items():
        state = get_peft_model_state_dict(model, adapter_name=name)
        adapters.append(LoraAdapter(cfg.r, cfg.lora_alpha, sorted(cfg.target_modules), state, cfg.use_rslora))
    model.add_weighted_adapter(["one", "two"], [0.7, -0.4], "mix", combination_type="linear")
    merged = merge_linear(adapters, [0.7, -0.4], convention="peft")
    for path in merged.modules():
        layer = model.get_submodule(path)
        torch.testing.assert_close(
            delta_weight(merged, path), layer.get_delta_weight("mix"), rtol=1e-5, atol=1e-6
        )

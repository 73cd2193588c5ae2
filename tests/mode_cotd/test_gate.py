"""Gate: shapes, top-k / renormalise / grid rounding, Mixture, featuriser, save and load."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mode_cotd.errors import BundleError, ConfigError
from mode_cotd.featurise import FEATURISERS, EmbeddingMeanFeaturiser, make_featuriser
from mode_cotd.gate import Gate, GateConfig, load_gate, save_gate
from mode_cotd.mixture import Mixture, round_to_grid

EXPERTS = ["svamp", "addsub", "gsm8k", "aqua"]


def fixed_gate(probs: list[float], **config) -> Gate:
    """A linear gate whose softmax is `probs` for every input (zero weight, bias = log p)."""
    gate = Gate(GateConfig(experts=EXPERTS[: len(probs)], feature_dim=8, normalise_features=False, **config))
    with torch.no_grad():
        gate.net[0].weight.zero_()
        gate.net[0].bias.copy_(torch.tensor(probs).log())
    return gate


def test_gate_shapes_linear_and_hidden():
    x = torch.randn(5, 64)  # [B, D]
    linear = Gate(GateConfig(experts=EXPERTS, feature_dim=64))
    mlp = Gate(GateConfig(experts=EXPERTS, feature_dim=64, hidden_dim=16))
    assert linear(x).shape == (5, 4)
    assert mlp(x).shape == (5, 4)
    assert sum(p.numel() for p in linear.parameters()) == 64 * 4 + 4
    assert sum(p.numel() for p in mlp.parameters()) == 64 * 16 + 16 + 16 * 4 + 4
    with pytest.raises(ConfigError, match=r"\[B, 64\]"):
        linear(torch.randn(5, 32))


def test_top_k_renormalise_and_grid_rounding():
    # top-2 of [0.5, 0.2, ...] renormalised: 0.714 / 0.286 -> 14.29 / 5.71 units of 1/20 -> 14 / 5,
    # and the one missing unit goes to the larger remainder (5.71): 0.70 / 0.30.
    gate = fixed_gate([0.5, 0.2, 0.15, 0.15], top_k=2, grid=0.05)
    (key,) = gate.mixtures(torch.randn(1, 8))
    assert key.experts == ("addsub", "svamp")
    assert key.weights == (0.3, 0.7)
    assert str(key) == "addsub=0.30,svamp=0.70"


def test_round_to_grid_ties_go_to_the_earlier_column():
    units = round_to_grid(torch.tensor([[0.625, 0.375], [0.375, 0.625]], dtype=torch.float64), 20)
    assert units.tolist() == [[13, 7], [8, 12]]


def test_grid_rounding_drops_experts_rounded_to_zero():
    # 0.6 / 0.38 / 0.02 -> 12 / 7.6 / 0.4 units: the spare unit goes to 7.6, and 0.4 rounds away.
    gate = fixed_gate([0.6, 0.38, 0.02], top_k=3, grid=0.05)
    (key,) = gate.mixtures(torch.randn(1, 8))
    assert key.as_dict() == {"svamp": 0.6, "addsub": 0.4}


def test_temperature_and_top_1():
    hot = fixed_gate([0.8, 0.2], top_k=2, grid=0.01, temperature=2.0)
    (key,) = hot.mixtures(torch.randn(1, 8))  # softmax(log p / 2) ∝ sqrt(p): 2/3, 1/3
    assert key.as_dict() == {"svamp": 0.67, "addsub": 0.33}
    top1 = fixed_gate([0.3, 0.7], top_k=1)
    assert [str(k) for k in top1.mixtures(torch.randn(3, 8))] == ["addsub=1.00"] * 3


def test_the_gate_abstains_to_the_shared_adapter_below_its_threshold():
    # max probability 0.5: below 0.6 the prompt goes to all_data alone; at 0.5 (not below) it is routed as usual.
    unsure = fixed_gate([0.5, 0.2, 0.15, 0.15], abstain_below=0.6, abstain_to="all_data")
    assert unsure.mixtures(torch.randn(2, 8)) == [Mixture.one("all_data")] * 2
    sure = fixed_gate([0.5, 0.2, 0.15, 0.15], abstain_below=0.5, abstain_to="all_data")
    assert [str(m) for m in sure.mixtures(torch.randn(1, 8))] == ["addsub=0.30,svamp=0.70"]


def test_round_to_grid_sums_to_one_and_stays_within_a_step():
    torch.manual_seed(0)
    w = torch.softmax(torch.randn(200, 3) * 3, dim=1)  # [B, k]
    units = round_to_grid(w, 20)
    assert (units.sum(1) == 20).all()
    assert ((units / 20 - w).abs() < 1 / 20 + 1e-9).all()


def test_mixtures_are_deterministic_and_batch_independent():
    torch.manual_seed(1)
    gate = Gate(GateConfig(experts=EXPERTS, feature_dim=16, hidden_dim=8, top_k=2, temperature=0.5))
    x = torch.randn(6, 16)
    keys = gate.mixtures(x)
    assert keys == gate.mixtures(x)
    assert keys == [gate.mixtures(x[i : i + 1])[0] for i in range(6)]
    for key in keys:
        assert math.isclose(sum(key.weights), 1.0) and list(key.experts) == sorted(key.experts)


def test_equal_mixtures_share_one_key():
    a = fixed_gate([0.50, 0.31, 0.19], top_k=2).mixtures(torch.randn(1, 8))[0]
    b = fixed_gate([0.49, 0.31, 0.20], top_k=2).mixtures(torch.randn(1, 8))[0]
    assert a == b and hash(a) == hash(b) and a.digest == b.digest
    c = Mixture.from_dict({"svamp": 0.62, "addsub": 0.38}, grid=0.05)
    d = Mixture.from_dict({"addsub": 3.8, "svamp": 6.2}, grid=0.05)
    assert a == c == d
    assert Mixture(("b", "a"), (0.3, 0.7)) == Mixture(("a", "b"), (0.7, 0.3000000000000001))


def test_mixture_key_string_and_digest_are_stable():
    key = Mixture.from_dict({"gsm8k": 0.3, "addsub": 0.7}, grid=0.05)
    assert str(key) == "addsub=0.70,gsm8k=0.30"
    assert key.digest == "44bfc458e3cc6779"  # sha256("addsub=0.70,gsm8k=0.30")[:16]; must never change
    assert key.as_dict() == {"addsub": 0.7, "gsm8k": 0.3}
    assert str(Mixture.from_dict({"a": 1, "b": 7}, grid=0.125)) == "a=0.125,b=0.875"


def test_mixture_key_without_normalising_keeps_signs():
    key = Mixture.from_dict({"a": -0.52, "b": 1.5, "c": 0.01}, grid=0.1, normalise=False)
    assert key.as_dict() == {"a": -0.5, "b": 1.5}
    assert str(key) == "a=-0.50,b=1.50"


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({"gsm8k": 0.5, "nope": 0.5}, "nope"),
        ({"gsm8k": float("nan")}, "gsm8k"),
        ({"gsm8k": float("inf")}, "gsm8k"),
        ({"gsm8k": "0.5"}, "gsm8k"),
        ({"gsm8k": True}, "gsm8k"),
        ({"gsm8k/../x": 1.0}, "not a valid name"),
        ({}, "non-empty"),
        ([("gsm8k", 1.0)], "non-empty"),
        ({"gsm8k": -1.0, "addsub": 2.0}, ">= 0"),
        ({"gsm8k": 0.0}, "positive sum"),
    ],
)
def test_mixture_key_from_dict_validation(weights, match):
    with pytest.raises(ConfigError, match=match):
        Mixture.from_dict(weights, grid=0.05, known_experts=["gsm8k", "addsub"])


def test_mixture_key_all_rounded_away():
    with pytest.raises(ConfigError, match="no weight left"):
        Mixture.from_dict({"a": 0.01}, grid=0.1, normalise=False)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"grid": 0.03}, "grid"),
        ({"grid": 0}, "grid"),
        ({"top_k": 5}, "top_k"),
        ({"temperature": 0.0}, "temperature"),
        ({"featuriser": "nope"}, "featuriser"),
        ({"experts": ["a", "a"]}, "twice"),
        ({"experts": ["a,b"]}, "not a valid name"),
        ({"hidden_dim": -1}, "hidden_dim"),
        ({"abstain_below": 0.5}, "needs 'abstain_to'"),
        ({"abstain_below": 1.5, "abstain_to": "all_data"}, "abstain_below"),
        ({"abstain_below": True, "abstain_to": "all_data"}, "abstain_below"),
        ({"abstain_to": "svamp"}, "one of the routed experts"),
        ({"abstain_to": "a,b"}, "not a valid name"),
    ],
)
def test_gate_config_validation(change, match):
    with pytest.raises(ConfigError, match=match):
        GateConfig(**{"experts": EXPERTS, "feature_dim": 8, **change})


# ---------------------------------------------------------------------------- featuriser


def test_embedding_mean_equals_plain_mean_of_embedding_rows(tiny_student):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    featuriser = make_featuriser("embedding_mean", tiny_student)
    assert isinstance(featuriser, EmbeddingMeanFeaturiser) and "embedding_mean" in FEATURISERS
    prompts = ["What is 2 + 3?", "", "a longer prompt, with ü and 🙂", "x"]
    features = featuriser(prompts)
    assert features.shape == (4, 64) and features.dtype == torch.float32

    table = AutoModelForCausalLM.from_pretrained(tiny_student).get_input_embeddings().weight.detach()
    tokenizer = AutoTokenizer.from_pretrained(tiny_student)
    for prompt, row in zip(prompts, features):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        expected = table[ids].mean(0) if ids else torch.zeros(64)
        torch.testing.assert_close(row, expected, rtol=1e-5, atol=1e-6)
    assert featuriser([]).shape == (0, 64)


def test_unknown_featuriser(tiny_student):
    with pytest.raises(ConfigError, match="unknown featuriser 'nope'"):
        make_featuriser("nope", tiny_student)


# ---------------------------------------------------------------------------- save / load


def test_gate_save_load_round_trip(tmp_path):
    torch.manual_seed(2)
    gate = Gate(GateConfig(experts=EXPERTS, feature_dim=16, hidden_dim=8, top_k=3, grid=0.1, temperature=0.7))
    save_gate(gate, tmp_path / "gate")
    assert sorted(p.name for p in (tmp_path / "gate").iterdir()) == ["gate.safetensors", "gate_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["gate"]  # no temporary folder left behind
    loaded = load_gate(tmp_path / "gate")
    assert loaded.config == gate.config
    x = torch.randn(7, 16)
    torch.testing.assert_close(loaded(x), gate(x))
    assert loaded.mixtures(x) == gate.mixtures(x)


def _saved_gate(tmp_path):
    folder = tmp_path / "gate"
    save_gate(Gate(GateConfig(experts=EXPERTS, feature_dim=16)), folder)
    return folder


def test_load_gate_missing_file(tmp_path):
    folder = _saved_gate(tmp_path)
    (folder / "gate.safetensors").unlink()
    with pytest.raises(BundleError, match="gate.safetensors: missing"):
        load_gate(folder)


def test_load_gate_unknown_config_key(tmp_path):
    folder = _saved_gate(tmp_path)
    config = json.loads((folder / "gate_config.json").read_text())
    (folder / "gate_config.json").write_text(json.dumps({**config, "dropout": 0.1}))
    with pytest.raises(BundleError, match=r"gate_config.json: .*unknown keys \['dropout'\]"):
        load_gate(folder)


def test_load_gate_bad_json(tmp_path):
    folder = _saved_gate(tmp_path)
    (folder / "gate_config.json").write_text("{not json")
    with pytest.raises(BundleError, match="gate_config.json"):
        load_gate(folder)


def test_load_gate_shape_mismatch(tmp_path):
    folder = _saved_gate(tmp_path)
    config = json.loads((folder / "gate_config.json").read_text())
    (folder / "gate_config.json").write_text(json.dumps({**config, "feature_dim": 32}))
    with pytest.raises(BundleError, match="gate.safetensors: tensors .* do not fit"):
        load_gate(folder)


def test_load_gate_refuses_pickles(tmp_path):
    folder = _saved_gate(tmp_path)
    (folder / "gate.pt").write_bytes(b"\x80\x04")
    with pytest.raises(BundleError, match="gate.pt: pickled weights are refused"):
        load_gate(folder)

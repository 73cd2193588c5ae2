"""Bundle: writing, round trip, every validation error naming its file, and lenient loading."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from mode_cotd.adapter import LoraAdapter, adapter_from_modules, save_adapter
from mode_cotd.architecture import architecture_of, config_sha256, read_config
from mode_cotd.bundle import (
    add_composition,
    add_expert,
    create_bundle,
    load_bundle,
    read_manifest,
    set_gate,
    set_shared,
)
from mode_cotd.errors import BundleError, ConfigError
from mode_cotd.gate import Gate, GateConfig


def tiny_adapter(
    student: Path, r: int = 4, targets=("q_proj", "v_proj"), seed: int = 0, layers=(0, 1)
) -> LoraAdapter:
    """A random LoRA over the tiny student's modules (any module name, so tests can build misfits)."""
    arch = architecture_of(student)
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in layers:
        for t in targets:
            block = "mlp" if t in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            fan_in, fan_out = arch.linear_modules.get(t, (64, 64))
            path = f"base_model.model.model.layers.{layer}.{block}.{t}"
            modules[path] = (torch.randn(r, fan_in, generator=g), torch.randn(fan_out, r, generator=g) * 0.01)
    return adapter_from_modules(modules, r=r, lora_alpha=2.0 * r)


def identity(student: Path) -> dict:
    return {"name": "tiny", "config_sha256": config_sha256(read_config(student)[0])}


@pytest.fixture(scope="module")
def peft_expert(tiny_student, tmp_path_factory) -> Path:
    """An expert saved by peft itself (get_peft_model + save_pretrained)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_student)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    folder = tmp_path_factory.mktemp("peft-expert")
    get_peft_model(model, config).save_pretrained(folder)
    return folder


@pytest.fixture
def bundle(tmp_path, tiny_student, peft_expert) -> Path:
    """A bundle with two experts (addsub from peft, gsm8k from a LoraAdapter), a gate and two compositions."""
    root = create_bundle(tmp_path / "bundle", identity(tiny_student))
    add_expert(root, "addsub", peft_expert, task="addsub")
    add_expert(
        root, "gsm8k", tiny_adapter(tiny_student, r=8, seed=1), task="gsm8k", report={"val_loss": 1.25}
    )
    torch.manual_seed(0)
    set_gate(root, Gate(GateConfig(experts=["addsub", "gsm8k"], feature_dim=64)), report={"accuracy": 0.9})
    add_composition(root, "svamp-mix", {"addsub": 0.7, "gsm8k": 0.3}, mode="exact", task="svamp")
    add_composition(root, "addsub-only", {"addsub": 1.5}, mode="linear", task="multiarith")
    return root


def edit_manifest(root: Path, change) -> None:
    data = json.loads((root / "manifest.json").read_text())
    change(data)
    (root / "manifest.json").write_text(json.dumps(data))


def test_round_trip(bundle, tiny_student, peft_expert):
    loaded = load_bundle(bundle, student=tiny_student, max_lora_rank=8)
    assert loaded.problems == []
    assert sorted(loaded.experts) == ["addsub", "gsm8k"]
    addsub = loaded.experts["addsub"]
    assert addsub.path == bundle / "experts" / "addsub"
    assert (addsub.record.r, addsub.record.lora_alpha, addsub.record.target_modules) == (
        4,
        8.0,
        ["q_proj", "v_proj"],
    )
    assert (addsub.path / "adapter_model.safetensors").read_bytes() == (
        peft_expert / "adapter_model.safetensors"
    ).read_bytes()
    gsm8k = loaded.experts["gsm8k"]
    assert json.loads((gsm8k.path / "report.json").read_text()) == {"val_loss": 1.25}
    torch.testing.assert_close(gsm8k.load().weights, tiny_adapter(tiny_student, r=8, seed=1).weights)

    assert loaded.gate is not None and loaded.gate.config.experts == ["addsub", "gsm8k"]
    torch.manual_seed(0)
    original = Gate(GateConfig(experts=["addsub", "gsm8k"], feature_dim=64))
    x = torch.randn(4, 64)
    assert loaded.gate.mixtures(x) == original.mixtures(x)
    assert sorted(loaded.compositions) == ["addsub-only", "svamp-mix"]
    assert loaded.compositions["svamp-mix"].weights == {"addsub": 0.7, "gsm8k": 0.3}

    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["schema_version"] == 1
    assert manifest["student"] == identity(tiny_student)
    assert manifest["experts"]["gsm8k"]["path"] == "experts/gsm8k"
    assert set(manifest["experts"]["gsm8k"]["files"]) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "report.json",
    }
    assert manifest["gate"]["report"] == {"accuracy": 0.9}
    assert read_manifest(bundle).to_dict() == manifest


def test_bundle_experts_load_in_peft(bundle, tiny_student):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = load_bundle(bundle).experts["gsm8k"].path
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_student), path)
    state = model.state_dict()
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"
    expected = tiny_adapter(tiny_student, r=8, seed=1).weights[
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    ]
    torch.testing.assert_close(state[key], expected)


# ---------------------------------------------------------------------------- errors, each naming its file


def _corrupt_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _replace_expert(root: Path, student: Path, name: str, **kwargs) -> None:
    """Swap an expert's files for a misfit adapter, with the manifest updated to match."""
    add_expert(root, name, tiny_adapter(student, **kwargs), task=name)


CASES = {
    "missing manifest": (
        lambda root, s: (root / "manifest.json").unlink(),
        "manifest.json: missing manifest",
    ),
    "bad json": (lambda root, s: (root / "manifest.json").write_text("{oops"), "manifest.json: bad JSON"),
    "nan in json": (
        lambda root, s: edit_manifest(
            root, lambda m: m["compositions"]["svamp-mix"]["weights"].update(addsub=math.nan)
        ),
        "manifest.json: bad JSON .*NaN",
    ),
    "unknown schema": (
        lambda root, s: edit_manifest(root, lambda m: m.update(schema_version=2)),
        "manifest.json: unknown schema version 2",
    ),
    "unknown key": (
        lambda root, s: edit_manifest(root, lambda m: m["experts"]["gsm8k"].update(colour="red")),
        r"manifest.json: experts.gsm8k: unknown keys \['colour'\]",
    ),
    "path escapes": (
        lambda root, s: edit_manifest(root, lambda m: m["experts"]["gsm8k"].update(path="../gsm8k")),
        "manifest.json: experts.gsm8k: 'path' must be 'experts/gsm8k'",
    ),
    "missing file": (
        lambda root, s: (root / "experts/gsm8k/adapter_model.safetensors").unlink(),
        "experts/gsm8k/adapter_model.safetensors: missing",
    ),
    "missing folder": (
        lambda root, s: shutil.rmtree(root / "experts/gsm8k"),
        "experts/gsm8k: folder listed in .*manifest.json is missing",
    ),
    "checksum": (
        lambda root, s: _corrupt_byte(root / "experts/gsm8k/adapter_model.safetensors"),
        "experts/gsm8k/adapter_model.safetensors: checksum mismatch",
    ),
    "pickle": (
        lambda root, s: (root / "experts/gsm8k/adapter_model.bin").write_bytes(b"\x80\x04."),
        "experts/gsm8k/adapter_model.bin: pickled weights are refused",
    ),
    "symlink": (
        lambda root, s: (
            (root / "experts/gsm8k/adapter_model.safetensors").unlink(),
            os.symlink(root.parent / "elsewhere", root / "experts/gsm8k/adapter_model.safetensors"),
        ),
        "experts/gsm8k/adapter_model.safetensors: symlinks are refused",
    ),
    "rank over limit": (
        lambda root, s: _replace_expert(root, s, "gsm8k", r=16),
        "experts/gsm8k/adapter_config.json: rank r=16 exceeds max_lora_rank=8",
    ),
    "unknown target module": (
        lambda root, s: _replace_expert(root, s, "gsm8k", targets=("qkv_proj",)),
        r"experts/gsm8k/adapter_config.json: target modules \['qkv_proj'\] do not exist",
    ),
    "shape misfit": (
        lambda root, s: add_expert(
            root,
            "gsm8k",
            adapter_from_modules(
                {
                    "base_model.model.model.layers.0.self_attn.k_proj": (
                        torch.zeros(4, 64),
                        torch.zeros(64, 4),
                    )
                },
                4,
                8,
            ),
            task="gsm8k",
        ),
        r"experts/gsm8k/adapter_model.safetensors: module .*k_proj has lora_A \[4, 64\], lora_B \[64, 4\]",
    ),
    "layer out of range": (
        lambda root, s: _replace_expert(root, s, "gsm8k", layers=(0, 5)),
        "experts/gsm8k/adapter_model.safetensors: .*layer 5 does not exist",
    ),
    "manifest disagrees with adapter": (
        lambda root, s: edit_manifest(root, lambda m: m["experts"]["gsm8k"].update(r=2)),
        r"experts/gsm8k/adapter_config.json: \(r, lora_alpha, target_modules\) = \(8,",
    ),
    "composition names unknown expert": (
        lambda root, s: edit_manifest(
            root, lambda m: m["compositions"]["svamp-mix"]["weights"].update(aqua=0.1)
        ),
        r"manifest.json: composition 'svamp-mix' names unknown experts \['aqua'\]",
    ),
    "gate config tampered": (
        lambda root, s: (root / "gate/gate_config.json").write_text("{}"),
        "gate/gate_config.json: checksum mismatch",
    ),
    "other student": (
        lambda root, s: edit_manifest(root, lambda m: m["student"].update(config_sha256="0" * 64)),
        "manifest.json: built for student 'tiny'",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_bundle_gets_an_error_naming_the_file(case, bundle, tiny_student):
    break_it, message = CASES[case]
    break_it(bundle, tiny_student)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle, student=tiny_student, max_lora_rank=8)


def test_unknown_student_architecture(bundle, tiny_student):
    config = {**read_config(tiny_student)[0], "model_type": "t5"}
    with pytest.raises(ConfigError, match="unknown architecture model_type='t5'"):
        load_bundle(bundle, student=config)


def test_lenient_mode_skips_exactly_the_bad_expert(bundle, tiny_student):
    add_composition(bundle, "gsm8k-only", {"gsm8k": 1.0}, mode="exact", task="gsm8k")
    _corrupt_byte(bundle / "experts/addsub/adapter_model.safetensors")
    loaded = load_bundle(bundle, student=tiny_student, strict=False)
    assert sorted(loaded.experts) == ["gsm8k"]
    assert sorted(loaded.compositions) == ["gsm8k-only"]
    assert loaded.gate is None  # it routes to addsub
    assert len(loaded.problems) == 4
    assert "experts/addsub/adapter_model.safetensors: checksum mismatch" in loaded.problems[0]
    assert any("gate dropped" in p and "addsub" in p for p in loaded.problems)
    assert sum("dropped, it needs skipped experts ['addsub']" in p for p in loaded.problems) == 2


# ---------------------------------------------------------------------------- writing


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "", "x y", "a..b"])
def test_add_expert_refuses_unsafe_names(name, bundle, tiny_student):
    before = (bundle / "manifest.json").read_bytes()
    with pytest.raises(ConfigError, match="not a valid name"):
        add_expert(bundle, name, tiny_adapter(tiny_student), task="t")
    assert (bundle / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["bundle"]


def test_failed_add_expert_leaves_nothing_behind(bundle, tiny_student, tmp_path):
    source = tmp_path / "pickled"
    save_adapter(tiny_adapter(tiny_student), source)
    (source / "adapter_model.bin").write_bytes(b"\x80\x04.")
    before = (bundle / "manifest.json").read_bytes()
    with pytest.raises(BundleError, match="adapter_model.bin: pickled weights are refused"):
        add_expert(bundle, "aqua", source, task="aqua")
    assert (bundle / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in (bundle / "experts").iterdir()) == ["addsub", "gsm8k"]


def test_writers_validate_their_input(bundle, tiny_student):
    with pytest.raises(ConfigError, match="unknown expert 'aqua'"):
        add_composition(bundle, "c", {"aqua": 1.0}, mode="exact", task="t")
    with pytest.raises(ConfigError, match="mode must be one of"):
        add_composition(bundle, "c", {"addsub": 1.0}, mode="sum", task="t")
    with pytest.raises(ConfigError, match="finite number"):
        add_composition(bundle, "c", {"addsub": float("nan")}, mode="exact", task="t")
    with pytest.raises(ConfigError, match=r"linear mixing needs experts of one rank.*'addsub': 4, 'gsm8k': 8"):
        add_composition(bundle, "c", {"addsub": 0.5, "gsm8k": 0.5}, mode="linear", task="t")
    with pytest.raises(ConfigError, match=r"not in the bundle .*\['aqua'\]"):
        set_gate(bundle, Gate(GateConfig(experts=["addsub", "aqua"], feature_dim=64)))
    with pytest.raises(BundleError, match="a bundle already exists"):
        create_bundle(bundle, identity(tiny_student))
    with pytest.raises(BundleError, match="student identity: student: 'config_sha256'"):
        create_bundle(bundle.parent / "other", {"name": "x", "config_sha256": "abc"})


def test_linear_composition_of_different_ranks_is_refused_at_load(bundle, tiny_student):
    """Written by hand (or by an older writer): refused at load, never a failure per request."""
    edit_manifest(bundle, lambda m: m["compositions"]["svamp-mix"].update(mode="linear"))
    with pytest.raises(BundleError, match="composition 'svamp-mix': linear mixing needs experts of one rank"):
        load_bundle(bundle, student=tiny_student)
    lenient = load_bundle(bundle, student=tiny_student, strict=False)
    assert "svamp-mix" not in lenient.compositions and "addsub-only" in lenient.compositions


def test_a_shared_adapter_round_trips_and_must_be_an_expert(bundle, tiny_student):
    assert load_bundle(bundle, student=tiny_student).shared is None
    add_expert(bundle, "all_data", tiny_adapter(tiny_student, r=8, seed=2), task="all_data")
    with pytest.raises(ConfigError, match="composition 'addsub-only': a linear composition may not weigh the "
                                          "shared adapter 'addsub'"):
        set_shared(bundle, "addsub")  # the linear addsub-only weighs it: it is added on top of the merge instead
    set_shared(bundle, "all_data")
    with pytest.raises(ConfigError, match="linear composition may not weigh the shared adapter 'all_data'"):
        add_composition(bundle, "lin", {"addsub": 1.0, "all_data": 0.5}, mode="linear", task="t")
    add_composition(bundle, "lin", {"addsub": 1.0}, mode="linear", task="t")  # served on top of all_data
    loaded = load_bundle(bundle, student=tiny_student)
    assert loaded.shared == "all_data" and read_manifest(bundle).shared == "all_data"
    assert loaded.gate is not None  # the gate routes to addsub and gsm8k, not to the shared adapter
    with pytest.raises(ConfigError, match="not an expert of the bundle"):
        set_shared(bundle, "nope")
    edit_manifest(bundle, lambda m: m.update(shared="missing"))
    with pytest.raises(BundleError, match="'shared' must name one of the bundle's experts"):
        load_bundle(bundle, student=tiny_student)
    edit_manifest(bundle, lambda m: m.update(shared=None))
    assert load_bundle(bundle, student=tiny_student).shared is None


def test_a_gate_may_not_route_to_the_shared_adapter(bundle, tiny_student):
    set_shared(bundle, "gsm8k")
    with pytest.raises(BundleError, match="routes to the shared adapter 'gsm8k'"):
        load_bundle(bundle, student=tiny_student)
    assert load_bundle(bundle, student=tiny_student, strict=False).gate is None


def test_a_gate_may_abstain_only_to_the_shared_adapter(bundle, tiny_student):
    add_expert(bundle, "all_data", tiny_adapter(tiny_student, r=8, seed=2), task="all_data")
    gate = load_bundle(bundle, student=tiny_student).gate
    gate.config.abstain_below, gate.config.abstain_to = 0.6, "all_data"
    set_gate(bundle, gate)
    with pytest.raises(BundleError, match="abstains to 'all_data', which is not the bundle's shared adapter"):
        load_bundle(bundle, student=tiny_student)
    set_shared(bundle, "all_data")
    assert load_bundle(bundle, student=tiny_student).gate.config.abstain_to == "all_data"


def test_a_shared_adapter_that_does_not_load_fails_the_bundle(bundle, tiny_student):
    edit_manifest(bundle, lambda m: m["compositions"].pop("addsub-only"))  # linear, weighs addsub
    set_shared(bundle, "addsub")
    (bundle / "experts" / "addsub" / "adapter_model.safetensors").write_bytes(b"broken")
    with pytest.raises(BundleError, match="shared adapter 'addsub' did not load"):
        load_bundle(bundle, student=tiny_student, strict=False)

"""End-to-end gate tuning: per-example hooked mixtures are exact, and the LM loss teaches the gate to route."""

from __future__ import annotations

import pytest
import torch

from mode_cotd.bundle import load_bundle, read_manifest
from mode_cotd.mixing import compose_exact
from mode_cotd.tiny import random_adapter
from training.compose import mixed_student
from training.gate_e2e import GateE2EConfig, MixtureScaler, finetune_gate, top_k_weights


def test_top_k_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    weights = top_k_weights(logits, 2, 1.0)
    assert weights[0, 2] == 0 and weights[0, :2].sum() == pytest.approx(1.0)
    assert weights[0, 0] == pytest.approx(torch.softmax(torch.tensor([2.0, 1.0]), 0)[0].item())
    assert top_k_weights(logits, 1, 0.5)[1].tolist() == [0.0, 0.0, 1.0]


def test_hooked_per_example_mixtures_equal_composites(tiny_student):
    adapters = [random_adapter(tiny_student, r=r, seed=s, std=0.3) for s, r in ((1, 4), (2, 2))]
    unit = compose_exact(adapters, [1.0, 1.0])
    model, _ = mixed_student(tiny_student, unit, "float32", "cpu")
    scaler = MixtureScaler(model, list(unit.modules()), [4, 2])
    weights = torch.tensor([[0.8, 0.2], [-0.5, 1.5]])  # [B, E]
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))  # [B, T]
    scaler.set_weights(weights)
    with torch.no_grad():
        hooked = model(input_ids=ids).logits  # [B, T, V]
    scaler.remove()
    for b in range(2):
        reference, _ = mixed_student(tiny_student, compose_exact(adapters, weights[b].tolist()), "float32", "cpu")
        with torch.no_grad():
            expected = reference(input_ids=ids[b:b + 1]).logits[0]  # [T, V]
        torch.testing.assert_close(hooked[b], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_lm_loss_alone_teaches_a_poor_gate_to_route(tmp_path, tiny_student, data_dir):
    from training.distill import DistillConfig, distill
    from training.gate import GateTrainConfig, train_gate

    bundle = tmp_path / "bundle"
    for task in ("last_letter_concatenation", "single_eq"):
        distill(DistillConfig(task=task, student=str(tiny_student), data_dir=str(data_dir), subsample=32, r=4,
                              lora_alpha=8, lr=2e-2, max_steps=20, batch_size=4, max_length=384, lora_dropout=0.0,
                              checkpoint_every=1000, work_dir=str(tmp_path / task), bundle=str(bundle), progress=False))
    # a barely trained gate: close to chance on held-out prompts
    train_gate(GateTrainConfig(bundle=str(bundle), student=str(tiny_student), data_dir=str(data_dir),
                               max_per_task=40, steps=5, hidden_dim=0, lr=1e-4))
    start = read_manifest(bundle).gate.report["routing_accuracy"]
    report = finetune_gate(GateE2EConfig(bundle=str(bundle), student=str(tiny_student), data_dir=str(data_dir),
                                         per_task=16, val_per_task=6, steps=20, lr=3e-2, max_length=384))
    e2e = report["end_to_end"]
    assert e2e["after"]["lm_loss"] < e2e["before"]["lm_loss"], e2e
    assert report["routing_accuracy"] > start + 0.2, (start, report["routing_accuracy"])
    assert report["classification"]["routing_accuracy"] == start
    loaded = load_bundle(bundle, student=tiny_student, strict=True)
    assert read_manifest(bundle).gate.report["end_to_end"]["after"] == e2e["after"]
    assert loaded.gate is not None

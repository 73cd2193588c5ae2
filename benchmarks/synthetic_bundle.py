"""Bundles of synthetic experts of the real student's shape, for throughput benchmarks.

A throughput run with `ignore_eos` makes the same number of tokens whatever the weights say, so random
experts of the right shape (rank, target modules, the student's layer sizes) cost what trained ones do.
Two shapes:

  - `--like-residual`: the residual bundle as training/recipes/residual_experts.py leaves it: the ten seen
    tasks' experts (rank `--rank`, all linear modules) as residuals over a shared adapter (`--shared`,
    all_data: copied in and marked `manifest.shared`), routed by the default bundle's gate (copied);
  - otherwise `--experts N` experts expert-000 ... with a random top-2 gate over them (the student's hidden
    size as features), for the many-experts table.

    python -m benchmarks.synthetic_bundle OUT --like-residual [--rank 16]
    python -m benchmarks.synthetic_bundle OUT --experts 100 [--rank 8]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mode_cotd.architecture import ATTENTION_MODULES, MLP_MODULES, architecture_of
from mode_cotd.bundle import add_expert, create_bundle, load_bundle, set_gate, set_shared
from mode_cotd.student import resolve_student, student_identity
from mode_cotd.tasks import SEEN_TASKS
from mode_cotd.tiny import random_adapter, random_gate

ALL_LINEAR = (*ATTENTION_MODULES, *MLP_MODULES)
STD = 0.01
"""Entries of A and B: small, so that a mixture of them leaves the student's outputs readable."""


def synthetic_bundle(root: Path, student: Path, names: list[str], rank: int, shared: Path | None = None,
                     gate_from: Path | None = None) -> Path:
    """A bundle at `root` of random experts `names` (rank `rank`, every linear module), optionally over the
    shared adapter folder `shared` and with the gate of the bundle `gate_from` (else a random top-2 gate)."""
    if (root / "manifest.json").exists():
        raise SystemExit(f"{root} holds a bundle already")
    create_bundle(root, student_identity(student))
    for seed, name in enumerate(names):
        adapter = random_adapter(student, ALL_LINEAR, r=rank, lora_alpha=2.0 * rank, seed=seed, std=STD)
        add_expert(root, name, adapter, name, {"synthetic": True, "seed": seed})
    if shared is not None:
        add_expert(root, shared.name, shared, shared.name,
                   json.loads((shared / "report.json").read_text()) if (shared / "report.json").is_file() else None)
        set_shared(root, shared.name)
    if gate_from is not None:
        set_gate(root, load_bundle(gate_from, student=student, strict=True).gate, {"copied_from": str(gate_from)})
    else:
        set_gate(root, random_gate(names, grid=0.05, feature_dim=architecture_of(student).hidden_size))
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--like-residual", action="store_true")
    parser.add_argument("--experts", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--shared", type=Path, default=Path("bundles/all_data/experts/all_data"))
    parser.add_argument("--gate-from", type=Path, default=Path("bundles/default"))
    parser.add_argument("--student", default=None)
    args = parser.parse_args(argv)
    student = resolve_student(args.student)
    if args.like_residual:
        synthetic_bundle(args.out, student, list(SEEN_TASKS), args.rank, args.shared, args.gate_from)
    else:
        synthetic_bundle(args.out, student, [f"expert-{i:03d}" for i in range(args.experts)], args.rank)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

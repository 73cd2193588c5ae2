"""Writing a bundle: create it, then add experts, the gate and compositions one part at a time.

Each writer changes one part atomically (its folder first, then manifest.json) and records
the sha256 of every file it wrote; one writer at a time per bundle.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

from mode_cotd.adapter import CONFIG_NAME, WEIGHTS_NAME, LoraAdapter, load_adapter, save_adapter
from mode_cotd.atomic import atomic_dir, write_json_atomic
from mode_cotd.bundle.reader import read_manifest
from mode_cotd.bundle.schema import (
    COMPOSITION_MODES,
    MANIFEST,
    REPORT,
    CompositionRecord,
    ExpertRecord,
    GateRecord,
    Manifest,
    StudentIdentity,
    mixed_ranks,
    resolve_inside,
    shared_in_linear,
)
from mode_cotd.checksums import file_checksums
from mode_cotd.errors import BundleError, ConfigError
from mode_cotd.gate import Gate, save_gate
from mode_cotd.mixture import check_name


def _write_manifest(root: Path, manifest: Manifest) -> None:
    write_json_atomic(root / MANIFEST, manifest.to_dict())


def _json_object(report: Any, what: str) -> dict | None:
    if report is None:
        return None
    if not isinstance(report, dict):
        raise ConfigError(f"{what} must be a JSON object (dict), got {type(report).__name__}")
    try:
        json.dumps(report, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what} is not plain JSON ({e})") from e
    return report


def create_bundle(root: str | Path, student_identity: dict | StudentIdentity, exist_ok: bool = False) -> Path:
    """Start an empty bundle at `root` for the student identified by {"name", "config_sha256"}."""
    root = Path(root)
    if (root / MANIFEST).exists():
        if exist_ok:
            read_manifest(root)
            return root
        raise BundleError(f"{root / MANIFEST}: a bundle already exists here")
    if isinstance(student_identity, StudentIdentity):
        student_identity = dataclasses.asdict(student_identity)
    student = StudentIdentity.from_dict(student_identity, "student identity")
    root.mkdir(parents=True, exist_ok=True)
    _write_manifest(root, Manifest(student=student))
    return root


def add_expert(
    root: str | Path, name: str, adapter: str | Path | LoraAdapter, task: str, report: dict | None = None
) -> ExpertRecord:
    """Copy a PEFT folder (or save a LoraAdapter) into experts/<name>/, with report.json; update the manifest.

    An expert of the same name is replaced. The folder is written atomically, then manifest.json.
    """
    root = Path(root)
    check_name(name, "expert")
    if not isinstance(task, str) or not task:
        raise ConfigError(f"expert {name!r}: task must be a non-empty string")
    report = _json_object(report, f"expert {name!r} report")
    manifest = read_manifest(root)
    loaded = adapter if isinstance(adapter, LoraAdapter) else load_adapter(adapter)
    relative = f"experts/{name}"
    target = resolve_inside(root, relative)
    with atomic_dir(target) as tmp:
        if isinstance(adapter, LoraAdapter):
            save_adapter(adapter, tmp)
        else:
            for file in (CONFIG_NAME, WEIGHTS_NAME):
                shutil.copyfile(Path(adapter) / file, tmp / file)
        if report is not None:
            (tmp / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        files = file_checksums(tmp)
    record = ExpertRecord(
        task=task,
        path=relative,
        r=loaded.r,
        lora_alpha=float(loaded.lora_alpha),
        target_modules=sorted(loaded.target_modules),
        files=files,
    )
    manifest.experts[name] = record
    _write_manifest(root, manifest)
    return record


def set_gate(root: str | Path, gate: Gate, report: dict | None = None) -> GateRecord:
    """Save `gate` into gate/ and record it; every expert it routes to must be in the bundle."""
    root = Path(root)
    report = _json_object(report, "gate report")
    manifest = read_manifest(root)
    unknown = sorted(set(gate.config.experts) - set(manifest.experts))
    if unknown:
        raise ConfigError(f"gate routes to experts not in the bundle {root}: {unknown}")
    folder = save_gate(gate, resolve_inside(root, "gate"))
    manifest.gate = GateRecord(files=file_checksums(folder), report=report)
    _write_manifest(root, manifest)
    return manifest.gate


def set_shared(root: str | Path, name: str | None) -> None:
    """Make the bundle's expert `name` its shared adapter (applied at weight 1 under every adapter route), or
    none with None. The gate must not route to it: it is always on."""
    root = Path(root)
    manifest = read_manifest(root)
    if name is not None and name not in manifest.experts:
        raise ConfigError(f"shared adapter {name!r} is not an expert of the bundle {root}: {sorted(manifest.experts)}")
    for composition, record in manifest.compositions.items():
        why = shared_in_linear(record.mode, record.weights, name)
        if why:
            raise ConfigError(f"composition {composition!r}: {why}")
    manifest.shared = name
    _write_manifest(root, manifest)


def add_composition(
    root: str | Path, name: str, weights: dict[str, float], mode: str, task: str, report: dict | None = None
) -> CompositionRecord:
    """Record a named composition {expert: weight} of experts already in the bundle."""
    root = Path(root)
    check_name(name, "composition")
    manifest = read_manifest(root)
    if not isinstance(weights, dict) or not weights:
        raise ConfigError(f"composition {name!r}: weights must be a non-empty {{expert: weight}}")
    for expert, w in weights.items():
        if expert not in manifest.experts:
            raise ConfigError(
                f"composition {name!r} names unknown expert {expert!r}; known: {sorted(manifest.experts)}"
            )
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(
                f"composition {name!r}: weight for {expert!r} must be a finite number, got {w!r}"
            )
    if mode not in COMPOSITION_MODES:
        raise ConfigError(f"composition {name!r}: mode must be one of {COMPOSITION_MODES}, got {mode!r}")
    mixed = shared_in_linear(mode, weights, manifest.shared) or mixed_ranks(mode, weights, manifest.experts)
    if mixed:
        raise ConfigError(f"composition {name!r}: {mixed}")
    if not isinstance(task, str) or not task:
        raise ConfigError(f"composition {name!r}: task must be a non-empty string")
    record = CompositionRecord(
        weights={e: float(w) for e, w in weights.items()},
        mode=mode,
        task=task,
        report=_json_object(report, f"composition {name!r} report"),
    )
    manifest.compositions[name] = record
    _write_manifest(root, manifest)
    return record

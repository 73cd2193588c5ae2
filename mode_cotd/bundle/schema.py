"""The bundle's manifest.json: its records, their validation, and the rules for paths inside a bundle.

Every parse error is a BundleError naming the manifest file and the entry at fault.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from mode_cotd.errors import BundleError
from mode_cotd.mixture import check_name

SCHEMA_VERSION = 1
"""The manifest schema this code writes and reads."""
MANIFEST = "manifest.json"
REPORT = "report.json"
COMPOSITION_MODES = ("exact", "linear")
"""exact: one LoRA of rank Σrᵢ computing Σ wᵢ·sᵢ·BᵢAᵢ; linear: the paper's A' = Σ wᵢAᵢ, B' = Σ wᵢBᵢ."""
_SHA256 = re.compile(r"[0-9a-f]{64}")


# ---------------------------------------------------------------------------- manifest records


class _Checker:
    """Field checks for one manifest entry; every error names the manifest file and the entry."""

    def __init__(self, source: str, where: str):
        self.source, self.where = source, where

    def fail(self, problem: str) -> BundleError:
        return BundleError(f"{self.source}: {self.where}: {problem}")

    def keys(self, data: Any, cls: type) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise self.fail(f"expected an object, got {type(data).__name__}")
        fields = dataclasses.fields(cls)
        unknown = sorted(set(data) - {f.name for f in fields})
        if unknown:
            raise self.fail(f"unknown keys {unknown}")
        required = {
            f.name
            for f in fields
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - set(data))
        if missing:
            raise self.fail(f"missing keys {missing}")
        return data

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(f"{key!r} must be a non-empty string, got {value!r}")
        return value

    def number(self, value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(f"{key!r} must be a finite number, got {value!r}")
        return float(value)

    def report(self, value: Any) -> dict | None:
        if value is not None and not isinstance(value, dict):
            raise self.fail(f"'report' must be an object or null, got {type(value).__name__}")
        return value

    def files(self, value: Any) -> dict[str, str]:
        if not isinstance(value, dict):
            raise self.fail("'files' must be an object {relative path: sha256}")
        for name, digest in value.items():
            _check_relative(name, self.fail)
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise self.fail(f"files[{name!r}] must be a lowercase sha256 hex digest, got {digest!r}")
        return dict(value)


def _check_relative(relative: Any, fail) -> str:
    parts = PurePosixPath(relative).parts if isinstance(relative, str) else ()
    if not parts or relative.startswith("/") or "\\" in relative or any(p in ("..", ".") for p in parts):
        raise fail(f"path {relative!r} must be relative, inside the bundle, without '..'")
    return relative


@dataclass
class StudentIdentity:
    """Which student a bundle was built for."""

    name: str
    """Student name (the default student's name, or the model folder's name)."""
    config_sha256: str
    """mode_cotd.architecture.config_sha256 of the student's config.json."""

    @classmethod
    def from_dict(cls, data: Any, source: str) -> StudentIdentity:
        c = _Checker(source, "student")
        c.keys(data, cls)
        if not isinstance(data["config_sha256"], str) or not _SHA256.fullmatch(data["config_sha256"]):
            raise c.fail(f"'config_sha256' must be a sha256 hex digest, got {data['config_sha256']!r}")
        return cls(c.string(data["name"], "name"), data["config_sha256"])


@dataclass
class ExpertRecord:
    """One LoRA expert in the manifest."""

    task: str
    """The task the expert was distilled on."""
    path: str
    """Its folder, relative to the bundle root: always "experts/<name>"."""
    r: int
    """LoRA rank (the largest module rank)."""
    lora_alpha: float
    """LoRA alpha."""
    target_modules: list[str]
    """Short names of the modules it adapts, sorted."""
    files: dict[str, str] = field(default_factory=dict)
    """File path relative to the expert folder -> sha256 hex."""

    @classmethod
    def from_dict(cls, name: str, data: Any, source: str) -> ExpertRecord:
        c = _Checker(source, f"experts.{name}")
        c.keys(data, cls)
        check_name(name, f"{source}: expert", BundleError)
        if data["path"] != f"experts/{name}":
            raise c.fail(f"'path' must be 'experts/{name}', got {data['path']!r}")
        r = data["r"]
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise c.fail(f"'r' must be a positive integer, got {r!r}")
        targets = data["target_modules"]
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise c.fail(f"'target_modules' must be a non-empty list of names, got {targets!r}")
        return cls(
            task=c.string(data["task"], "task"),
            path=data["path"],
            r=r,
            lora_alpha=c.number(data["lora_alpha"], "lora_alpha"),
            target_modules=sorted(targets),
            files=c.files(data.get("files", {})),
        )


@dataclass
class GateRecord:
    """The gate in the manifest."""

    path: str = "gate"
    """Its folder, relative to the bundle root: always "gate"."""
    files: dict[str, str] = field(default_factory=dict)
    """File name -> sha256 hex."""
    report: dict | None = None
    """Training report (free-form JSON object), if any."""

    @classmethod
    def from_dict(cls, data: Any, source: str) -> GateRecord:
        c = _Checker(source, "gate")
        c.keys(data, cls)
        if data.get("path", "gate") != "gate":
            raise c.fail(f"'path' must be 'gate', got {data['path']!r}")
        return cls(files=c.files(data.get("files", {})), report=c.report(data.get("report")))


@dataclass
class CompositionRecord:
    """A named, fixed mixture of experts (e.g. the paper's per-task composition)."""

    weights: dict[str, float]
    """Expert name -> weight (any finite number, negative allowed)."""
    mode: str
    """How experts are combined: one of COMPOSITION_MODES."""
    task: str
    """The task the composition was found for."""
    report: dict | None = None
    """Search report (free-form JSON object), if any."""

    @classmethod
    def from_dict(cls, name: str, data: Any, source: str) -> CompositionRecord:
        c = _Checker(source, f"compositions.{name}")
        c.keys(data, cls)
        check_name(name, f"{source}: composition", BundleError)
        weights = data["weights"]
        if not isinstance(weights, dict) or not weights:
            raise c.fail("'weights' must be a non-empty object {expert: weight}")
        if data["mode"] not in COMPOSITION_MODES:
            raise c.fail(f"'mode' must be one of {COMPOSITION_MODES}, got {data['mode']!r}")
        return cls(
            weights={
                check_name(e, f"{source}: compositions.{name}: expert", BundleError): c.number(
                    w, f"weights.{e}"
                )
                for e, w in weights.items()
            },
            mode=data["mode"],
            task=c.string(data["task"], "task"),
            report=c.report(data.get("report")),
        )


@dataclass
class Manifest:
    """manifest.json: what a bundle holds and which student it fits."""

    student: StudentIdentity
    """The student the experts were trained on."""
    experts: dict[str, ExpertRecord] = field(default_factory=dict)
    """Expert name -> record."""
    gate: GateRecord | None = None
    """The gate, if trained."""
    compositions: dict[str, CompositionRecord] = field(default_factory=dict)
    """Composition name -> record."""
    shared: str | None = None
    """An expert applied at weight 1 under every adapter route (gate mixtures, experts, compositions): the
    shared adapter that the other experts were trained over as residuals; None: no shared adapter."""
    schema_version: int = SCHEMA_VERSION
    """Format version; this code reads only SCHEMA_VERSION."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = MANIFEST) -> Manifest:
        c = _Checker(source, "manifest")
        if not isinstance(data, dict):
            raise c.fail("expected a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION or isinstance(version, bool):
            raise BundleError(
                f"{source}: unknown schema version {version!r} (this mode-cotd reads {SCHEMA_VERSION})"
            )
        c.keys(data, cls)
        for key in ("experts", "compositions"):
            if not isinstance(data.get(key, {}), dict):
                raise c.fail(f"{key!r} must be an object")
        gate = data.get("gate")
        shared = data.get("shared")
        if shared is not None and (not isinstance(shared, str) or shared not in data.get("experts", {})):
            raise c.fail(f"'shared' must name one of the bundle's experts, got {shared!r}")
        return cls(
            student=StudentIdentity.from_dict(data["student"], source),
            experts={n: ExpertRecord.from_dict(n, e, source) for n, e in data.get("experts", {}).items()},
            gate=None if gate is None else GateRecord.from_dict(gate, source),
            compositions={
                n: CompositionRecord.from_dict(n, x, source) for n, x in data.get("compositions", {}).items()
            },
            shared=shared,
        )


# ---------------------------------------------------------------------------- shared by writer and reader


def resolve_inside(root: Path, relative: str) -> Path:
    """root / relative; refuses absolute paths, '..', symlinks on the way, anything resolving outside root."""
    _check_relative(relative, lambda problem: BundleError(f"{root}: {problem}"))
    path = root
    for part in PurePosixPath(relative).parts:
        path = path / part
        if path.is_symlink():
            raise BundleError(f"{path}: symlinks are refused inside a bundle")
    if not path.resolve().is_relative_to(root.resolve()):
        raise BundleError(f"{path}: resolves outside the bundle root {root}")
    return path


def mixed_ranks(mode: str, weights: dict[str, float], experts: dict[str, ExpertRecord]) -> str | None:
    """Why a linear composition cannot be built (the paper's merge needs one shared rank), or None."""
    ranks = {e: experts[e].r for e in weights if e in experts}
    if mode == "linear" and len(set(ranks.values())) > 1:
        return f"linear mixing needs experts of one rank, got ranks {ranks}; use mode 'exact'"
    return None


def shared_in_linear(mode: str, weights: dict[str, float], shared: str | None) -> str | None:
    """Why a composition cannot be served in a bundle with a shared adapter, or None. A linear composition
    is served as the shared adapter, exactly, plus the linear merge of its experts (mode_cotd.mixing.mix), so it
    may not weigh the shared adapter itself (its cross terms with the others would change it)."""
    if mode == "linear" and shared is not None and shared in weights:
        return (f"a linear composition may not weigh the shared adapter {shared!r}: it is added exactly on top of "
                "the merge")
    return None

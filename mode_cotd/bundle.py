"""The bundle: the folder that training writes and serving reads.

    <root>/manifest.json            schema version, student identity, experts, gate, compositions
    <root>/experts/<name>/          PEFT LoRA folder (adapter_config.json, adapter_model.safetensors)
                                    plus an optional report.json
    <root>/gate/                    gate.safetensors + gate_config.json

Every file the manifest lists carries its sha256. Loading validates everything and raises
BundleError naming the file at fault; with strict=False a bad expert is reported in
`Bundle.problems` and skipped, and the gate or compositions that need it are dropped.
Writers change one part at a time, each atomically (folder first, then manifest.json);
one writer at a time per bundle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from mode_cotd.adapter import (
    CONFIG_NAME,
    PICKLE_SUFFIXES,
    WEIGHTS_NAME,
    LoraAdapter,
    load_adapter,
    save_adapter,
)
from mode_cotd.architecture import Architecture, architecture_of, config_sha256, read_config
from mode_cotd.atomic import atomic_dir, write_json_atomic
from mode_cotd.errors import BundleError, ConfigError
from mode_cotd.gate import GATE_CONFIG, Gate, check_name, load_gate, save_gate

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
        return cls(
            student=StudentIdentity.from_dict(data["student"], source),
            experts={n: ExpertRecord.from_dict(n, e, source) for n, e in data.get("experts", {}).items()},
            gate=None if gate is None else GateRecord.from_dict(gate, source),
            compositions={
                n: CompositionRecord.from_dict(n, x, source) for n, x in data.get("compositions", {}).items()
            },
        )


# ---------------------------------------------------------------------------- paths and files


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


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _checksums(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def verify_folder(
    root: Path, relative: str, files: dict[str, str], required: tuple[str, ...], manifest: Path
) -> Path:
    """Check a listed folder: inside root, no symlinks or pickles, required files listed, checksums right."""
    folder = resolve_inside(root, relative)
    if not folder.is_dir():
        raise BundleError(f"{folder}: folder listed in {manifest} is missing")
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            raise BundleError(f"{p}: symlinks are refused inside a bundle")
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise BundleError(f"{p}: pickled weights are refused; use safetensors")
    for name in required:
        if name not in files:
            raise BundleError(f"{folder / name}: not listed with a checksum in {manifest}")
    for name, expected in files.items():
        path = resolve_inside(folder, name)
        if not path.is_file():
            raise BundleError(f"{path}: missing (listed in {manifest})")
        actual = _sha256(path)
        if actual != expected:
            raise BundleError(
                f"{path}: checksum mismatch (sha256 {actual[:16]}…, {manifest} says {expected[:16]}…)"
            )
    return folder


# ---------------------------------------------------------------------------- writing


def read_manifest(root: str | Path) -> Manifest:
    """Parse and validate <root>/manifest.json (its own fields only; files are checked by load_bundle)."""
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"{root}: bundle folder not found")
    path = root / MANIFEST
    if path.is_symlink():
        raise BundleError(f"{path}: symlinks are refused inside a bundle")
    if not path.is_file():
        raise BundleError(f"{path}: missing manifest")

    def reject_constant(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=reject_constant)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BundleError(f"{path}: bad JSON ({e})") from e
    return Manifest.from_dict(data, str(path))


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
        files = _checksums(tmp)
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
    manifest.gate = GateRecord(files=_checksums(folder), report=report)
    _write_manifest(root, manifest)
    return manifest.gate


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
    mixed = _mixed_ranks(mode, weights, manifest.experts)
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


def _mixed_ranks(mode: str, weights: dict[str, float], experts: dict[str, ExpertRecord]) -> str | None:
    """Why a linear composition cannot be built (the paper's merge needs one shared rank), or None."""
    ranks = {e: experts[e].r for e in weights if e in experts}
    if mode == "linear" and len(set(ranks.values())) > 1:
        return f"linear mixing needs experts of one rank, got ranks {ranks}; use mode 'exact'"
    return None


# ---------------------------------------------------------------------------- reading


@dataclass
class ExpertEntry:
    """A validated expert of a loaded bundle."""

    name: str
    """Expert name."""
    path: Path
    """Its PEFT folder (what peft and vLLM load)."""
    record: ExpertRecord
    """Its manifest record."""

    def load(self) -> LoraAdapter:
        """The adapter's weights, read from `path`."""
        return load_adapter(self.path)


@dataclass
class Bundle:
    """A loaded, validated bundle."""

    root: Path
    """The bundle folder."""
    manifest: Manifest
    """The parsed manifest.json."""
    experts: dict[str, ExpertEntry]
    """Experts that passed validation."""
    gate: Gate | None
    """The loaded gate, if the bundle has one and it passed validation."""
    compositions: dict[str, CompositionRecord]
    """Compositions whose experts all loaded."""
    problems: list[str] = field(default_factory=list)
    """What was skipped and why (non-empty only with strict=False)."""


def _check_expert(
    root: Path,
    name: str,
    record: ExpertRecord,
    manifest: Path,
    arch: Architecture | None,
    max_rank: int | None,
) -> ExpertEntry:
    folder = verify_folder(root, record.path, record.files, (CONFIG_NAME, WEIGHTS_NAME), manifest)
    adapter = load_adapter(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    found = (adapter.r, float(adapter.lora_alpha), sorted(adapter.target_modules))
    listed = (record.r, record.lora_alpha, record.target_modules)
    if found != listed:
        raise BundleError(
            f"{config_path}: (r, lora_alpha, target_modules) = {found}, but {manifest} says {listed}"
        )
    if max_rank is not None and adapter.r > max_rank:
        raise BundleError(f"{config_path}: rank r={adapter.r} exceeds max_lora_rank={max_rank}")
    if arch is not None:
        unknown = sorted(set(adapter.target_modules) - set(arch.linear_modules))
        if unknown:
            raise BundleError(
                f"{config_path}: target modules {unknown} do not exist in the {arch.model_type} student"
            )
        for module, (a, b) in adapter.modules().items():
            try:
                in_features, out_features = arch.module_shape(module)
            except ConfigError as e:
                raise BundleError(f"{weights_path}: {e}") from e
            if tuple(a.shape) != (adapter.r, in_features) or tuple(b.shape) != (out_features, adapter.r):
                raise BundleError(
                    f"{weights_path}: module {module} has lora_A {list(a.shape)}, lora_B {list(b.shape)}; "
                    f"the student needs A [r, {in_features}] and B [{out_features}, r] with r={adapter.r}"
                )
    return ExpertEntry(name=name, path=folder, record=record)


def _check_gate(
    root: Path, record: GateRecord, manifest: Manifest, manifest_path: Path, arch: Architecture | None
) -> Gate:
    folder = verify_folder(root, record.path, record.files, (GATE_CONFIG, "gate.safetensors"), manifest_path)
    gate = load_gate(folder)
    unknown = sorted(set(gate.config.experts) - set(manifest.experts))
    if unknown:
        raise BundleError(f"{folder / GATE_CONFIG}: routes to experts not in {manifest_path}: {unknown}")
    if (
        arch is not None
        and gate.config.featuriser == "embedding_mean"
        and gate.config.feature_dim != arch.hidden_size
    ):
        raise BundleError(
            f"{folder / GATE_CONFIG}: feature_dim {gate.config.feature_dim} does not match the student's "
            f"hidden size {arch.hidden_size}"
        )
    return gate


def load_bundle(
    root: str | Path,
    student: str | Path | dict | None = None,
    strict: bool = True,
    max_lora_rank: int | None = None,
) -> Bundle:
    """Read and validate a bundle.

    `student` (a model folder, config.json path or config dict) enables the checks that the
    bundle was built for it and that every expert's modules and shapes fit it.
    `max_lora_rank` refuses experts of a larger rank (e.g. the serving engine's limit).
    strict=True raises BundleError naming the file at the first fault; strict=False skips
    bad experts (and the gate or compositions that need them) and lists why in `problems`.
    """
    root = Path(root)
    manifest_path = root / MANIFEST
    manifest = read_manifest(root)
    problems: list[str] = []

    def fault(error: BundleError) -> None:
        if strict:
            raise error
        problems.append(str(error))

    arch = None
    if student is not None:
        config, label = read_config(student)
        arch = architecture_of(config)
        digest = config_sha256(config)
        if digest != manifest.student.config_sha256:
            fault(
                BundleError(
                    f"{manifest_path}: built for student {manifest.student.name!r} (config sha256 "
                    f"{manifest.student.config_sha256[:16]}…), not for {label} ({digest[:16]}…)"
                )
            )

    experts: dict[str, ExpertEntry] = {}
    for name, record in manifest.experts.items():
        try:
            experts[name] = _check_expert(root, name, record, manifest_path, arch, max_lora_rank)
        except BundleError as e:
            fault(e)

    gate = None
    if manifest.gate is not None:
        try:
            gate = _check_gate(root, manifest.gate, manifest, manifest_path, arch)
            skipped = sorted(set(gate.config.experts) - set(experts))
            if skipped:
                gate = None
                problems.append(f"{root / 'gate'}: gate dropped, it routes to skipped experts {skipped}")
        except BundleError as e:
            fault(e)

    compositions: dict[str, CompositionRecord] = {}
    for name, record in manifest.compositions.items():
        unknown = sorted(set(record.weights) - set(manifest.experts))
        if unknown:
            fault(BundleError(f"{manifest_path}: composition {name!r} names unknown experts {unknown}"))
            continue
        mixed = _mixed_ranks(record.mode, record.weights, manifest.experts)
        if mixed:
            fault(BundleError(f"{manifest_path}: composition {name!r}: {mixed}"))
            continue
        skipped = sorted(set(record.weights) - set(experts))
        if skipped:
            problems.append(
                f"{manifest_path}: composition {name!r} dropped, it needs skipped experts {skipped}"
            )
            continue
        compositions[name] = record
    return Bundle(
        root=root, manifest=manifest, experts=experts, gate=gate, compositions=compositions, problems=problems
    )

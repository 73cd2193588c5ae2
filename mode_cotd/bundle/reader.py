"""Reading a bundle: parse manifest.json, verify every listed file, and load what passes.

load_bundle raises BundleError naming the file at fault; with strict=False a bad expert is
reported in `Bundle.problems` and skipped, and the gate or compositions that need it are dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mode_cotd.adapter import CONFIG_NAME, PICKLE_SUFFIXES, WEIGHTS_NAME, LoraAdapter, load_adapter
from mode_cotd.architecture import Architecture, architecture_of, config_sha256, read_config
from mode_cotd.bundle.schema import (
    MANIFEST,
    CompositionRecord,
    ExpertRecord,
    GateRecord,
    Manifest,
    mixed_ranks,
    resolve_inside,
    shared_in_linear,
)
from mode_cotd.checksums import sha256_file
from mode_cotd.errors import BundleError, ConfigError
from mode_cotd.gate import GATE_CONFIG, Gate, load_gate


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
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(
                f"{path}: checksum mismatch (sha256 {actual[:16]}…, {manifest} says {expected[:16]}…)"
            )
    return folder


# ---------------------------------------------------------------------------- loading


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

    @property
    def shared(self) -> str | None:
        """The shared adapter's expert name (manifest.shared), applied at weight 1 under every adapter route."""
        return self.manifest.shared


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
    found = (adapter.r, float(adapter.lora_alpha), sorted(adapter.target_modules))
    listed = (record.r, record.lora_alpha, record.target_modules)
    if found != listed:
        raise BundleError(
            f"{folder / CONFIG_NAME}: (r, lora_alpha, target_modules) = {found}, but {manifest} says {listed}"
        )
    check_adapter_fits(adapter, folder, arch, max_rank)
    return ExpertEntry(name=name, path=folder, record=record)


def check_adapter_fits(adapter: LoraAdapter, folder: Path, arch: Architecture | None, max_rank: int | None) -> None:
    """BundleError naming the file unless `adapter` (read from `folder`) fits the student `arch` (target modules
    that exist, A [r, in] and B [out, r] of each module's shape) and has rank at most `max_rank`."""
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if max_rank is not None and adapter.r > max_rank:
        raise BundleError(f"{config_path}: rank r={adapter.r} exceeds max_lora_rank={max_rank}")
    if arch is None:
        return
    unknown = sorted(set(adapter.target_modules) - set(arch.linear_modules))
    if unknown:
        raise BundleError(f"{config_path}: target modules {unknown} do not exist in the {arch.model_type} student")
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

    if manifest.shared is not None and manifest.shared not in experts:
        raise BundleError(f"{manifest_path}: the shared adapter {manifest.shared!r} did not load; every adapter "
                          f"route needs it ({'; '.join(problems) or 'see above'})")
    if gate is not None and manifest.shared in gate.config.experts:
        fault(BundleError(f"{manifest_path}: the gate routes to the shared adapter {manifest.shared!r}, which is "
                          "always on"))
        gate = None
    if gate is not None and gate.config.abstain_to not in (None, manifest.shared):
        fault(BundleError(f"{manifest_path}: the gate abstains to {gate.config.abstain_to!r}, which is not the "
                          f"bundle's shared adapter ({manifest.shared!r})"))
        gate = None

    compositions: dict[str, CompositionRecord] = {}
    for name, record in manifest.compositions.items():
        unknown = sorted(set(record.weights) - set(manifest.experts))
        if unknown:
            fault(BundleError(f"{manifest_path}: composition {name!r} names unknown experts {unknown}"))
            continue
        mixed = (shared_in_linear(record.mode, record.weights, manifest.shared)
                 or mixed_ranks(record.mode, record.weights, manifest.experts))
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

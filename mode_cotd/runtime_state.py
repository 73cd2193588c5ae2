"""Routes added while the server runs: a state folder beside the bundle, shared by every replica.

    <state>/state.json                    {"format": 1, "version": N, "experts": {name: {...}},
                                           "compositions": {name: {...}}}
    <state>/experts/<name>-<digest12>/    adapter_config.json + adapter_model.safetensors, copied in
    <state>/jobs/<job id>.json            progress / result documents of runtime jobs (JSON objects)
    <state>/.lock                         fcntl.flock lock, held by every read-modify-write of state.json

The bundle stays immutable; the state folder is never inside it, nor it inside the state folder.
digest12 is the first 12 hex digits of sha256 over the two files' sha256s, so an expert re-loaded
under its old name with new weights gets a new folder and a new LoRA name (`runtime-<name>-<digest12>`),
hence a new vLLM LoRA id. Every file is written atomically (temp + rename) and each change adds one to
`version`: readers see the old state.json or the new one, and writers in several processes never lose
an update. Removing an expert keeps its folder (requests in flight on other replicas may still load it);
`collect_garbage`, at server start, deletes the folders state.json no longer names. `export_bundle`
writes the bundle plus these routes as a new bundle.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mode_cotd.adapter import CONFIG_NAME, PICKLE_SUFFIXES, WEIGHTS_NAME, LoraAdapter
from mode_cotd.atomic import atomic_dir, write_json_atomic
from mode_cotd.bundle import COMPOSITION_MODES, load_bundle, read_manifest, writer
from mode_cotd.checksums import file_checksums, sha256_file
from mode_cotd.errors import BundleError, ConfigError
from mode_cotd.mixture import check_name

FORMAT = 1
"""state.json's format number."""
STATE, LOCK = "state.json", ".lock"
FILES = (CONFIG_NAME, WEIGHTS_NAME)
"""The files of a runtime expert's folder."""
EXPERT_KEYS = ("digest", "r", "lora_alpha", "target_modules", "files", "source", "added")
"""The keys of an expert's entry in state.json (its folder and LoRA name follow from its name and digest)."""
COMPOSITION_KEYS = ("weights", "mode", "task", "report", "added")
"""The keys of a composition's entry in state.json."""
_SHA256 = re.compile(r"[0-9a-f]{64}")


def folder_digest(files: dict[str, str]) -> str:
    """First 12 hex digits of sha256 over the files' sha256 hex digests, taken in file-name order."""
    return hashlib.sha256("".join(files[f] for f in sorted(files)).encode()).hexdigest()[:12]


def _number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


@dataclass(frozen=True)
class RuntimeExpert:
    """A LoRA expert added while the server runs."""

    name: str
    """Expert name."""
    path: Path
    """Absolute path of its folder, <state>/experts/<name>-<digest12>."""
    lora_name: str
    """`runtime-<name>-<digest12>`: new weights under an old name get a new LoRA name, hence a new vLLM id."""
    r: int
    """LoRA rank."""
    lora_alpha: float
    """LoRA alpha."""
    target_modules: list[str]
    """Short names of the modules it adapts, sorted."""
    files: dict[str, str]
    """adapter_config.json and adapter_model.safetensors -> sha256."""
    source: str
    """Where it was loaded from."""
    added: float
    """When it was added (unix time)."""

    def to_dict(self) -> dict:
        """Its entry in state.json."""
        return {"digest": folder_digest(self.files), **{k: getattr(self, k) for k in EXPERT_KEYS[1:]}}


@dataclass(frozen=True)
class RuntimeComposition:
    """A named composition (weights over bundle or runtime experts) added while the server runs."""

    name: str
    """Composition name."""
    weights: dict[str, float]
    """Expert -> weight."""
    mode: str
    """One of mode_cotd.bundle.COMPOSITION_MODES."""
    task: str
    """The task it is meant for."""
    report: dict | None
    """Free-form JSON object (e.g. how it was found), or None."""
    added: float
    """When it was added (unix time)."""

    def to_dict(self) -> dict:
        """Its entry in state.json."""
        return {k: getattr(self, k) for k in COMPOSITION_KEYS}


@dataclass(frozen=True)
class RuntimeSnapshot:
    """state.json as parsed at one moment (do not mutate: it is cached)."""

    version: int
    """Grows by one per change; 0 while there is no state.json."""
    experts: dict[str, RuntimeExpert]
    """Runtime experts by name."""
    compositions: dict[str, RuntimeComposition]
    """Runtime compositions by name."""


def _is_name(v: Any) -> bool:
    try:
        return check_name(v, "name") == v
    except ConfigError:
        return False


_RULES: dict[str, tuple[Callable[[Any], Any], str]] = {
    "digest": (lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{12}", v), "12 hex digits"),
    "r": (lambda v: type(v) is int and v > 0, "a positive integer"),
    "lora_alpha": (lambda v: _number(v) and v != 0, "a non-zero number"),
    "target_modules": (lambda v: isinstance(v, list) and v and all(isinstance(m, str) for m in v)
                       and v == sorted(v), "a sorted non-empty list of module names"),
    "files": (lambda v: isinstance(v, dict) and sorted(v) == sorted(FILES)
              and all(isinstance(s, str) and _SHA256.fullmatch(s) for s in v.values()),
              f"{{file: sha256}} for {' and '.join(FILES)}"),
    "source": (lambda v: isinstance(v, str), "a string"),
    "added": (_number, "a number"),
    "weights": (lambda v: isinstance(v, dict) and v and all(map(_is_name, v))
                and all(map(_number, v.values())), "a non-empty {expert name: finite number}"),
    "mode": (lambda v: v in COMPOSITION_MODES, f"one of {COMPOSITION_MODES}"),
    "task": (lambda v: isinstance(v, str) and v, "a non-empty string"),
    "report": (lambda v: v is None or isinstance(v, dict), "an object or null"),
    "format": (lambda v: type(v) is int and v == FORMAT, str(FORMAT)),
    "version": (lambda v: type(v) is int and v > 0, "a positive integer"),
    "experts": (lambda v: isinstance(v, dict) and all(map(_is_name, v)), "an object keyed by names"),
    "compositions": (lambda v: isinstance(v, dict) and all(map(_is_name, v)), "an object keyed by names"),
}
"""The fields of state.json: key -> (check, what a value must be)."""


def _entry(data: Any, keys: tuple[str, ...], path: Path, where: str) -> dict:
    """`data` if it is an object with exactly `keys`, each passing its rule; else BundleError naming it."""
    if not isinstance(data, dict) or set(data) != set(keys):
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise BundleError(f"{path}: {where}: must be an object with exactly the keys {sorted(keys)}; "
                          f"got {got}")
    for key in keys:
        ok, want = _RULES[key]
        if not ok(data[key]):
            raise BundleError(f"{path}: {where}: {key!r} must be {want}, got {data[key]!r}")
    return data


def _parse_expert(name: str, data: Any, path: Path, experts_dir: Path) -> RuntimeExpert:
    d = _entry(data, EXPERT_KEYS, path, f"experts.{name}")
    if d["digest"] != folder_digest(d["files"]):
        raise BundleError(f"{path}: experts.{name}: 'digest' {d['digest']!r} is not its files' "
                          f"{folder_digest(d['files'])!r}")
    folder = f"{name}-{d['digest']}"
    stored = {k: d[k] for k in EXPERT_KEYS[1:]}
    return RuntimeExpert(name, experts_dir / folder, f"runtime-{folder}", **stored)


def _parse(text: bytes, path: Path, experts_dir: Path) -> RuntimeSnapshot:
    def reject(constant: str) -> None:
        raise ValueError(f"{constant} is not valid JSON")

    try:
        data = json.loads(text.decode("utf-8"), parse_constant=reject)
    except (UnicodeDecodeError, ValueError) as e:
        raise BundleError(f"{path}: bad JSON ({e})") from e
    top = _entry(data, ("format", "version", "experts", "compositions"), path, "top level")
    experts = {n: _parse_expert(n, d, path, experts_dir) for n, d in top["experts"].items()}
    compositions = {n: RuntimeComposition(n, **_entry(d, COMPOSITION_KEYS, path, f"compositions.{n}"))
                    for n, d in top["compositions"].items()}
    return RuntimeSnapshot(top["version"], experts, compositions)


def _source_files(source: Path) -> dict[str, str]:
    """sha256 of the adapter files in `source`; ConfigError for a missing folder or file, or pickles."""
    if not source.is_dir():
        raise ConfigError(f"{source}: adapter folder not found")
    for f in sorted(source.iterdir()):
        if f.suffix.lower() in PICKLE_SUFFIXES:
            raise ConfigError(f"{f}: pickled weights are refused; use safetensors")
    for f in FILES:
        if not (source / f).is_file():
            raise ConfigError(f"{source / f}: missing; an adapter folder needs {' and '.join(FILES)}")
    return {f: sha256_file(source / f) for f in FILES}


def _check_composition(name: str, weights: Any, mode: Any, task: Any, report: Any) -> dict[str, float]:
    check_name(name, "composition")
    if not isinstance(weights, dict) or not weights:
        raise ConfigError(f"composition {name!r}: weights must be a non-empty {{expert: weight}}")
    for expert, w in weights.items():
        check_name(expert, f"composition {name!r}: expert")
        if not _number(w):
            raise ConfigError(f"composition {name!r}: weight for {expert!r} must be a finite number, "
                              f"got {w!r}")
    if mode not in COMPOSITION_MODES:
        raise ConfigError(f"composition {name!r}: mode must be one of {COMPOSITION_MODES}, got {mode!r}")
    if not isinstance(task, str) or not task:
        raise ConfigError(f"composition {name!r}: task must be a non-empty string")
    if report is not None and not isinstance(report, dict):
        raise ConfigError(f"composition {name!r}: report must be a JSON object (dict) or None")
    try:
        json.dumps(report, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"composition {name!r}: report is not plain JSON ({e})") from e
    return {e: float(w) for e, w in weights.items()}


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


class RuntimeState:
    """The state folder of runtime experts, compositions and jobs, beside the bundle at `bundle_root`."""

    def __init__(self, folder: str | Path, bundle_root: str | Path):
        self.folder, self.bundle_root = Path(folder).absolute(), Path(bundle_root).absolute()
        if _inside(self.folder, self.bundle_root) or _inside(self.bundle_root, self.folder):
            raise ConfigError(f"runtime state folder {self.folder} must be beside the bundle "
                              f"{self.bundle_root}: not the same folder, inside it or around it")
        self.experts_dir, self.jobs_dir = self.folder / "experts", self.folder / "jobs"
        self._cache: tuple[tuple[int, int, int], RuntimeSnapshot] | None = None

    def snapshot(self) -> RuntimeSnapshot:
        """state.json as it is now (parsed again only when its mtime, size or inode changed)."""
        path = self.folder / STATE
        try:
            f = path.open("rb")
        except FileNotFoundError:
            return RuntimeSnapshot(0, {}, {})
        with f:
            st = os.fstat(f.fileno())
            key = (st.st_mtime_ns, st.st_size, st.st_ino)
            if self._cache is None or self._cache[0] != key:
                self._cache = (key, _parse(f.read(), path, self.experts_dir))
        return self._cache[1]

    def version(self) -> int:
        """state.json's version (0 while there is none)."""
        return self.snapshot().version

    @contextlib.contextmanager
    def _locked(self) -> Iterator[RuntimeSnapshot]:
        """Hold the lock (creating the folder); yield state.json as read afresh under it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / LOCK).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._cache = None
            yield self.snapshot()

    def _commit(self, old: RuntimeSnapshot, experts: dict | None = None, compositions: dict | None = None
                ) -> None:
        """Write state.json (under the lock): `old` with the given parts replaced, version + 1."""
        experts = old.experts if experts is None else experts
        compositions = old.compositions if compositions is None else compositions
        write_json_atomic(self.folder / STATE, {
            "format": FORMAT, "version": old.version + 1,
            "experts": {n: e.to_dict() for n, e in experts.items()},
            "compositions": {n: c.to_dict() for n, c in compositions.items()}})

    def add_expert(self, name: str, source: Path, check: Callable[[Path], LoraAdapter]) -> RuntimeExpert:
        """Validate `source` with `check` (which raises the caller's errors), copy it in and record it."""
        check_name(name, "expert")
        source = Path(source)
        if name in self.snapshot().experts:  # fail early; checked again under the lock
            raise ConfigError(f"expert {name!r} is already loaded")
        adapter = check(source)  # first: the caller's errors name the problem in its own terms
        files = _source_files(source)
        digest = folder_digest(files)
        expert = RuntimeExpert(name, self.experts_dir / f"{name}-{digest}", f"runtime-{name}-{digest}",
                               adapter.r, float(adapter.lora_alpha), sorted(adapter.target_modules), files,
                               str(source), time.time())
        with self._locked() as old:
            if name in old.experts:
                raise ConfigError(f"expert {name!r} is already loaded")
            copied = self._copy_in(source, expert)
            try:
                self._commit(old, experts={**old.experts, name: expert})
            except BaseException:
                if copied:
                    shutil.rmtree(expert.path, ignore_errors=True)
                raise
        return expert

    def _copy_in(self, source: Path, expert: RuntimeExpert) -> bool:
        """Copy the files into the expert's folder; False when it already holds them (an earlier load's)."""
        if expert.path.is_dir() and file_checksums(expert.path) == expert.files:
            return False
        with atomic_dir(expert.path) as tmp:
            for f in FILES:
                shutil.copyfile(source / f, tmp / f)
            if file_checksums(tmp) != expert.files:
                raise ConfigError(f"{source}: its files changed while it was being loaded; load it again")
        return True

    def remove_expert(self, name: str) -> RuntimeExpert:
        """Forget a runtime expert no runtime composition uses; its folder stays until collect_garbage."""
        with self._locked() as old:
            if name not in old.experts:
                raise ConfigError(f"no runtime expert {name!r}; runtime experts: {sorted(old.experts)}")
            users = sorted(c for c, comp in old.compositions.items() if name in comp.weights)
            if users:
                raise ConfigError(f"expert {name!r} is used by runtime compositions {users}; "
                                  "remove those first")
            self._commit(old, experts={n: e for n, e in old.experts.items() if n != name})
        return old.experts[name]

    def add_composition(self, name: str, weights: dict[str, float], mode: str, task: str,
                        report: dict | None = None) -> RuntimeComposition:
        """Record a named composition (its experts' existence is the caller's to check)."""
        weights = _check_composition(name, weights, mode, task, report)
        composition = RuntimeComposition(name, weights, mode, task, report, time.time())
        with self._locked() as old:
            if name in old.compositions:
                raise ConfigError(f"composition {name!r} already exists")
            self._commit(old, compositions={**old.compositions, name: composition})
        return composition

    def remove_composition(self, name: str) -> RuntimeComposition:
        """Forget a runtime composition."""
        with self._locked() as old:
            if name not in old.compositions:
                known = sorted(old.compositions)
                raise ConfigError(f"no runtime composition {name!r}; runtime compositions: {known}")
            self._commit(old, compositions={n: c for n, c in old.compositions.items() if n != name})
        return old.compositions[name]

    def collect_garbage(self) -> list[Path]:
        """Delete what state.json does not name under experts/, and leftovers of crashed writes of
        state.json; return the paths deleted. For server start: a replica still serving a removed
        expert would lose its folder."""
        if not self.folder.is_dir():
            return []
        with self._locked() as state:
            keep = {e.path.name for e in state.experts.values()}
            found = sorted(self.experts_dir.iterdir()) if self.experts_dir.is_dir() else []
            doomed = [p for p in found if p.name not in keep] + sorted(self.folder.glob(f".{STATE}.*.tmp"))
            for p in doomed:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        return doomed

    def write_job(self, job_id: str, document: dict) -> None:
        """Write jobs/<job_id>.json atomically."""
        check_name(job_id, "job id")
        if not isinstance(document, dict):
            raise ConfigError(f"job {job_id!r}: the document must be a JSON object (dict)")
        try:
            write_json_atomic(self.jobs_dir / f"{job_id}.json", document)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"job {job_id!r}: the document is not plain JSON ({e})") from e

    def read_job(self, job_id: str) -> dict | None:
        """jobs/<job_id>.json, or None when there is none."""
        path = self.jobs_dir / f"{check_name(job_id, 'job id')}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise BundleError(f"{path}: bad JSON ({e})") from e
        if not isinstance(data, dict):
            raise BundleError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return data

    def list_jobs(self) -> list[str]:
        """Ids of the jobs written, sorted."""
        found = self.jobs_dir.glob("*.json") if self.jobs_dir.is_dir() else []
        return sorted(p.name.removesuffix(".json") for p in found)

    def export_bundle(self, out: Path) -> Path:
        """A new bundle at `out`: the bundle plus the runtime experts and compositions (all or nothing)."""
        out = Path(out).absolute()
        if out.exists() or out.is_symlink():
            raise ConfigError(f"{out}: already exists; export writes a new bundle folder")
        if _inside(out, self.bundle_root) or _inside(out, self.folder):
            raise ConfigError(f"{out}: must be outside the bundle {self.bundle_root} and the state folder "
                              f"{self.folder}")
        state, manifest = self.snapshot(), read_manifest(self.bundle_root)
        for kind, ours, theirs in (("expert", state.experts, manifest.experts),
                                   ("composition", state.compositions, manifest.compositions)):
            clash = sorted(set(ours) & set(theirs))
            if clash:
                raise ConfigError(f"runtime {kind}s {clash} clash with the bundle's {kind}s of those names")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            shutil.copytree(self.bundle_root, tmp, dirs_exist_ok=True)
            for name, e in state.experts.items():
                report = {"source": e.source, "added": e.added}
                writer.add_expert(tmp, name, e.path, task="runtime", report=report)
            for name, c in state.compositions.items():
                writer.add_composition(tmp, name, c.weights, c.mode, c.task, c.report)
            load_bundle(tmp, strict=True)
            os.chmod(tmp, 0o755)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

"""Runtime state folder: experts and compositions added while serving, jobs, garbage, export, concurrency."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch

from mode_cotd import runtime_state
from mode_cotd.adapter import CONFIG_NAME, WEIGHTS_NAME, adapter_from_modules, load_adapter, save_adapter
from mode_cotd.bundle import add_expert, create_bundle, load_bundle, read_manifest
from mode_cotd.errors import BundleError, ConfigError, ModeCotdError
from mode_cotd.runtime_state import RuntimeComposition, RuntimeSnapshot, RuntimeState

IDENTITY = {"name": "tiny", "config_sha256": "0" * 64}


def make_adapter(folder: Path, seed: int = 0, r: int = 4) -> Path:
    """A small PEFT folder (q_proj and v_proj of one 64-wide layer)."""
    g = torch.Generator().manual_seed(seed)
    modules = {
        f"base_model.model.model.layers.0.self_attn.{t}": (torch.randn(r, 64, generator=g),
                                                          torch.randn(64, r, generator=g))
        for t in ("q_proj", "v_proj")
    }
    return save_adapter(adapter_from_modules(modules, r=r, lora_alpha=2.0 * r), folder)


def sha256s(folder: Path) -> dict[str, str]:
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in (CONFIG_NAME, WEIGHTS_NAME)}


def digest12(folder: Path) -> str:
    """First 12 hex of sha256 over the two files' sha256s (adapter_config.json's first)."""
    shas = sha256s(folder)
    return hashlib.sha256((shas[CONFIG_NAME] + shas[WEIGHTS_NAME]).encode()).hexdigest()[:12]


@pytest.fixture
def bundle(tmp_path) -> Path:
    root = create_bundle(tmp_path / "bundle", IDENTITY)
    add_expert(root, "base", make_adapter(tmp_path / "src-base", seed=9), task="addsub")
    return root


@pytest.fixture
def state(tmp_path, bundle) -> RuntimeState:
    return RuntimeState(tmp_path / "state", bundle)


@pytest.fixture
def source(tmp_path) -> Path:
    return make_adapter(tmp_path / "src-a", seed=1)


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# ---------------------------------------------------------------------------- the folder


def test_empty_state_reads_as_version_0_and_creates_nothing(state):
    assert state.snapshot() == RuntimeSnapshot(0, {}, {})
    assert state.version() == 0
    assert state.list_jobs() == [] and state.read_job("j1") is None
    assert state.collect_garbage() == []
    assert not state.folder.exists()


def test_state_folder_must_be_beside_the_bundle(tmp_path, bundle):
    (tmp_path / "link").symlink_to(bundle)
    for folder, root in [(bundle, bundle), (bundle / "runtime", bundle), (tmp_path / "link" / "rt", bundle),
                         (tmp_path, bundle)]:
        with pytest.raises(ConfigError, match="must be beside the bundle"):
            RuntimeState(folder, root)
    assert RuntimeState(tmp_path / "state", bundle).folder == tmp_path / "state"


# ---------------------------------------------------------------------------- experts


def test_add_expert_copies_and_records_it(tmp_path, state, source):
    expert = state.add_expert("alpha", source, load_adapter)
    digest = digest12(source)
    assert expert.path == tmp_path / "state" / "experts" / f"alpha-{digest}"
    assert expert.lora_name == f"runtime-alpha-{digest}"
    assert (expert.r, expert.lora_alpha, expert.target_modules) == (4, 8.0, ["q_proj", "v_proj"])
    assert expert.files == sha256s(source)
    assert expert.source == str(source)
    assert entries(expert.path) == [CONFIG_NAME, WEIGHTS_NAME]
    assert (expert.path / WEIGHTS_NAME).read_bytes() == (source / WEIGHTS_NAME).read_bytes()
    data = json.loads((state.folder / "state.json").read_text())
    assert (data["format"], data["version"], data["experts"]["alpha"]["digest"]) == (1, 1, digest)
    replica = RuntimeState(state.folder, state.bundle_root)  # another replica reads the same state
    assert replica.snapshot() == state.snapshot() and replica.snapshot().experts == {"alpha": expert}


def test_add_expert_refusals_leave_nothing(state, source, tmp_path):
    state.add_expert("alpha", source, load_adapter)
    with pytest.raises(ConfigError, match="expert 'alpha' is already loaded"):
        state.add_expert("alpha", make_adapter(tmp_path / "other", seed=2), load_adapter)
    with pytest.raises(ConfigError, match="not a valid name"):
        state.add_expert("../evil", source, load_adapter)
    pickled = make_adapter(tmp_path / "pickled", seed=3)
    (pickled / "adapter_model.bin").write_bytes(b"x")
    with pytest.raises(ModeCotdError, match=r"adapter_model\.bin: pickled weights are refused"):  # by the check
        state.add_expert("beta", pickled, load_adapter)
    missing = make_adapter(tmp_path / "missing", seed=4)
    (missing / WEIGHTS_NAME).unlink()
    with pytest.raises(ModeCotdError, match=WEIGHTS_NAME):
        state.add_expert("beta", missing, lambda folder: load_adapter(source))  # a check that misses it


    def refuse(folder: Path):
        raise BundleError(f"{folder}: does not fit the student")

    with pytest.raises(BundleError, match="does not fit the student"):
        state.add_expert("beta", make_adapter(tmp_path / "misfit", seed=5), refuse)
    assert state.version() == 1 and list(state.snapshot().experts) == ["alpha"]
    assert entries(state.experts_dir) == [f"alpha-{digest12(source)}"]


def test_a_failed_write_after_the_copy_removes_the_copy(state, source, monkeypatch):
    def fail(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr(runtime_state, "write_json_atomic", fail)
    with pytest.raises(OSError, match="disk full"):
        state.add_expert("alpha", source, load_adapter)
    assert entries(state.experts_dir) == [] and state.version() == 0


def test_reloading_a_name_with_new_weights_gets_a_new_folder_and_lora_name(state, source, tmp_path):
    first = state.add_expert("alpha", source, load_adapter)
    removed = state.remove_expert("alpha")
    assert removed == first and state.version() == 2 and first.path.is_dir()  # in-flight requests may use it
    second = state.add_expert("alpha", make_adapter(tmp_path / "v2", seed=7), load_adapter)
    assert second.lora_name != first.lora_name and second.path != first.path
    assert state.version() == 3 and state.snapshot().experts == {"alpha": second}
    assert state.collect_garbage() == [first.path]
    assert entries(state.experts_dir) == [second.path.name]


def test_reloading_the_same_weights_reuses_the_kept_folder(state, source):
    first = state.add_expert("alpha", source, load_adapter)
    state.remove_expert("alpha")
    again = state.add_expert("alpha", source, load_adapter)
    assert (again.path, again.lora_name) == (first.path, first.lora_name)
    assert entries(state.experts_dir) == [first.path.name]


def test_remove_expert_refusals(state, source):
    with pytest.raises(ConfigError, match="no runtime expert 'alpha'"):
        state.remove_expert("alpha")
    state.add_expert("alpha", source, load_adapter)
    state.add_composition("mix", {"alpha": 0.5, "base": 0.5}, "exact", "svamp")
    with pytest.raises(ConfigError, match=r"expert 'alpha' is used by runtime compositions \['mix'\]"):
        state.remove_expert("alpha")
    assert state.version() == 2
    state.remove_composition("mix")
    state.remove_expert("alpha")
    assert state.version() == 4 and state.snapshot().experts == {}


# ---------------------------------------------------------------------------- compositions


def test_compositions_round_trip_and_versions_grow(state):
    made = state.add_composition("mix", {"a": 1, "b": 0.25}, "linear", "svamp", report={"accuracy": 0.5})
    assert made.weights == {"a": 1.0, "b": 0.25} and isinstance(made.weights["a"], float)
    assert state.add_composition("solo", {"a": -1.5}, "exact", "gsm8k").report is None
    assert state.version() == 2
    assert RuntimeState(state.folder, state.bundle_root).snapshot().compositions == {
        "mix": made, "solo": state.snapshot().compositions["solo"]}
    assert state.remove_composition("mix") == made
    assert state.version() == 3 and list(state.snapshot().compositions) == ["solo"]


@pytest.mark.parametrize(
    "name, weights, mode, task, report, message",
    [
        ("bad/name", {"a": 1.0}, "exact", "t", None, "not a valid name"),
        ("c", {}, "exact", "t", None, "weights must be a non-empty"),
        ("c", [1.0], "exact", "t", None, "weights must be a non-empty"),
        ("c", {"a": True}, "exact", "t", None, "weight for 'a' must be a finite number"),
        ("c", {"a": float("nan")}, "exact", "t", None, "weight for 'a' must be a finite number"),
        ("c", {"a": "0.5"}, "exact", "t", None, "weight for 'a' must be a finite number"),
        ("c", {"a=b": 0.5}, "exact", "t", None, "expert 'a=b' is not a valid name"),
        ("c", {"a": 1.0}, "ties", "t", None, "mode must be one of"),
        ("c", {"a": 1.0}, "exact", "", None, "task must be a non-empty string"),
        ("c", {"a": 1.0}, "exact", "t", [1], "report must be a JSON object"),
        ("c", {"a": 1.0}, "exact", "t", {"x": float("inf")}, "report is not plain JSON"),
    ],
)
def test_add_composition_refusals(state, name, weights, mode, task, report, message):
    with pytest.raises(ConfigError, match=message):
        state.add_composition(name, weights, mode, task, report)
    assert state.version() == 0


def test_composition_names_are_unique(state):
    state.add_composition("mix", {"a": 1.0}, "exact", "t")
    with pytest.raises(ConfigError, match="composition 'mix' already exists"):
        state.add_composition("mix", {"b": 1.0}, "exact", "t")
    with pytest.raises(ConfigError, match="no runtime composition 'other'"):
        state.remove_composition("other")
    assert state.version() == 1 and state.snapshot().compositions["mix"].weights == {"a": 1.0}


# ---------------------------------------------------------------------------- reading state.json


def test_snapshot_is_cached_until_state_json_changes(state):
    state.add_composition("mix", {"a": 1.0}, "exact", "t")
    first = state.snapshot()
    assert state.snapshot() is first
    RuntimeState(state.folder, state.bundle_root).add_composition("two", {"a": 1.0}, "exact", "t")
    assert state.snapshot() is not first and state.version() == 2


def _edit(data: dict, path: list, value) -> dict:
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


@pytest.mark.parametrize(
    "path, value, message",
    [
        (["format"], 2, "'format' must be 1"),
        (["format"], True, "'format' must be 1"),
        (["version"], "3", "'version' must be a positive integer"),
        (["compositions"], KeyError, "top level: must be an object with exactly the keys"),
        (["extra"], 1, "top level: must be an object with exactly the keys"),
        (["experts", "alpha", "digest"], "0" * 12, "experts.alpha: 'digest' '0{12}' is not its files'"),
        (["experts", "alpha", "r"], 0, "experts.alpha: 'r' must be a positive integer"),
        (["experts", "alpha", "files", "extra.json"], "0" * 64, "experts.alpha: 'files' must be"),
        (["experts", "alpha", "source"], KeyError, "experts.alpha: must be an object with exactly the keys"),
        (["compositions", "mix", "mode"], "ties", "compositions.mix: 'mode' must be one of"),
        (["compositions", "mix", "weights"], {"a": None}, "compositions.mix: 'weights' must be"),
        (["compositions", "../x"], {}, "'compositions' must be an object keyed by names"),
    ],
)
def test_a_bad_state_json_names_the_file_and_the_problem(state, source, path, value, message):
    state.add_expert("alpha", source, load_adapter)
    state.add_composition("mix", {"alpha": 1.0}, "exact", "t")
    file = state.folder / "state.json"
    file.write_text(json.dumps(_edit(json.loads(file.read_text()), path, value)))
    with pytest.raises(BundleError, match=message) as caught:
        state.snapshot()
    assert str(caught.value).startswith(f"{file}: ")


@pytest.mark.parametrize("text, message", [("{", "bad JSON"), ('{"format": NaN}', "NaN is not valid JSON"),
                                           ("[]", "top level: must be an object")])
def test_state_json_that_is_not_an_object_is_refused(state, text, message):
    state.folder.mkdir()
    (state.folder / "state.json").write_text(text)
    with pytest.raises(BundleError, match=message):
        state.version()
    with pytest.raises(BundleError, match=message):  # writers refuse to build on it too
        state.add_composition("mix", {"a": 1.0}, "exact", "t")


# ---------------------------------------------------------------------------- garbage, jobs


def test_collect_garbage_deletes_only_what_state_json_does_not_name(state, source):
    kept = state.add_expert("alpha", source, load_adapter)
    stale = [state.experts_dir / "gone-000000000000", state.experts_dir / ".alpha-x.abc123.tmp"]
    for folder in stale:
        folder.mkdir()
        (folder / CONFIG_NAME).write_text("{}")
    leftover = state.folder / ".state.json.xyz.tmp"
    leftover.write_text("{")
    assert sorted(state.collect_garbage()) == sorted([*stale, leftover])
    assert entries(state.experts_dir) == [kept.path.name]
    assert entries(kept.path) == [CONFIG_NAME, WEIGHTS_NAME]
    assert state.collect_garbage() == [] and state.version() == 1


def test_jobs(state):
    state.write_job("job-1", {"status": "running", "progress": 0.5})
    state.write_job("job-0", {"status": "done"})
    state.write_job("job-1", {"status": "done", "result": {"accuracy": 0.75}})
    assert state.list_jobs() == ["job-0", "job-1"]
    assert state.read_job("job-1") == {"status": "done", "result": {"accuracy": 0.75}}
    assert state.read_job("job-2") is None
    assert not [p for p in state.jobs_dir.iterdir() if p.name.startswith(".")]  # no temp files left
    with pytest.raises(ConfigError, match="not a valid name"):
        state.write_job("../x", {})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        state.write_job("job-3", [1])
    with pytest.raises(ConfigError, match="not plain JSON"):
        state.write_job("job-3", {"x": float("nan")})
    assert state.read_job("job-3") is None
    (state.jobs_dir / "job-4.json").write_text("[1]")
    with pytest.raises(BundleError, match="job-4.json: expected a JSON object"):
        state.read_job("job-4")
    (state.jobs_dir / "job-5.json").write_text("{")
    with pytest.raises(BundleError, match="job-5.json: bad JSON"):
        state.read_job("job-5")


# ---------------------------------------------------------------------------- export


def test_export_bundle_loads_strictly(state, source, tmp_path, bundle):
    before = (bundle / "manifest.json").read_text()
    expert = state.add_expert("alpha", source, load_adapter)
    state.add_composition("mix", {"alpha": 0.5, "base": 0.5}, "exact", "svamp", report={"accuracy": 0.5})
    out = state.export_bundle(tmp_path / "exported")
    loaded = load_bundle(out, strict=True)
    assert sorted(loaded.experts) == ["alpha", "base"] and list(loaded.compositions) == ["mix"]
    record = loaded.manifest.experts["alpha"]
    assert (record.task, record.r, record.files[WEIGHTS_NAME]) == ("runtime", 4, expert.files[WEIGHTS_NAME])
    assert json.loads((out / "experts" / "alpha" / "report.json").read_text()) == {
        "source": str(source), "added": expert.added}
    mix = loaded.compositions["mix"]
    assert (mix.weights, mix.mode, mix.task, mix.report) == ({"alpha": 0.5, "base": 0.5}, "exact", "svamp",
                                                             {"accuracy": 0.5})
    assert (bundle / "manifest.json").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_bundle_refusals_leave_nothing(state, source, tmp_path, bundle):
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        state.export_bundle(tmp_path / "taken")
    with pytest.raises(ConfigError, match="must be outside the bundle"):
        state.export_bundle(bundle / "inner")
    state.add_expert("base", source, load_adapter)
    with pytest.raises(ConfigError, match=r"runtime experts \['base'\] clash with the bundle's experts"):
        state.export_bundle(tmp_path / "out")
    state.remove_expert("base")
    state.add_composition("mix", {"nobody": 1.0}, "exact", "t")  # the caller's check was skipped
    with pytest.raises(ConfigError, match="unknown expert 'nobody'"):
        state.export_bundle(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert read_manifest(bundle).compositions == {}


# ---------------------------------------------------------------------------- concurrency


def _add_many(folder: str, bundle: str, prefix: str, start) -> None:
    start.wait()
    store = RuntimeState(folder, bundle)
    for i in range(10):
        store.add_composition(f"{prefix}{i}", {"a": float(i)}, "exact", "t")
        assert store.version() >= i + 1


def test_concurrent_writers_lose_no_update(state):
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    workers = [ctx.Process(target=_add_many, args=(str(state.folder), str(state.bundle_root), p, start))
               for p in ("x", "y")]
    for w in workers:
        w.start()
    start.set()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    snapshot = state.snapshot()
    assert snapshot.version == 20
    assert sorted(snapshot.compositions) == sorted(f"{p}{i}" for p in "xy" for i in range(10))
    assert all(isinstance(c, RuntimeComposition) for c in snapshot.compositions.values())
    assert entries(state.folder) == [".lock", "state.json"]
    assert os.path.getsize(state.folder / "state.json") > 0

"""Bundles from a URI: fetched once into the cache, atomically, named by the manifest's content."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import pytest

from mode_cotd.bundle import MANIFEST, load_bundle
from mode_cotd.errors import BundleError
from serving.bundle_source import fetch_bundle, is_uri, local_bundle
from serving.components import load_serving_bundle, resolve_settings
from serving.settings import ServeSettings


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def memory_bundle(tiny_bundle, request):
    """The tiny bundle uploaded to fsspec's in-memory filesystem; removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/{request.node.name}"
    for name, data in files_of(tiny_bundle).items():
        fs.pipe_file(f"{root}/{name}", data)
    yield f"memory://{root}"
    fs.rm(root, recursive=True)


def test_is_uri_tells_uris_from_paths():
    assert all(is_uri(u) for u in ("s3://b/k", "gs://b/k", "file:///tmp/x", "memory://x"))
    assert not any(is_uri(p) for p in ("bundles/default", "/abs/path", "./s3:/x", "C:\\x", "~/b"))


def test_a_uri_is_fetched_once_into_a_folder_named_by_its_manifest(memory_bundle, tiny_bundle, tiny_student, tmp_path):
    local = fetch_bundle(memory_bundle, tmp_path)
    assert files_of(local) == files_of(tiny_bundle)
    assert local.parent == tmp_path and [p.name for p in tmp_path.iterdir()] == [local.name]  # no staging left
    assert load_bundle(local, student=tiny_student, strict=True).experts

    fs = fsspec.filesystem("memory")
    expert_file = next(n for n in files_of(tiny_bundle) if n.startswith("experts/"))
    fs.rm(f"{memory_bundle[len('memory://'):]}/{expert_file}")
    assert fetch_bundle(memory_bundle, tmp_path) == local  # unchanged manifest: the cached copy, no download
    assert (local / expert_file).is_file()


def test_a_new_bundle_at_the_same_uri_gets_a_new_folder(memory_bundle, tmp_path):
    first = fetch_bundle(memory_bundle, tmp_path)
    fs = fsspec.filesystem("memory")
    path = f"{memory_bundle[len('memory://'):]}/{MANIFEST}"
    manifest = json.loads(fs.cat_file(path))
    manifest["note"] = "v2"
    fs.pipe_file(path, json.dumps(manifest).encode())
    second = fetch_bundle(memory_bundle, tmp_path)
    assert second != first and json.loads((second / MANIFEST).read_text())["note"] == "v2"
    assert first.is_dir()  # replicas still serving the old one keep their files


def test_concurrent_fetches_end_in_one_complete_folder(memory_bundle, tmp_path):
    with ThreadPoolExecutor(6) as pool:
        results = set(pool.map(lambda _: fetch_bundle(memory_bundle, tmp_path), range(6)))
    assert len(results) == 1 and [p.name for p in tmp_path.iterdir()] == [results.pop().name]


def test_settings_keep_the_uri_and_every_load_uses_the_cached_copy(tiny_bundle, tiny_student, tmp_path, monkeypatch):
    monkeypatch.setenv("MODE_COTD_CACHE", str(tmp_path / "cache"))
    uri = tiny_bundle.resolve().as_uri()  # file:///...
    settings = resolve_settings(ServeSettings(bundle=uri, student=str(tiny_student)))
    assert settings.bundle == uri  # replicas on other nodes fetch it themselves
    bundle = load_serving_bundle(settings)
    assert bundle.root.parent == tmp_path / "cache" / "bundles" and set(bundle.experts) == {"alpha", "beta", "gamma"}
    assert local_bundle(str(tiny_bundle)) == tiny_bundle.resolve()


def test_a_corrupt_remote_file_fails_the_strict_bundle_check(memory_bundle, tiny_bundle, tiny_student, tmp_path):
    fs = fsspec.filesystem("memory")
    expert_file = next(n for n in files_of(tiny_bundle) if n.startswith("experts/") and n.endswith(".safetensors"))
    fs.pipe_file(f"{memory_bundle[len('memory://'):]}/{expert_file}", b"not the adapter")
    with pytest.raises(BundleError):
        load_bundle(fetch_bundle(memory_bundle, tmp_path), student=tiny_student, strict=True)


def test_missing_bundles_and_clients_are_clear_errors(tmp_path):
    with pytest.raises(BundleError, match="manifest.json missing"):
        fetch_bundle("memory://no-such-bundle", tmp_path)
    with pytest.raises(BundleError, match="mode-cotd\\[storage\\]"):
        fetch_bundle("nosuchproto://bucket/bundle", tmp_path)
    with pytest.raises(BundleError, match="manifest.json missing"):
        resolve_settings(ServeSettings(bundle=(tmp_path / "nothing").as_uri()))

"""Where a bundle comes from: a local folder, or a URI in object storage fetched once to the local cache.

    local_bundle("bundles/default")             -> the folder itself (absolute)
    local_bundle("s3://bucket/bundles/v3")      -> <cache>/bundles/<fingerprint>/, downloaded on first use
    local_bundle("gs://bucket/bundles/v3")      (also file://, memory://: any filesystem fsspec knows)

URIs are read with fsspec; the clients for s3:// and gs:// (s3fs, gcsfs) come with the optional extra
`pip install 'mode-cotd[storage]'`, and find credentials the usual way (AWS / Google default chains).

The local copy is named after the sha256 of the remote manifest.json (which records every file's
checksum), so a new bundle uploaded to the same URI gets a new folder and an unchanged one is never
fetched twice. The download is atomic: files land in a temporary sibling folder that is renamed into
place only when complete, so a reader never sees half a bundle, and several replicas of one node
fetching at once all end up reading the same folder. The strict bundle check that follows
(mode_cotd.bundle.load_bundle) verifies every file against the manifest's checksums.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from mode_cotd import paths
from mode_cotd.bundle import MANIFEST
from mode_cotd.errors import BundleError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(bundle: str) -> bool:
    """True for `scheme://...` (s3://, gs://, file://, memory://); False for a plain path."""
    return bool(_URI.match(bundle))


def default_cache_root() -> Path:
    """Where fetched bundles live: <mode-cotd cache>/bundles ($MODE_COTD_CACHE, else ~/.cache/mode-cotd)."""
    return paths.cache_dir() / "bundles"


def local_bundle(bundle: str, cache_root: str | Path | None = None) -> Path:
    """The local folder of `bundle`: a path made absolute, or a URI fetched into the cache (once)."""
    if not is_uri(bundle):
        return Path(bundle).expanduser().resolve()
    return fetch_bundle(bundle, cache_root)


def _filesystem(uri: str):
    try:
        import fsspec
    except ImportError as e:
        raise BundleError(f"{uri}: reading a bundle URI needs fsspec: pip install 'mode-cotd[storage]'") from e
    try:
        return fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:  # e.g. s3fs not installed, or an unknown protocol
        raise BundleError(f"{uri}: {e} (the s3:// and gs:// clients: pip install 'mode-cotd[storage]')") from e


def fetch_bundle(uri: str, cache_root: str | Path | None = None) -> Path:
    """Download the bundle at `uri` to <cache_root>/<sha256(manifest.json)[:16]>/ unless it is there; return it."""
    fs, root = _filesystem(uri)
    root = root.rstrip("/")
    try:
        manifest = fs.cat_file(f"{root}/{MANIFEST}")
    except FileNotFoundError as e:
        raise BundleError(f"no bundle at {uri} ({MANIFEST} missing)") from e
    except OSError as e:
        raise BundleError(f"{uri}: cannot read {MANIFEST} ({e})") from e
    cache = Path(cache_root).expanduser() if cache_root else default_cache_root()
    target = cache / hashlib.sha256(manifest).hexdigest()[:16]
    if (target / MANIFEST).is_file():
        return target

    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache))
    try:
        for remote in fs.find(root):
            relative = remote[len(root):].lstrip("/") if remote.startswith(root) else None
            if not relative or relative == MANIFEST:
                continue
            if relative.startswith("/") or ".." in Path(relative).parts:
                raise BundleError(f"{uri}: refusing the file name {remote!r}")
            local = staging / relative
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(local))
        (staging / MANIFEST).write_bytes(manifest)  # last: the manifest read above names this folder
        staging.chmod(0o755)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / MANIFEST).is_file():  # not a lost race with another fetcher: a real failure
                raise
    except OSError as e:
        raise BundleError(f"{uri}: download to {cache} failed ({e})") from e
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target

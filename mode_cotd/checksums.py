"""sha256 checksums of files and folders: what bundles, adapter records and sealed folders compare."""

from __future__ import annotations

import hashlib
from pathlib import Path

from mode_cotd.errors import BundleError


def sha256_file(path: str | Path) -> str:
    """sha256 hex digest of one file's bytes."""
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_checksums(path: str | Path) -> dict[str, str]:
    """Relative file path (posix) -> sha256 hex digest, for every file under the folder, sorted."""
    folder = Path(path)
    if not folder.is_dir():
        raise BundleError(f"{folder}: folder not found")
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    return {f.relative_to(folder).as_posix(): sha256_file(f) for f in files}

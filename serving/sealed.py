"""Adapter folders sealed with the sha256 of their files, so that a damaged or half-written one is never served.

`seal` writes `mode_cotd_checksums.json` last, after the folder itself; `check_seal` raises when it is
missing or no longer matches. Used for the adapter cache's composites and the mixture union's placeholder.
"""

from __future__ import annotations

import json
from pathlib import Path

from mode_cotd.atomic import write_json_atomic
from mode_cotd.checksums import file_checksums
from mode_cotd.errors import ModeCotdError

CHECKSUMS = "mode_cotd_checksums.json"
"""sha256 of every other file of a sealed folder, written last."""


def seal(folder: Path) -> None:
    """Record the checksums of the folder's files (call after every file is written: a folder without it is invalid)."""
    write_json_atomic(Path(folder) / CHECKSUMS, file_checksums(folder))


def check_seal(folder: Path) -> None:
    """ModeCotdError (or OSError / ValueError reading it) unless the recorded checksums match the files."""
    recorded = json.loads((Path(folder) / CHECKSUMS).read_text(encoding="utf-8"))
    actual = {f: digest for f, digest in file_checksums(folder).items() if f != CHECKSUMS}
    if recorded != actual:
        raise ModeCotdError(f"checksum mismatch (recorded {sorted(recorded)}, found {sorted(actual)})"
                            if set(recorded) != set(actual) else "checksum mismatch")

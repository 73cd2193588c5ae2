"""Settings dataclasses <-> dicts and command lines, for the training commands.

A settings class is a dataclass with a docstring under each field. ``settings_from_dict``
builds one from a dict (a config file section), naming unknown keys, missing keys and
values of the wrong type in a ConfigError. ``settings_parser`` makes one ``--flag`` per
field (help = the field's docstring plus its default) and ``--config FILE`` (JSON, YAML or
TOML); ``parse_settings`` reads both, flags overriding the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from mode_cotd.errors import ConfigError
from training.distill_config import field_docs, load_config_file

S = TypeVar("S")


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (None, bool, int, float, str, list[str], dict)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(_type_ok(k, key) and _type_ok(v, item) for k, v in value.items())
    return isinstance(value, hint)


def settings_from_dict(cls: type[S], data: Any, source: str) -> S:
    """An instance of the settings class ``cls`` from a dict; ConfigError names what is wrong."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown}; valid keys: {sorted(fields)}")
    missing = sorted(n for n, f in fields.items() if n not in data
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ConfigError(f"{source}: missing keys {missing}")
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"{source}: {key} must be {hints[key]}, got {value!r}")
    settings = cls(**data)
    validate = getattr(settings, "validate", None)
    if validate is not None:
        validate()
    return settings


def _flag_type(hint: Any):
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    arms = [a for a in (typing.get_args(hint) if union else (hint,)) if a is not type(None)]
    if typing.get_origin(arms[0]) is list:
        return "list"
    if typing.get_origin(arms[0]) is dict:
        return "dict"
    return next((t for t in (bool, int, float, str) if t in arms), str)


def settings_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """One ``--flag`` per field of ``cls`` (dict fields only via --config), plus ``--config FILE``."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    mappings = [f.name for f in dataclasses.fields(cls) if _flag_type(hints[f.name]) == "dict"]
    epilog = "Set through --config only: " + "; ".join(f"{n}: {docs.get(n, '')}" for n in mappings) if mappings else None
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)
    parser.add_argument("--config", type=Path, help="JSON/YAML/TOML file of settings (flags override it)")
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = "required" if default is dataclasses.MISSING else f"default: {default}"
        kind = _flag_type(hints[f.name])
        kwargs: dict[str, Any] = {"help": f"{docs.get(f.name, '')} ({shown})".replace("%", "%%"),  # argparse %-formats
                                  "default": argparse.SUPPRESS}
        if kind == "dict":
            continue
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind == "list":
            kwargs["nargs"] = "+"
        else:
            kwargs["type"] = kind
        parser.add_argument(f"--{f.name.replace('_', '-')}", **kwargs)
    return parser


def parse_settings(cls: type[S], argv: list[str] | None, prog: str, description: str) -> S:
    """Settings from ``--config FILE`` and flags (flags win)."""
    args = vars(settings_parser(cls, prog, description).parse_args(argv))
    path = args.pop("config", None)
    settings = load_config_file(path) if path else {}
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    settings.update(args)
    return settings_from_dict(cls, settings, str(path) if path else "command line")

"""Settings: dataclasses with a docstring under each field, filled from dicts, config files and flags.

The one settings mechanism of training, serving and the benchmarks. A settings class is a
dataclass; a field may itself be a settings class (nested settings, e.g. ServeSettings.engine).

- ``field_docs(cls)``: field name -> the docstring written under it (help texts).
- ``settings_from_dict(cls, data, source)``: an instance from a (nested) dict; a ConfigError names
  unknown keys, missing keys and values of the wrong type, then ``validate()`` runs if the class has one.
  ``coerce=True`` also takes "8", "0.3", "true" for numbers and bools (``serve run ... key=value``).
- ``load_config_file(path)``: the dict in a JSON, TOML or YAML file.
- ``nest_dotted(values, into)``: dotted keys ("engine.max_loras") -> nested dicts.
- ``add_settings_flags`` / ``settings_parser`` / ``parse_settings``: one ``--flag`` per leaf field
  (``--engine-max-loras`` for a nested one; help = docstring + default) and ``--config FILE``;
  flags override the file.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import json
import textwrap
import tomllib
import types
import typing
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mode_cotd.errors import ConfigError

S = TypeVar("S")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it in the class body, whitespace collapsed; a dataclass's
    inherited fields keep their base class's docstrings unless the subclass writes its own."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)] or [cls]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body  # type: ignore[attr-defined]
        for node, after in itertools.pairwise(body):
            named = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            if named and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                    and isinstance(after.value.value, str):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


# ---------------------------------------------------------------------------- from dicts


def _arms(hint: Any) -> list[Any]:
    """The types a hint allows, None left out: ``int | None`` -> [int]."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return [a for a in (typing.get_args(hint) if union else (hint,)) if a is not type(None)]


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) and not typing.get_args(hint) else str(hint)


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the annotation ``hint`` (unions, None, Any, scalars, lists, tuples, dicts)."""
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
    if origin in (list, tuple):
        item = (typing.get_args(hint) or (Any,))[0]
        return isinstance(value, origin) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(_type_ok(k, key) and _type_ok(v, item)
                                               for k, v in value.items())
    return isinstance(value, origin or hint)


def _field_value(value: Any, hint: Any, key: str, where: str, coerce: bool) -> Any:
    """The value of field ``key`` (annotation ``hint``) from ``value``; ConfigError when it does not fit."""
    arms = _arms(hint)
    nested = next((a for a in arms if dataclasses.is_dataclass(a)), None)
    if nested is not None and isinstance(value, (dict, nested)):
        return settings_from_dict(nested, value, f"{where}.{key}", coerce=coerce)
    if coerce and isinstance(value, str) and len(arms) == 1 and arms[0] in (bool, int, float):
        try:
            value = yaml.safe_load(value)  # "8", "0.3", "true"
        except yaml.YAMLError:
            pass
    if not _type_ok(value, hint):
        name = _type_name(hint)
        raise ConfigError(f"{where}.{key}: expected {name}, got {value!r} ({key} must be {name})")
    if coerce and arms == [float] and isinstance(value, int):
        return float(value)
    return dict(value) if isinstance(value, dict) else value


def settings_from_dict(cls: type[S], data: Any, source: str, *, coerce: bool = False) -> S:
    """An instance of the settings class ``cls`` from a dict whose nested dicts fill nested settings.

    ConfigError names the place (``source``, then dotted field names) and unknown keys, missing keys
    or a value of the wrong type; then the instance's ``validate()`` runs, when it has one. An int is
    a float; ``coerce`` also parses strings given for bool, int and float fields, and makes ints floats.
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown}; valid keys: {sorted(fields)}")
    missing = sorted(n for n, f in fields.items() if n not in data
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ConfigError(f"{source}: missing keys {missing}")
    hints = typing.get_type_hints(cls)
    settings = cls(**{k: _field_value(v, hints[k], k, source, coerce) for k, v in data.items()})
    validate = getattr(settings, "validate", None)
    if validate is not None:
        validate()
    return settings


def load_config_file(path: str | Path) -> Any:
    """The settings in a JSON (.json), TOML (.toml) or YAML (any other suffix; empty: {}) file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix == ".json":
            return json.loads(text)
        return yaml.safe_load(text) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: invalid config file ({exc})") from None


def nest_dotted(values: Mapping[str, Any], into: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"engine.max_loras": 8}`` -> ``{"engine": {"max_loras": 8}}``, set over a copy of the nested
    dict ``into`` (its other keys kept; ``into`` itself is not changed)."""
    tree = dict(into or {})
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[leaf] = value
    return tree


# ---------------------------------------------------------------------------- from flags


def _default(f: dataclasses.Field, defaults: Any) -> Any:
    if defaults is not None:
        return getattr(defaults, f.name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def add_settings_flags(parser: argparse.ArgumentParser, cls: type, defaults: Any = None,
                       prefix: str = "") -> dict[str, str]:
    """One ``--flag`` per leaf field of the settings class ``cls`` (on a parser or an argument group).

    Nested settings are flattened: the flag of ``engine.max_loras`` is ``--engine-max-loras``, its dest
    the dotted path. Help = the field's docstring and its default (from ``defaults``, an instance, else
    the class); booleans get ``--x/--no-x``, lists take several values; absent flags stay unset.
    Returns {dotted name: docstring} of the mapping fields, which get no flag (set through a file only).
    """
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    mappings: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        dest, default, arms = prefix + f.name, _default(f, defaults), _arms(hints[f.name])
        kind, origin = arms[0], typing.get_origin(arms[0])
        if dataclasses.is_dataclass(kind):
            nested = default if isinstance(default, kind) else None
            mappings.update(add_settings_flags(parser, kind, nested, dest + "."))
            continue
        if origin is dict:
            mappings[dest] = docs.get(f.name, "")
            continue
        shown = "required" if default is dataclasses.MISSING else f"default: {default}"
        help_text = f"{docs.get(f.name, '')} ({shown})".replace("%", "%%")  # argparse %-formats help
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
        kind = next((t for t in (bool, int, float, str) if t in arms), str)
        if origin is list:
            kind = next((t for t in (int, float) if t in typing.get_args(arms[0])), str)
            kwargs.update(nargs="+", type=kind, metavar=kind.__name__.upper())
        elif kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=kind, metavar=kind.__name__.upper())
        parser.add_argument("--" + dest.replace(".", "-").replace("_", "-"), **kwargs)
    return mappings


def settings_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """A parser of ``--config FILE`` and one flag per field of ``cls`` (``add_settings_flags``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, help="JSON/YAML/TOML file of settings (flags override it)")
    mappings = add_settings_flags(parser, cls)
    if mappings:
        parser.epilog = "Set through --config only: " + "; ".join(f"{n}: {d}" for n, d in mappings.items())
    return parser


def parse_settings(cls: type[S], argv: list[str] | None, prog: str, description: str) -> S:
    """Settings from ``--config FILE`` and flags (flags win)."""
    flags = vars(settings_parser(cls, prog, description).parse_args(argv))
    path = flags.pop("config", None)
    settings = load_config_file(path) if path else {}
    if not isinstance(settings, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    return settings_from_dict(cls, nest_dotted(flags, settings), str(path) if path else "command line")

"""The one settings mechanism: docstrings, dicts, config files, dotted keys and flags (tiny classes built here)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mode_cotd.errors import ConfigError
from mode_cotd.settings import (
    add_settings_flags,
    field_docs,
    load_config_file,
    nest_dotted,
    parse_settings,
    settings_from_dict,
    settings_parser,
)


@dataclass
class Inner:
    """A nested section."""

    size: int = 2
    """How many (100%
    of them)."""
    rate: float | None = None
    """A rate, or None."""


@dataclass
class Outer:
    """A settings tree."""

    name: str
    """Its name (required)."""
    tags: list[str] = field(default_factory=lambda: ["a"])
    """Some tags."""
    flag: bool = False
    """On or off."""
    inner: Inner = field(default_factory=Inner)
    """The nested section."""
    maybe: Inner | None = None
    """An optional nested section."""
    extra: dict[str, int] = field(default_factory=dict)
    """A mapping (no flag)."""
    undocumented: int = 0

    def validate(self) -> None:
        if self.name == "bad":
            raise ConfigError("name: invalid value 'bad'")


def test_field_docs_collapse_whitespace_and_skip_undocumented_fields():
    assert field_docs(Inner) == {"size": "How many (100% of them).", "rate": "A rate, or None."}
    assert "undocumented" not in field_docs(Outer) and field_docs(Outer)["name"] == "Its name (required)."


def test_from_dict_builds_nested_settings_and_validates():
    s = settings_from_dict(Outer, {"name": "x", "inner": {"size": 3}, "maybe": {"rate": 1}, "extra": {"k": 1}}, "t")
    assert s == Outer(name="x", inner=Inner(size=3), maybe=Inner(rate=1), extra={"k": 1})
    assert settings_from_dict(Outer, s, "t") is s
    with pytest.raises(ConfigError, match="name: invalid value 'bad'"):
        settings_from_dict(Outer, {"name": "bad"}, "t")


@pytest.mark.parametrize("data, message", [
    ([1], r"t: expected a mapping of settings, got list"),
    ({"name": "x", "nmae": 1, "zz": 2}, r"t: unknown keys \['nmae', 'zz'\]; valid keys: \["),
    ({"name": "x", "inner": {"sise": 1}}, r"t\.inner: unknown keys \['sise'\]"),
    ({}, r"t: missing keys \['name'\]"),
    ({"name": 3}, r"t\.name: expected str, got 3 \(name must be str\)"),
    ({"name": "x", "flag": 1}, r"t\.flag: expected bool, got 1"),
    ({"name": "x", "inner": {"size": True}}, r"t\.inner\.size: expected int, got True"),
    ({"name": "x", "inner": {"size": "2"}}, r"size must be int"),
    ({"name": "x", "tags": ["a", 3]}, r"tags must be list\[str\]"),
    ({"name": "x", "extra": {"k": "1"}}, r"extra must be dict\[str, int\]"),
    ({"name": "x", "inner": None}, r"t\.inner: expected Inner, got None"),
])
def test_from_dict_names_what_is_wrong(data, message):
    with pytest.raises(ConfigError, match=message):
        settings_from_dict(Outer, data, "t")


def test_coerce_parses_strings_for_numbers_and_bools_and_makes_ints_floats():
    data = {"name": "x", "flag": "true", "inner": {"size": "8", "rate": "1"}, "maybe": {"rate": 2}}
    s = settings_from_dict(Outer, data, "t", coerce=True)
    assert (s.flag, s.inner.size, s.inner.rate, s.maybe.rate) == (True, 8, 1.0, 2.0)
    assert isinstance(s.inner.rate, float) and isinstance(s.maybe.rate, float)
    assert settings_from_dict(Outer, {"name": "x", "maybe": {"rate": 2}}, "t").maybe.rate == 2  # not coerced: as given
    with pytest.raises(ConfigError, match=r"t\.inner\.size: expected int, got 'eight'"):
        settings_from_dict(Outer, {"name": "x", "inner": {"size": "eight"}}, "t", coerce=True)
    with pytest.raises(ConfigError, match="name must be str"):
        settings_from_dict(Outer, {"name": 5}, "t", coerce=True)


def test_nest_dotted_sets_leaves_over_a_copy():
    base = {"a": {"b": 1, "c": 2}, "d": 3, "e": 4}
    tree = nest_dotted({"a.b": 10, "x.y.z": 5, "e.f": 6, "d": 7}, base)
    assert tree == {"a": {"b": 10, "c": 2}, "d": 7, "e": {"f": 6}, "x": {"y": {"z": 5}}}
    assert base == {"a": {"b": 1, "c": 2}, "d": 3, "e": 4}
    assert nest_dotted({"a": 1}) == {"a": 1}


@pytest.mark.parametrize("name, text", [
    ("s.json", '{"name": "x", "inner": {"size": 4}}'),
    ("s.yaml", "name: x\ninner: {size: 4}\n"),
    ("s.yml", "name: x\ninner:\n  size: 4\n"),
    ("s.toml", 'name = "x"\n[inner]\nsize = 4\n'),
])
def test_config_files(tmp_path: Path, name, text):
    (tmp_path / name).write_text(text)
    assert load_config_file(tmp_path / name) == {"name": "x", "inner": {"size": 4}}


def test_config_file_errors(tmp_path: Path):
    (tmp_path / "empty.yaml").write_text("")
    assert load_config_file(tmp_path / "empty.yaml") == {}
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="bad.json: invalid config file"):
        load_config_file(tmp_path / "bad.json")
    (tmp_path / "bad.yaml").write_text("a: b\n- c\n")
    with pytest.raises(ConfigError, match="invalid config file"):
        load_config_file(tmp_path / "bad.yaml")


def test_parser_has_one_flag_per_leaf_with_docstring_and_default():
    parser = settings_parser(Outer, "prog", "A test command.")
    text = " ".join(parser.format_help().split())
    for flag in ("--config", "--name STR", "--tags STR [STR ...]", "--flag, --no-flag", "--inner-size INT",
                 "--inner-rate FLOAT", "--maybe-size INT", "--undocumented INT"):
        assert flag in text, flag
    assert "Its name (required). (required)" in text and "How many (100% of them). (default: 2)" in text
    assert "Some tags. (default: ['a'])" in text
    assert "--extra" not in text.split("Set through --config only")[0]
    assert "Set through --config only: extra: A mapping (no flag)." in text


def test_flags_override_the_config_file_and_nested_flags_merge(tmp_path: Path):
    path = tmp_path / "s.yaml"
    path.write_text("name: file\ninner: {size: 5, rate: 0.5}\nextra: {k: 1}\n")
    s = parse_settings(Outer, ["--config", str(path), "--inner-size", "6", "--flag", "--tags", "b", "c"], "p", "d")
    assert s == Outer(name="file", tags=["b", "c"], flag=True, inner=Inner(size=6, rate=0.5), extra={"k": 1})
    s = parse_settings(Outer, ["--name", "cli", "--maybe-rate", "2"], "p", "d")
    assert s.name == "cli" and s.maybe == Inner(rate=2.0) and s.inner == Inner()
    with pytest.raises(ConfigError, match=r"command line: missing keys \['name'\]"):
        parse_settings(Outer, [], "p", "d")
    (tmp_path / "list.json").write_text(json.dumps([1]))
    with pytest.raises(ConfigError, match="list.json: expected a mapping"):
        parse_settings(Outer, ["--config", str(tmp_path / "list.json")], "p", "d")
    with pytest.raises(SystemExit):
        parse_settings(Outer, ["--inner-size", "x"], "p", "d")


def test_flags_on_a_group_with_instance_defaults():
    import argparse

    parser = argparse.ArgumentParser()
    mappings = add_settings_flags(parser.add_argument_group("s"), Outer, Outer(name="n", inner=Inner(size=9)))
    assert mappings == {"extra": "A mapping (no flag)."}
    assert "(default: 9)" in " ".join(parser.format_help().split())
    assert vars(parser.parse_args(["--no-flag", "--inner-rate", "0.25"])) == {"flag": False, "inner.rate": 0.25}


def test_the_module_imports_no_server_stack():
    code = "import sys, mode_cotd.settings; print(sorted(m for m in ('ray', 'vllm', 'fastapi', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_field_docs_of_a_subclass_keep_the_base_class_docstrings():
    from dataclasses import dataclass

    from mode_cotd.settings import field_docs

    @dataclass
    class Base:
        a: int = 1
        """A from the base."""
        b: int = 2
        """B from the base."""

    @dataclass
    class Child(Base):
        b: int = 3
        """B, redefined."""
        c: int = 4
        """C only here."""

    assert field_docs(Child) == {"a": "A from the base.", "b": "B, redefined.", "c": "C only here."}

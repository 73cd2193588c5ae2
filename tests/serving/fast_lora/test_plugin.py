"""The platform plugin: its version check, its off switch, and what it hands to vLLM."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from serving.fast_lora import plugin


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.32.7"])
def test_supported_versions_pass(version):
    assert plugin.check_vllm_version(version) == version


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0", "not-a-version"])
def test_unsupported_versions_fail_with_a_clear_error(version):
    with pytest.raises(plugin.UnsupportedVllmError) as e:
        plugin.check_vllm_version(version)
    message = str(e.value)
    assert plugin.SUPPORTED_VLLM in message and version in message and "MODE_COTD_FAST_LORA=0" in message
    assert "--no-engine-fast-lora" in message


def test_register_falls_back_to_vllm_on_an_unsupported_version(monkeypatch, caplog):
    monkeypatch.setenv(plugin.ENV, "1")
    monkeypatch.setattr(plugin, "applies_here", lambda: True)
    monkeypatch.setattr(plugin, "installed_vllm_version", lambda: "0.40.0")
    with caplog.at_level("ERROR"):
        assert plugin.register() is None
    assert "supports vLLM" in caplog.text and "0.40.0" in caplog.text


def test_check_raises_at_engine_start_on_an_unsupported_version(monkeypatch):
    monkeypatch.setattr(plugin, "applies_here", lambda: True)
    monkeypatch.setattr(plugin, "installed_vllm_version", lambda: "0.40.0")
    monkeypatch.setenv(plugin.ENV, "1")
    with pytest.raises(plugin.UnsupportedVllmError):
        plugin.check(True)
    plugin.check(False)  # off: no check
    assert plugin.enabled(), "check() must not change the environment"


@pytest.mark.parametrize(("env", "configured", "fast_on"), [
    (None, None, True), ("0", None, False),                      # no engine config: the environment decides
    (None, {"fast_lora": False}, False), (None, {"fast_lora": True}, True),
    ("0", {"fast_lora": True}, False),                           # the global off switch wins
])
def test_the_engine_config_carries_the_fast_lora_switch(monkeypatch, env, configured, fast_on):
    from types import SimpleNamespace

    if env is None:
        monkeypatch.delenv(plugin.ENV, raising=False)
    else:
        monkeypatch.setenv(plugin.ENV, env)
    config = SimpleNamespace(additional_config={plugin.CONFIG_KEY: configured} if configured is not None else {})
    assert plugin.fast_lora_on(config) is fast_on


@pytest.mark.parametrize(("env", "configured", "compiled"), [
    (None, None, False), ("1", None, True), ("1", False, False), (None, True, True), ("0", True, True),
])
def test_the_engine_config_carries_the_compile_switch(monkeypatch, env, configured, compiled):
    from types import SimpleNamespace

    if env is None:
        monkeypatch.delenv(plugin.COMPILE_ENV, raising=False)
    else:
        monkeypatch.setenv(plugin.COMPILE_ENV, env)
    extra = {plugin.CONFIG_KEY: {"compile": configured}} if configured is not None else None
    assert plugin.compile_on(SimpleNamespace(additional_config=extra)) is compiled
    assert plugin.engine_config(True, configured is True) == {
        plugin.CONFIG_KEY: {"fast_lora": True, "compile": configured is True}}


@pytest.mark.parametrize(("value", "on"), [(None, True), ("1", True), ("yes", True), ("0", False), ("off", False),
                                           ("False", False)])
def test_switch(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv(plugin.ENV, raising=False)
    else:
        monkeypatch.setenv(plugin.ENV, value)
    assert plugin.enabled() is on


def test_switch_off_register_returns_none(monkeypatch):
    monkeypatch.setenv(plugin.ENV, "0")
    assert plugin.register() is None


def test_entry_point_is_installed():
    names = {ep.name: ep.value for ep in entry_points(group="vllm.platform_plugins")}
    assert names.get(plugin.ENTRY_POINT) == "serving.fast_lora.plugin:register", (
        "reinstall the package (pip install -e .) so the vllm.platform_plugins entry point registers"
    )


def test_installed_vllm_is_supported():
    assert plugin.check_vllm_version()


SHOW_PLATFORM = (
    "import vllm.platforms as p; pl = p.current_platform; "
    "print('RESULT', type(pl).__name__, pl.get_punica_wrapper())"
)


@pytest.mark.vllm
@pytest.mark.parametrize(("switch", "platform", "wrapper"), [
    ("1", "FastLoraCpuPlatform", "serving.fast_lora.wrapper.PunicaWrapperGrouped"),
    ("0", "CpuPlatform", "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"),
])
def test_vllm_resolves_the_platform_through_the_entry_point(monkeypatch, switch, platform, wrapper):
    """A fresh process (vLLM resolves its platform once per process) picks ours, or vLLM's when switched off."""
    monkeypatch.setenv(plugin.ENV, switch)
    monkeypatch.delenv("VLLM_TARGET_DEVICE", raising=False)
    if not plugin.applies_here():
        pytest.skip("vLLM does not run on its plain CPU platform here")
    out = subprocess.run([sys.executable, "-c", SHOW_PLATFORM], capture_output=True, text=True, timeout=300,
                         check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    assert lines == [f"RESULT {platform} {wrapper}"], out.stdout[-2000:] + out.stderr[-2000:]


@pytest.mark.vllm
def test_platform_follows_the_switch_after_resolution(monkeypatch):
    """A process that resolved the platform before the switch was turned off (a Ray replica) still follows it."""
    pytest.importorskip("vllm")
    from serving.fast_lora.platform import WRAPPER, FastLoraCpuPlatform

    monkeypatch.setenv(plugin.ENV, "1")
    assert FastLoraCpuPlatform.get_punica_wrapper() == WRAPPER
    monkeypatch.setenv(plugin.ENV, "0")
    assert FastLoraCpuPlatform.get_punica_wrapper() == "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"


@pytest.mark.vllm
def test_the_platform_follows_the_engine_config_being_built(monkeypatch):
    """Inside an engine's construction (vLLM's current config) the engine's own switch decides."""
    from types import SimpleNamespace

    pytest.importorskip("vllm")
    import vllm.config

    from serving.fast_lora.platform import WRAPPER, FastLoraCpuPlatform

    monkeypatch.setenv(plugin.ENV, "1")
    for on, wrapper in ((True, WRAPPER), (False, "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU")):
        config = SimpleNamespace(additional_config=plugin.engine_config(on, False))
        monkeypatch.setattr(vllm.config, "get_current_vllm_config_or_none", lambda config=config: config)
        assert FastLoraCpuPlatform.get_punica_wrapper() == wrapper


def test_the_engine_refuses_a_union_without_the_grouped_wrapper(monkeypatch):
    from mode_cotd.errors import ConfigError
    from serving.engine import _check_union_wrapper
    from serving.fast_lora import plugin

    monkeypatch.setenv(plugin.ENV, "1")
    _check_union_wrapper(True)  # this machine: vLLM's CPU build, the plugin's platform
    with pytest.raises(ConfigError, match="no-engine-mixture-union"):
        _check_union_wrapper(False)  # the engine's own switch off
    monkeypatch.setenv(plugin.ENV, "0")
    with pytest.raises(ConfigError, match="no-engine-mixture-union"):
        _check_union_wrapper(True)


@pytest.mark.vllm
@pytest.mark.parametrize(("fast", "compile_on", "lora", "wanted", "expected"), [
    ("1", "1", True, "VLLM_COMPILE", "DYNAMO_TRACE_ONCE"),  # the switch restores what vLLM would do without LoRA
    ("1", "0", True, "VLLM_COMPILE", "NONE"),               # switch off: vLLM's CPU default with LoRA
    ("0", "1", True, "VLLM_COMPILE", "NONE"),               # vLLM's own LoRA ops are never compiled here
    ("1", "1", True, "NONE", "NONE"),                       # enforce_eager stays eager
    ("1", "1", False, "VLLM_COMPILE", "DYNAMO_TRACE_ONCE"),  # no LoRA: vLLM's choice, untouched
])
def test_the_compile_switch_keeps_a_lora_engine_compiled(monkeypatch, fast, compile_on, lora, wanted, expected):
    """FastLoraCpuPlatform.check_and_update_config over a stand-in for vLLM's CPU config (which traces once
    unless eager, then turns compilation off whenever LoRA is on)."""
    from types import SimpleNamespace

    from vllm.config import CompilationMode
    from vllm.platforms.cpu import CpuPlatform

    from serving.fast_lora.platform import FastLoraCpuPlatform

    def vllm_cpu_config(cls, config):
        if config.compilation_config.mode == CompilationMode.VLLM_COMPILE:
            config.compilation_config.mode = CompilationMode.DYNAMO_TRACE_ONCE
        if config.lora_config is not None:
            config.compilation_config.mode = CompilationMode.NONE

    monkeypatch.setattr(CpuPlatform, "check_and_update_config", classmethod(vllm_cpu_config))
    monkeypatch.setenv(plugin.ENV, "1")
    monkeypatch.delenv(plugin.COMPILE_ENV, raising=False)
    for extra, env in ((plugin.engine_config(fast == "1", compile_on == "1"), {}),  # a serving engine's config
                       ({}, {plugin.ENV: fast, plugin.COMPILE_ENV: compile_on})):  # offline: the environment
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        config = SimpleNamespace(compilation_config=SimpleNamespace(mode=CompilationMode[wanted]),
                                 lora_config=object() if lora else None, additional_config=extra)
        FastLoraCpuPlatform.check_and_update_config(config)
        assert config.compilation_config.mode == CompilationMode[expected], extra or env


@pytest.mark.parametrize(("value", "on"), [(None, False), ("1", True), ("on", True), ("0", False), ("no", False)])
def test_compile_switch(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv(plugin.COMPILE_ENV, raising=False)
    else:
        monkeypatch.setenv(plugin.COMPILE_ENV, value)
    assert plugin.compile_enabled() is on

"""engine_args: what vLLM's AsyncEngineArgs get from EngineSettings."""

import json
import os

import pytest

from mode_cotd import compute_dtype
from serving.engine import engine_args
from serving.settings import EngineSettings

pytest.importorskip("vllm")


@pytest.mark.parametrize(("cpu_bf16", "setting", "expected"), [
    (False, "auto", "float32"), (True, "auto", "auto"), (False, "bfloat16", "bfloat16")])
def test_the_engine_gets_the_resolved_dtype(tmp_path, monkeypatch, cpu_bf16, setting, expected):
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    monkeypatch.setattr(compute_dtype, "runs_on_cpu", lambda: True)
    monkeypatch.setattr(compute_dtype, "cpu_has_bf16_arithmetic", lambda: cpu_bf16)
    args = engine_args(tmp_path, EngineSettings(dtype=setting), max_lora_rank=8, max_model_len=512, pinned=2)
    assert args.dtype == expected
    assert args.enable_lora and args.max_loras == EngineSettings().max_loras + 2


@pytest.mark.parametrize(("fast", "compiled"), [(True, False), (False, False), (True, True)])
def test_the_switches_reach_vllm_as_engine_config_not_environment(tmp_path, monkeypatch, fast, compiled):
    from serving.fast_lora import plugin

    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32"}))
    monkeypatch.delenv(plugin.ENV, raising=False)
    monkeypatch.delenv(plugin.COMPILE_ENV, raising=False)
    settings = EngineSettings(fast_lora=fast, compile=compiled, extra={"additional_config": {"other": 1}})
    args = engine_args(tmp_path, settings, max_lora_rank=8, max_model_len=512)
    assert args.additional_config == {"other": 1, **plugin.engine_config(fast, compiled)}
    assert plugin.ENV not in os.environ and plugin.COMPILE_ENV not in os.environ


def test_the_forced_tokens_processor_is_registered_beside_the_users_and_needs_raw_logprobs(tmp_path):
    from mode_cotd.errors import ConfigError
    from serving.forced_tokens import FQCN

    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32"}))
    assert engine_args(tmp_path, EngineSettings(), max_lora_rank=8, max_model_len=512).logits_processors == [FQCN]
    mine = EngineSettings(extra={"logits_processors": ["my.module:Mine"]})
    assert engine_args(tmp_path, mine, max_lora_rank=8, max_model_len=512).logits_processors == ["my.module:Mine", FQCN]
    with pytest.raises(ConfigError, match="logprobs_mode"):
        engine_args(tmp_path, EngineSettings(extra={"logprobs_mode": "processed_logprobs"}), max_lora_rank=8,
                    max_model_len=512)


@pytest.mark.parametrize("on", [True, False])
def test_prefix_caching_follows_its_setting(tmp_path, on):
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32"}))
    args = engine_args(tmp_path, EngineSettings(prefix_caching=on), max_lora_rank=8, max_model_len=512)
    assert args.enable_prefix_caching is on


def test_the_stream_interval_reaches_vllm_and_a_bad_one_fails_before_ray_starts(tmp_path, tiny_bundle, tiny_student):
    import dataclasses

    from mode_cotd.errors import ConfigError
    from serving.components import resolve_settings
    from serving.settings import ServeSettings

    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32"}))
    assert engine_args(tmp_path, EngineSettings(), max_lora_rank=8, max_model_len=512).stream_interval == 4
    assert engine_args(tmp_path, EngineSettings(stream_interval=1), max_lora_rank=8,
                       max_model_len=512).stream_interval == 1
    bad = ServeSettings(bundle=str(tiny_bundle), student=str(tiny_student))
    bad = dataclasses.replace(bad, engine=dataclasses.replace(bad.engine, stream_interval=0))
    with pytest.raises(ConfigError, match="engine.stream_interval"):
        resolve_settings(bad)

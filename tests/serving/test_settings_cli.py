"""Settings trees from dicts, the Serve config YAML and `mode-cotd serve` flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mode_cotd import paths
from mode_cotd.errors import ConfigError
from mode_cotd.settings import field_docs
from serving.app import settings_from_args
from serving.cli import DEFAULT_BUNDLE, build_parser, settings_from_cli
from serving.settings import AutoscalingSettings, ServeSettings, from_dict

SERVE_CONFIG = paths.REPO_ROOT / "deploy" / "serve_config.yaml"


def test_from_dict_builds_nested_settings_and_refuses_unknown_keys():
    s = from_dict(ServeSettings, {"port": 9000, "engine": {"max_loras": 8, "max_lora_rank": None},
                                  "router": {"autoscaling": {"max_replicas": 3}}})
    assert s.port == 9000 and s.engine.max_loras == 8 and s.engine.max_lora_rank is None
    assert s.router.autoscaling == AutoscalingSettings(max_replicas=3)
    assert s.router.serve_options()["autoscaling_config"]["max_replicas"] == 3
    assert "num_replicas" not in s.router.serve_options()
    with pytest.raises(ConfigError, match="unknown keys \\['max_lorras'\\]"):
        from_dict(ServeSettings, {"engine": {"max_lorras": 8}})
    with pytest.raises(ConfigError, match="settings.port: expected int"):
        from_dict(ServeSettings, {"port": "eighty"})
    with pytest.raises(ConfigError, match="expected bool"):
        from_dict(ServeSettings, {"engine": {"enforce_eager": 1}})


def test_serve_run_style_string_args_and_dotted_keys():
    s = settings_from_args({"bundle": "b", "port": "8123", "engine.max_loras": "6", "engine.enforce_eager": "true",
                            "batching.batch_wait_timeout_s": "0.05"})
    assert (s.bundle, s.port, s.engine.max_loras, s.engine.enforce_eager) == ("b", 8123, 6, True)
    assert s.batching.batch_wait_timeout_s == 0.05


def test_every_settings_field_has_a_docstring():
    import dataclasses

    from serving import settings as module

    for cls in (module.ServeSettings, module.DeploymentSettings, module.AutoscalingSettings, module.EngineSettings,
                module.RouterSettings, module.CacheSettings, module.ApiSettings):
        missing = {f.name for f in dataclasses.fields(cls)} - set(field_docs(cls))
        assert not missing, (cls.__name__, missing)


def test_serve_config_yaml_is_a_valid_serve_config_with_valid_args():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(SERVE_CONFIG.read_text())
    schema = ServeDeploySchema.model_validate(config)
    app = schema.applications[0]
    assert app.import_path == "serving.app:build_app" and schema.http_options.host == "127.0.0.1"
    settings = settings_from_args(app.args)
    assert settings.bundle == "bundles/residual" and settings.batching.max_batch_size == 32


def test_cli_flags_override_config_and_default_bundle(tmp_path: Path):
    parser = build_parser()
    s = settings_from_cli(parser.parse_args([]))
    assert s.bundle == str(DEFAULT_BUNDLE) and s.host == "127.0.0.1" and s.port == 8000
    s = settings_from_cli(parser.parse_args([
        "--config", str(SERVE_CONFIG), "--port", "8100", "--engine-max-loras", "2", "--engine-enforce-eager",
        "--batching-max-batch-size", "64", "--student-deployment-num-gpus", "1",
        "--router-autoscaling-max-replicas", "4", "--cache-dir", str(tmp_path),
    ]))
    assert (s.port, s.engine.max_loras, s.engine.enforce_eager, s.batching.max_batch_size) == (8100, 2, True, 64)
    assert s.student_deployment.num_gpus == 1.0 and s.router.autoscaling.max_replicas == 4
    assert s.engine.max_cpu_loras == 16 and s.bundle == "bundles/residual"  # from the YAML
    assert s.cache.dir == str(tmp_path)


def test_serve_without_a_bundle_says_how_to_get_one(tmp_path, capsys):
    from mode_cotd.cli import main

    assert main(["serve", "--bundle", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert "no bundle at" in err and "--bundle" in err


def test_serve_options_carry_health_checks_and_serve_accepts_them():
    """A dead replica is noticed within the health-check period; Serve's own option schema accepts every option."""
    from ray.serve.schema import DeploymentSchema

    s = from_dict(ServeSettings, {"student_deployment": {"health_check_period_s": 1.5}})
    options = s.student_deployment.serve_options()
    assert options["health_check_period_s"] == 1.5 and options["health_check_timeout_s"] == 30.0
    assert DeploymentSchema(name="student", **options).health_check_period_s == 1.5

"""`mode-cotd bench` arguments, presets and the lazy import rule."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.cli import build_parser, config_from_args
from benchmarks.config import PRESETS
from mode_cotd.errors import ConfigError


def _config(argv: list[str], tail: list[str] | None = None):
    return config_from_args(build_parser().parse_args(argv), tail or [])


def test_quick_preset_and_overrides():
    quick = _config(["--quick"])
    assert quick == PRESETS["quick"]
    assert quick.scaling_in_flight == (1, 4, 16) and quick.cross_check and quick.concurrencies == (8,)
    full = _config(["--concurrency", "2,8", "--scenarios", "ce", "--no-cross-check", "--output-tokens", "16"])
    assert full.concurrencies == (2, 8) and full.ratio_concurrency == 8 and full.scenarios == "ce"
    assert not full.cross_check and full.output_tokens == 16
    assert full.requests_per_level == PRESETS["full"].requests_per_level
    off = _config(["--rates", "none", "--experts-table", "none"])  # "none", as --help shows an empty list
    assert off.poisson_rates == () and off.experts_table == ()


def test_the_ratio_level_sends_several_waves():
    full = _config(["--concurrency", "1,4,16"])
    assert [full.requests_at(c) for c in (1, 4, 16)] == [16, 16, 16 * full.ratio_waves] and full.ratio_waves == 3
    assert _config(["--ratio-waves", "2", "--requests", "40"]).requests_at(16) == 40
    assert PRESETS["quick"].requests_at(8) == 8
    with pytest.raises(ConfigError, match="ratio_waves: expected a positive integer, got 0"):
        _config(["--ratio-waves", "0"])


def test_serve_flags_pass_through():
    config = _config(["--quick", "--serve-args", "--engine-max-loras 8", "--vllm-args", "--max-num-seqs 32"],
                     ["--no-engine-fast-lora"])
    assert config.serve_args == ["--engine-max-loras", "8", "--no-engine-fast-lora"]
    assert config.vllm_args == ["--max-num-seqs", "32"]


def test_bad_arguments():
    with pytest.raises(ConfigError):
        _config(["--scenarios", "az"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--concurrency", "0,4"])


def test_bench_is_registered_and_imports_no_server_stack():
    code = ("import sys, mode_cotd.cli, benchmarks.cli, benchmarks.runner; "
            "assert 'bench' in mode_cotd.cli.COMMANDS; "
            "print(sorted(m for m in ('ray', 'vllm', 'fastapi') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"

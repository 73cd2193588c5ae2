"""`resolve_dtype`: "auto" becomes float32 only for a half-precision student on a CPU without bf16 arithmetic."""

import json

import pytest

from mode_cotd.compute_dtype import cpu_has_bf16_arithmetic, resolve_dtype, student_dtype


def student_folder(tmp_path, config: dict):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(("setting", "config", "on_cpu", "cpu_bf16", "expected"), [
    ("auto", {"dtype": "bfloat16"}, True, False, "float32"),        # this machine: AVX2, no bf16
    ("auto", {"torch_dtype": "float16"}, True, False, "float32"),   # the older config key
    ("auto", {"dtype": "bfloat16"}, True, True, "auto"),            # AVX512-BF16 / AMX: the student's dtype
    ("auto", {"dtype": "bfloat16"}, False, False, "auto"),          # a GPU
    ("auto", {"dtype": "float32"}, True, False, "auto"),            # already float32
    ("auto", {}, True, False, "auto"),                              # no dtype in the config: vLLM decides
    ("bfloat16", {"dtype": "bfloat16"}, True, False, "bfloat16"),   # an explicit choice is kept
    ("float16", {"dtype": "bfloat16"}, True, False, "float16"),
])
def test_resolve_dtype(tmp_path, setting, config, on_cpu, cpu_bf16, expected):
    student = student_folder(tmp_path, config)
    assert resolve_dtype(setting, student, on_cpu=on_cpu, cpu_bf16=cpu_bf16) == expected


def test_a_folder_without_config_keeps_auto(tmp_path):
    assert student_dtype(tmp_path) is None
    assert resolve_dtype("auto", tmp_path, on_cpu=True, cpu_bf16=False) == "auto"


def test_this_machine_is_asked(tmp_path, monkeypatch):
    from mode_cotd import compute_dtype

    monkeypatch.setattr(compute_dtype, "runs_on_cpu", lambda: True)
    monkeypatch.setattr(compute_dtype, "cpu_has_bf16_arithmetic", lambda: False)
    assert resolve_dtype("auto", student_folder(tmp_path, {"dtype": "bfloat16"})) == "float32"
    monkeypatch.setattr(compute_dtype, "cpu_has_bf16_arithmetic", lambda: True)
    assert resolve_dtype("auto", tmp_path) == "auto"


def test_the_bf16_probe_answers_a_bool():
    assert isinstance(cpu_has_bf16_arithmetic(), bool)

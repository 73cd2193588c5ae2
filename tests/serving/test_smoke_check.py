"""scripts/smoke_serve.py's verdict: the gate's top expert, the shared adapter aside, and the paper's format."""

import importlib.util

from mode_cotd import paths

_spec = importlib.util.spec_from_file_location("smoke_serve", paths.REPO_ROOT / "scripts" / "smoke_serve.py")
smoke = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(smoke)

GOOD = 'The last letter of "Lucky" is "y".\nSo the final answer is "y".\n--> y END'


def test_the_shared_adapter_is_not_the_gates_choice():
    served = {"experts": {"all_data": 1.0, "last_letter_concatenation": 0.7, "multiarith": 0.3}}
    assert smoke.check_last_letter(GOOD, served, shared="all_data") == 0
    assert smoke.check_last_letter(GOOD, served) == 1  # counted as an expert, all_data's 1.0 is the top


def test_an_abstaining_gate_or_a_wrong_format_fails(capsys):
    assert smoke.check_last_letter(GOOD, {"experts": {"all_data": 1.0}}, shared="all_data") == 1
    assert "top expert is None" in capsys.readouterr().err
    served = {"experts": {"last_letter_concatenation": 1.0}}
    assert smoke.check_last_letter("y END", served) == 1
    assert "no 'The last letter of'" in capsys.readouterr().err

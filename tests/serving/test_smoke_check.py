"""scripts/smoke_serve.py's verdict: the gate's top expert, the shared adapter aside, and the paper's format."""

import importlib.util

from mode_cotd import paths

_spec = importlib.util.spec_from_file_location("smoke_serve", paths.REPO_ROOT / "scripts" / "smoke_serve.py")
smoke = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(smoke)

GOOD = 'The last letter of "Lucky" is "y".\nSo the final answer is "y".\n--> y END'
ROUTED = {"experts": {"all_data": 1.0, "last_letter_concatenation": 0.7, "multiarith": 0.3}}
ABSTAINED = {"experts": {"all_data": 1.0}}


def test_the_shared_adapter_is_not_the_gates_choice():
    assert smoke.check_last_letter([(GOOD, ROUTED), (GOOD, ABSTAINED)], shared="all_data") == 0
    assert smoke.check_last_letter([(GOOD, ROUTED)]) == 1  # counted as an expert, all_data's 1.0 is the top


def test_a_gate_that_never_routes_or_a_wrong_format_fails(capsys):
    assert smoke.check_last_letter([(GOOD, ABSTAINED)] * 3, shared="all_data") == 1
    assert "chose no expert for any of the 3 prompts" in capsys.readouterr().err
    wrong = {"experts": {"all_data": 1.0, "multiarith": 0.6, "last_letter_concatenation": 0.4}}
    assert smoke.check_last_letter([(GOOD, ROUTED), (GOOD, wrong)], shared="all_data") == 1
    assert "prompt 1: the gate's top expert is 'multiarith'" in capsys.readouterr().err
    assert smoke.check_last_letter([("y END", {"experts": {"last_letter_concatenation": 1.0}})]) == 1
    assert "prompt 0: no 'The last letter of'" in capsys.readouterr().err

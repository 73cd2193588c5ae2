"""Every `mode-cotd <command> --help` renders (argparse %-formats help text: a stray % broke `serve --help`)."""

import pytest

from mode_cotd.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_renders(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--" in out

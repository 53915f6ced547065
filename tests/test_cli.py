"""Tests of the CLI's own behaviour (bad input has its own file): warnings and help."""

from __future__ import annotations

import warnings

import pytest

from tfcal import TfcalWarning, cli


@pytest.mark.filterwarnings("default::tfcal.TfcalWarning")
def test_tfcal_warnings_print_as_one_line(monkeypatch, capsys):
    def run(args):
        warnings.warn("temperature stopped at a bound for classes [1]", TfcalWarning)
        warnings.warn("a library's own warning", RuntimeWarning)
        return cli.EXIT_OK

    monkeypatch.setattr(cli, "_run", run)
    with pytest.warns(RuntimeWarning, match="a library's own warning"):  # passed on as is
        assert cli.main(["report", "unused"]) == cli.EXIT_OK
    err = capsys.readouterr().err
    assert err == "tfcal: warning: temperature stopped at a bound for classes [1]\n"
    assert warnings.showwarning is not cli._show_warning  # restored after the run


@pytest.mark.parametrize("command", ["tune", "export", "evaluate", "report", "drift", "demo"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tfcal " + command) and "Exit codes" in out

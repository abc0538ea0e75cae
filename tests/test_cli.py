"""The ``retro-compile`` command: help for every command, and every flag described."""

from __future__ import annotations

import argparse

import pytest

from retro_compile.cli import COMMANDS, main


def test_top_level_help_exits_zero_and_lists_the_commands(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    with pytest.raises(SystemExit) as error:
        main(["nope"])
    assert "unknown command 'nope'" in str(error.value) and error.value.code != 0


@pytest.mark.parametrize("argv", [["demo"], ["eval"], ["bench"], ["bench", "op"], ["bench", "e2e"], ["bench", "serve"], ["serve"]])
def test_every_flag_of_every_command_is_described(argv, monkeypatch, capsys):
    shown = []
    original = argparse.ArgumentParser.print_help

    def print_help(self, *args, **kwargs):
        shown.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "print_help", print_help)
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    (parser,) = shown
    undescribed = [a.option_strings or a.dest for a in parser._actions if not a.help]
    assert undescribed == []
    if argv == ["bench"]:
        assert "need a CUDA GPU" in capsys.readouterr().out

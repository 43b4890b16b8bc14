"""Every option and positional of every `tessera` subcommand documents itself in --help."""
from __future__ import annotations

import argparse

import pytest

from tessera.cli import build_parser, main


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...]):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, path + (name,))


COMMANDS = list(_walk(build_parser(), ()))


def test_every_option_has_help_text():
    missing = [f"tessera {' '.join(path)} {'/'.join(a.option_strings) or a.dest}"
               for path, parser in COMMANDS for a in parser._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help]
    assert missing == []


def test_top_groups_present():
    names = {path[0] for path, _ in COMMANDS if path}
    assert {"asm", "pki", "simulcrypt", "board", "demo"} <= names


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=lambda p: " ".join(p) or "tessera")
def test_help_exits_zero(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code == 0
    assert "usage: tessera" in capsys.readouterr().out

"""Every command, subcommand and flag of ``authnotify`` says what it does (and, where it has one, its default)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from authnotify.cli.main import build_parser, main


def _parsers(parser: argparse.ArgumentParser, path: str = "authnotify") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def test_every_command_subcommand_and_flag_has_help_and_says_its_default() -> None:
    missing: list[str] = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = f"{path} {'/'.join(action.option_strings) or action.dest}"
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(label)
            if isinstance(action, argparse._SubParsersAction):
                helped = {choice.dest for choice in action._choices_actions if choice.help}
                missing += [f"{path} {name}" for name in action.choices if name not in helped]
                continue
            has_default = action.default not in (None, False, [], argparse.SUPPRESS) and action.required is False
            if has_default and "default" not in (action.help or ""):
                missing.append(f"{label} (says no default; its default is {action.default!r})")
    assert missing == []


def test_the_parser_has_the_commands_of_the_docs() -> None:
    [commands] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert {"ingress", "worker", "topology", "migrate", "dlq", "authorizations", "dev", "simulate", "scheduler", "api",
            "api-keys", "verify-signature", "reencrypt-tokens"} <= set(commands.choices)


@pytest.mark.parametrize("argv", [["--help"], ["dlq", "replay", "--help"], ["dlq", "list", "--help"],
                                  ["authorizations", "revoke", "--help"], ["simulate", "--help"]])
def test_help_prints_and_exits_0(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: authnotify") and "show this help message and exit" in out


def test_dlq_filters_are_documented_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["dlq", "replay", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--merchant ID", "--since ISO-8601", "--reason TEXT", "--id ID", "--limit N", "--dry-run", "--json"):
        assert flag in out


def test_a_bad_since_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dlq", "list", "--since", "yesterday"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--since" in err and "ISO 8601" in err

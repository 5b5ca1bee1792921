"""The CLI loads only the command group a command line names (each group imported and
registered cost the whole `vmreplica sync` a share of its 22 ms); the table that says
which group owns which command must match what the groups register."""

from __future__ import annotations

import argparse
import importlib

import pytest

from vmreplica.cli import main as cli_main
from vmreplica.service.home import Home


def _registered(group: str) -> set[str]:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    importlib.import_module(f"vmreplica.cli.{group}").register(sub)
    return set(sub.choices)


@pytest.mark.parametrize("group", cli_main.GROUPS)
def test_the_command_table_matches_what_each_group_registers(group):
    assert set(cli_main.COMMANDS[group]) == _registered(group)


def test_the_command_word_skips_the_global_options():
    w = cli_main.command_word
    assert w(["--home", "/h", "sync", "vm"]) == "sync"
    assert w(["--home=/h", "vm", "list"]) == "vm"
    assert w(["status"]) == "status"
    assert w(["--version"]) is None
    assert w([]) is None


def test_a_command_line_loads_only_its_group():
    p = cli_main.build_parser(["--home", "/h", "sync", "vm"])
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"sync"}           # not even the rest of its group
    args = p.parse_args(["--home", "/h", "sync", "vm"])
    assert args.command == "sync" and args.func is not None


@pytest.mark.parametrize("line", [
    ["sync", "vm1", "vm2", "--json"], ["sync", "--all", "--tag", "a", "--tag", "b"],
    ["status"], ["enable", "vm", "--replica", "h:1", "--frequency", "30s"],
    ["vm", "create", "x", "--disk", "1G", "--disk", "2G", "--guest", "demo"],
    ["trust", "pair", "h:1", "tok"], ["replica-server", "enable", "--allow", "*"],
    ["dr", "adopt", "vm"], ["failover", "vm", "--point", "3", "--force"],
    ["failover", "vm", "--test"], ["measure", "vm", "--json"], ["cluster", "status"],
])
def test_a_command_built_alone_parses_as_with_every_command(line):
    """The one sub-parser built for a command line gives what the full parser gives."""
    full = cli_main.build_parser(["--help"])          # no command word: every group
    alone = cli_main.build_parser(line)
    sub = next(a for a in alone._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {line[0]}
    assert _comparable(alone.parse_args(line)) == _comparable(full.parse_args(line))


@pytest.mark.parametrize("line", [["dr", "show", "vm"], ["sync", "--frequency", "x"],
                                  ["enable", "vm"]])
def test_a_line_the_cli_refuses_is_refused_alone_too(line, capsys):
    for build in (["--help"], line):
        with pytest.raises(SystemExit) as e:
            cli_main.build_parser(build).parse_args(line)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 2, err


def _comparable(args) -> dict:
    """The namespace, with its function named (bulk.each makes one per parser build)."""
    def name(f):
        cells = [c.cell_contents for c in (getattr(f, "__closure__", None) or ())]
        return (f.__qualname__, [name(c) for c in cells if callable(c)])
    return {k: name(v) if callable(v) else v for k, v in vars(args).items()}


def test_an_unknown_command_is_refused_with_every_command_listed(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main.main(["--home", "/h", "synk", "vm"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'synk'" in err and "failover" in err and "sync" in err


def test_a_home_is_an_immutable_value(tmp_path):
    h = Home.resolve(str(tmp_path))
    assert h == Home(tmp_path) and hash(h) == hash(Home(tmp_path))
    assert h.socket == tmp_path / "run" / "mgmt.sock"
    with pytest.raises(AttributeError):
        h.root = tmp_path / "x"


def test_a_home_gives_its_paths_as_strings_and_paths(tmp_path):
    h = Home.resolve(str(tmp_path / "a" / ".." / "h"))
    assert h.root == tmp_path / "h"                       # absolute and normalised
    assert h.socket_path == str(h.socket) == str(tmp_path / "h" / "run" / "mgmt.sock")
    assert not h.exists()
    (tmp_path / "h" / "tls").mkdir(parents=True)
    (tmp_path / "h" / "state.db").touch()
    assert not h.exists()
    (tmp_path / "h" / "tls" / "host.crt").touch()
    assert h.exists()

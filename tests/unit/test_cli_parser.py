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
    w = cli_main._command_word
    assert w(["--home", "/h", "sync", "vm"]) == "sync"
    assert w(["--home=/h", "vm", "list"]) == "vm"
    assert w(["status"]) == "status"
    assert w(["--version"]) is None
    assert w([]) is None


def test_a_command_line_loads_only_its_group():
    p = cli_main.build_parser(["--home", "/h", "sync", "vm"])
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(cli_main.COMMANDS["replication_cmd"])
    args = p.parse_args(["--home", "/h", "sync", "vm"])
    assert args.command == "sync" and args.func is not None


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

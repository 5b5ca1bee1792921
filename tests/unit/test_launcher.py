"""The installed command starts Python without site processing and loads `site` the
first time an import needs what it adds (vmreplica.cli.launcher)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import vmreplica
from vmreplica.cli import launcher

ROOT = str(Path(vmreplica.__file__).resolve().parents[1])


def _bare(code: str) -> dict:
    """Run ``code`` as the installed command's interpreter would: -S, the package's
    directory first, the finder in place; it prints a JSON value."""
    prelude = ("import sys, json\n"
               f"sys.path.insert(0, {ROOT!r})\n"
               "from vmreplica.cli.launcher import SiteOnDemand\n"
               f"SiteOnDemand.paths = {launcher.site_paths()!r}\n"
               "sys.meta_path.append(SiteOnDemand)\n")
    out = subprocess.run([sys.executable, "-S", "-c", prelude + code], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def test_site_paths_are_what_site_processing_adds():
    paths = launcher.site_paths()
    assert any(p.endswith("site-packages") for p in paths)
    assert not any(p.endswith("lib-dynload") for p in paths)       # the stdlib's own


def test_a_client_command_needs_no_site():
    got = _bare("from vmreplica.cli import main, client, bulk, render\n"
                "from vmreplica.service import home\n"
                "import copy\n"           # probes org.python: found nowhere, loads nothing
                "print(json.dumps({'site': 'site' in sys.modules,"
                " 'no_site': sys.flags.no_site}))")
    assert got == {"site": False, "no_site": 1}


def test_a_client_command_line_imports_little():
    """What a `sync` command line costs before its request: no pathlib (Home keeps a
    string), no shutil (the help formatter sizes itself), no copy (bulk, when needed),
    no typing: each was milliseconds of every call."""
    got = _bare("from vmreplica.cli import main\n"
                "args = main.build_parser(['--home', '/x', 'sync', 'vm']).parse_args("
                "['--home', '/x', 'sync', 'vm', '--json'])\n"
                "from vmreplica.service.home import Home\n"
                "from vmreplica.cli.client import Client\n"
                "c = Client(Home.resolve(args.home)); c.home.socket_path\n"
                "print(json.dumps(sorted(m for m in ('pathlib', 'shutil', 'copy', 'typing')"
                " if m in sys.modules)))")
    assert got == []


def test_help_is_sized_to_the_terminal(monkeypatch, capsys):
    from vmreplica.cli import main
    monkeypatch.setenv("COLUMNS", "50")
    with pytest.raises(SystemExit):
        main.main(["sync", "--help"])
    out = capsys.readouterr().out
    assert "--verify" in out and max(len(line) for line in out.splitlines()) <= 50


def test_a_third_party_import_loads_site_and_is_found():
    got = _bare("import zstandard, blake3\n"
                "print(json.dumps({'site': 'site' in sys.modules,"
                " 'finder': any(f.__name__ == 'SiteOnDemand' for f in sys.meta_path"
                " if isinstance(f, type)),"
                " 'venv': [p for p in sys.path if p.startswith(sys.prefix)"
                " and p.endswith('site-packages')]}))")
    assert got["site"] is True and got["finder"] is False and got["venv"]


def test_a_module_found_nowhere_is_still_an_import_error():
    got = _bare("try:\n    import no_such_module_vmreplica\n    r = 'imported'\n"
                "except ImportError:\n    r = 'ImportError'\n"
                "print(json.dumps([r, 'site' in sys.modules]))")
    assert got == ["ImportError", False]


def test_the_installed_command_runs(tmp_path):
    exe = tmp_path / "vmreplica"
    launcher.install(str(exe))
    first = exe.read_text().splitlines()[0]
    assert first == f"#!{sys.executable} -S"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "vmreplica 0.1.0"
    # A client command against a directory that is no home: the usual clear error.
    out = subprocess.run([str(exe), "--home", str(tmp_path / "nohome"), "status"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "is not a vmreplica host home" in out.stderr

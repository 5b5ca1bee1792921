"""Issue 18: the test and demo harness lives outside the package (tests/harness, demo/),
nothing in the package reaches for it, and the demo guest is installed data found without
a source tree (hypervisor/guest.py)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import vmreplica
from vmreplica.errors import UsageError
from vmreplica.hypervisor import guest

SRC = Path(vmreplica.__file__).resolve().parent
REPO = Path(__file__).resolve().parents[2]
HARNESS = {"lab", "demo", "demo_ha", "nslab", "hasite", "fence_vmreplica"}
# Top-level names only the source tree has: the harness, the demos, the tests' helpers.
OUTSIDE = {"harness", "demo", "helpers", "crashstates", "tests", "bench"}


def test_the_package_holds_no_harness():
    shipped = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                     if p.stem in HARNESS)
    assert not shipped, f"harness modules in the package: {shipped}"
    for name in ("lab", "nslab", "hasite", "fence_vmreplica"):
        assert (REPO / "tests" / "harness" / f"{name}.py").is_file()
    for name in ("replication", "ha"):
        assert (REPO / "demo" / f"{name}.py").is_file()


def test_the_package_imports_nothing_of_the_source_tree():
    wrong = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            wrong += [f"{path.relative_to(SRC)}:{node.lineno}: {n}" for n in names
                      if n.split(".")[0] in OUTSIDE]
    assert not wrong, "the package imports the harness or the tests:\n  " + "\n  ".join(wrong)


def _guest(at: Path) -> Path:
    at.mkdir(parents=True)
    (at / "vmlinuz").write_bytes(b"k")
    (at / "initramfs.img").write_bytes(b"i")
    return at


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(guest.ENV, raising=False)


def test_guest_from_the_environment(tmp_path, monkeypatch):
    d = _guest(tmp_path / "g" / "demo")
    monkeypatch.setenv(guest.ENV, str(tmp_path / "g"))
    files = guest.guest_files("demo")
    assert files["kernel"] == d.resolve() / "vmlinuz"
    assert files["initrd"] == d.resolve() / "initramfs.img"


def test_guest_under_the_installation_prefix(tmp_path, monkeypatch, no_env):
    """`make setup` links the built guest into PREFIX/share/vmreplica/guests: found there,
    as the real path (libvirt's QEMU is given the files themselves)."""
    built = _guest(tmp_path / "clone" / "guest" / "demo")
    prefix = tmp_path / "venv"
    (prefix / "share" / "vmreplica" / "guests").mkdir(parents=True)
    (prefix / "share" / "vmreplica" / "guests" / "demo").symlink_to(built)
    monkeypatch.setattr(sys, "prefix", str(prefix))
    assert guest.guest_files("demo")["kernel"] == built.resolve() / "vmlinuz"


def test_guest_under_a_venv_started_without_site(tmp_path, monkeypatch, no_env):
    """The installed command runs `python -S`: sys.prefix is the base interpreter's, the
    virtual environment is the one whose pyvenv.cfg sits above the executable."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    monkeypatch.setattr(sys, "prefix", "/usr")
    monkeypatch.setattr(sys, "executable", str(venv / "bin" / "python"))
    dirs = guest.guest_dirs("demo")
    assert dirs[0] == Path("/usr/share/vmreplica/guests/demo")
    assert venv / "share" / "vmreplica" / "guests" / "demo" in dirs
    assert not any("guest" == p.parent.name for p in dirs)     # never a clone's guest/


def test_an_absent_guest_says_where_it_looked_and_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv(guest.ENV, str(tmp_path))
    with pytest.raises(UsageError) as e:
        guest.guest_files("demo")
    assert str(tmp_path / "demo") in e.value.message
    assert "make setup" in e.value.hint and "build-guest.sh" in e.value.hint
    assert guest.ENV in e.value.hint

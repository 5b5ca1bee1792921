"""Each hypervisor driver implements every part of the driver interface (hypervisor/base.py)
with compatible signatures, and its block sessions the BlockSession interface: a method
missing from one driver fails here, not as an AttributeError (or "internal error") on a
host that runs that driver. Callers call the interface plainly; no capability probes."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Protocol

import pytest

from vmreplica.hypervisor import base
from vmreplica.hypervisor.qemu import QemuDriver
from vmreplica.hypervisor.qemu.session import QemuBlockSession

try:
    from vmreplica.hypervisor.libvirt import LibvirtDriver
    from vmreplica.hypervisor.libvirt.block import LibvirtBlockSession
except ImportError:                       # libvirt-python missing: `make setup` installs it
    LibvirtDriver = LibvirtBlockSession = None

SRC = Path(base.__file__).parents[1]
DRIVERS = [c for c in (QemuDriver, LibvirtDriver) if c is not None]
SESSIONS = [c for c in (QemuBlockSession, LibvirtBlockSession) if c is not None]
DUNDERS = {"__enter__", "__exit__"}


def _members(proto: type) -> tuple[dict[str, object], set[str]]:
    """The methods and the attributes a Protocol declares (its Protocol bases' too)."""
    methods, attrs = {}, set()
    for cls in reversed(proto.__mro__):
        if cls in (object, Protocol) or not getattr(cls, "_is_protocol", False):
            continue
        for name, value in vars(cls).items():
            if inspect.isfunction(value) and (not name.startswith("_") or name in DUNDERS):
                methods[name] = value
        attrs |= set(getattr(cls, "__annotations__", {}))
    return methods, attrs


def _assigned_in_init(cls: type) -> set[str]:
    src = inspect.getsource(cls)
    return set(re.findall(r"self\.([A-Za-z_]\w*)\s*(?::[^=\n]+)?=", src))


def problems(cls: type, proto: type) -> list[str]:
    """What ``cls`` lacks of ``proto``: missing methods or attributes, and signatures a
    caller of the Protocol could not call the same way."""
    out = []
    methods, attrs = _members(proto)
    for name in sorted(attrs):
        if not hasattr(cls, name) and name not in _assigned_in_init(cls):
            out.append(f"{cls.__name__} lacks attribute {name} ({proto.__name__})")
    for name, declared in sorted(methods.items()):
        impl = getattr(cls, name, None)
        if impl is None or not callable(impl):
            out.append(f"{cls.__name__} lacks {name}() ({proto.__name__})")
            continue
        why = _incompatible(inspect.signature(declared), inspect.signature(impl))
        if why:
            out.append(f"{cls.__name__}.{name}{inspect.signature(impl)} does not fit "
                       f"{proto.__name__}.{name}{inspect.signature(declared)}: {why}")
    return out


def _incompatible(declared: inspect.Signature, impl: inspect.Signature) -> str | None:
    P = inspect.Parameter
    dp = [p for p in list(declared.parameters.values())[1:]]        # without self
    ip = [p for p in list(impl.parameters.values())[1:]]
    i_var = any(p.kind == P.VAR_POSITIONAL for p in ip)
    positional = [p for p in ip if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    for n, p in enumerate(dp):
        if p.kind == P.VAR_POSITIONAL:
            if not i_var:
                return f"no *{p.name}"
            continue
        if p.kind == P.VAR_KEYWORD:
            if not any(q.kind == P.VAR_KEYWORD for q in ip):
                return f"no **{p.name}"
            continue
        if n >= len(positional) or positional[n].name != p.name:
            return f"parameter {n + 1} should be {p.name!r}"
        q = positional[n]
        if p.default is not P.empty and q.default != p.default:
            return f"{p.name}'s default should be {p.default!r} (is {q.default!r})"
        if p.default is P.empty and q.default is not P.empty:
            continue                    # more permissive: fine
    named = {p.name for p in dp}
    for q in ip:
        if q.name not in named and q.default is P.empty and \
                q.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD):
            return f"extra parameter {q.name!r} without a default"
    return None


@pytest.mark.parametrize("proto", base.INTERFACES, ids=lambda p: p.__name__)
@pytest.mark.parametrize("cls", DRIVERS, ids=lambda c: c.__name__)
def test_each_driver_implements_every_part_of_the_interface(cls, proto):
    assert problems(cls, proto) == []


@pytest.mark.parametrize("cls", SESSIONS, ids=lambda c: c.__name__)
def test_each_block_session_implements_the_interface(cls):
    assert problems(cls, base.BlockSession) == []


def test_driver_combines_every_part():
    methods, attrs = _members(base.Driver)
    parts = [_members(p) for p in base.INTERFACES]
    assert set(methods) == {m for ms, _ in parts for m in ms}
    assert attrs == {a for _, as_ in parts for a in as_}
    assert {"check", "save", "saved_state", "discard_saved", "io", "drop_left_views",
            "resume_left_paused", "mirror_relay_socket", "set_title", "collapse_live",
            "mirror_start", "freeze_filesystems", "block_session"} <= set(methods)
    assert {"live_views", "continuous", "name"} <= attrs


def test_the_check_finds_what_a_driver_lacks():
    class Half:
        name = "half"
        live_views = False

        def io(self, name, disk):                         # a parameter short
            return ""

        def block_session(self, name, extra):             # one without a default
            return None

    found = "\n".join(problems(Half, base.BlockAccess))
    assert "lacks drop_left_views()" in found
    assert "Half.io" in found and "parameter 3 should be 'command'" in found
    assert "extra parameter 'extra' without a default" in found
    assert problems(Half, base.Mirror)[0] == "Half lacks attribute continuous (Mirror)"


def _probes(tree: ast.AST) -> list[tuple[int, str]]:
    """hasattr/getattr calls on something named driver or session (a capability probe)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("hasattr", "getattr") and node.args:
            target = ast.unparse(node.args[0])
            if re.search(r"(^|\.)(driver|session)$", target):
                out.append((node.lineno, ast.unparse(node)))
    return out


def test_no_capability_probes_on_drivers_or_block_sessions():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for line, call in _probes(ast.parse(path.read_text(), str(path))):
            found.append(f"{path.relative_to(SRC)}:{line}: {call}")
    assert found == [], "call the driver interface (hypervisor/base.py) plainly:\n" + \
        "\n".join(found)


def test_the_driver_registry_is_not_in_base():
    """hypervisor.base is what the drivers import: it must not import them back."""
    tree = ast.parse(Path(base.__file__).read_text())
    imported = {(n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"qemu", "libvirt", ".qemu", ".libvirt"}
    assert not any(isinstance(n, ast.FunctionDef) and n.name == "get_driver"
                   for n in ast.walk(tree))

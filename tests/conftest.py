"""Shared fixtures: real hosts (homes, daemons, TLS on loopback) built with `vmreplica.lab`.

Homes live under a short /tmp path (unix socket paths are limited to 107 bytes) that is
traversable by other users (libvirt's qemu user, later). Hosts that tests only read from
are shared per session; tests that kill daemons build their own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from vmreplica import lab


@pytest.fixture(scope="session")
def lab_root():
    root = Path(tempfile.mkdtemp(prefix="vmr-", dir="/tmp"))
    os.chmod(root, 0o755)
    _LAB_ROOTS.append(root)
    yield root
    if os.environ.get("VMREPLICA_KEEP_LAB") != "1":      # keep it to look at a failure
        shutil.rmtree(root, ignore_errors=True)


_counter = iter(range(10_000))


@pytest.fixture
def fresh_dir(lab_root):
    d = lab_root / f"t{next(_counter)}"
    d.mkdir()
    os.chmod(d, 0o755)
    return d


DRIVERS = os.environ.get("VMREPLICA_TEST_DRIVERS", "qemu,libvirt").split(",")


@pytest.fixture(scope="session")
def libvirtd():
    """A running libvirtd (started by the project's script when none runs)."""
    proc = subprocess.run(["bash", str(Path(__file__).parents[1] / "scripts" / "start-libvirtd.sh")],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"libvirtd could not be started: {proc.stdout}{proc.stderr}")
    return True


@pytest.fixture(scope="session", params=DRIVERS)
def driver(request):
    """Every end-to-end scenario runs on both hypervisor drivers."""
    if request.param == "libvirt":
        request.getfixturevalue("libvirtd")
    return request.param


@pytest.fixture(scope="session")
def sites(lab_root, driver):
    """A primary (site-a) and a replica (site-b), paired both ways; shared by the session."""
    a, b = lab.two_sites(lab_root / f"shared-{driver}", driver=driver)
    yield a, b
    lab.teardown(a, b)


@pytest.fixture
def own_sites(fresh_dir, driver):
    """Two hosts of this test's own, for tests that kill or cut things."""
    a, b = lab.two_sites(fresh_dir, driver=driver)
    yield a, b
    lab.teardown(a, b)


_vm_counter = iter(range(10_000))


@pytest.fixture
def vm_name(request):
    base = request.node.name.split("[")[0].replace("test_", "")[:20].replace("_", "-")
    return f"{base}-{next(_vm_counter)}"


# -- what the daemons said, on a failure -------------------------------------------------
_LAB_ROOTS: list[Path] = []


def pytest_runtest_setup(item):
    item.stash[_STARTED] = time.time()


_STARTED = pytest.StashKey[float]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test carries the tails of the daemon logs and storage-daemon stderr files
    that changed while it ran, so an intermittent failure in CI can be read afterwards."""
    outcome = yield
    rep = outcome.get_result()
    if rep.when != "call" or not rep.failed or not _LAB_ROOTS:
        return
    since = item.stash.get(_STARTED, 0) - 1
    found = []
    for root in _LAB_ROOTS:
        for p in list(root.rglob("*.log")) + list(root.rglob("*.err")):
            try:
                if p.is_file() and p.stat().st_mtime >= since and p.stat().st_size:
                    found.append(p)
            except OSError:
                continue
    for p in sorted(found, key=lambda p: p.stat().st_mtime)[-10:]:
        try:
            tail = p.read_text(errors="replace").splitlines()[-25:]
        except OSError:
            continue
        rep.sections.append((f"tail of {p}", "\n".join(tail)))

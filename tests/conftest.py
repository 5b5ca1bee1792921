"""Shared fixtures: real hosts (homes, daemons, TLS on loopback) built with `harness.lab`
(tests/harness: the test and demo harness, outside the package).

Homes live under a short /tmp path (unix socket paths are limited to 107 bytes) that is
traversable by other users (libvirt's qemu user). Hosts that tests only read from
are shared per session; tests that kill daemons build their own.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from harness import lab


@pytest.fixture(scope="session")
def lab_root():
    root = Path(tempfile.mkdtemp(prefix="vmr-", dir="/tmp"))
    os.chmod(root, 0o755)
    lab.claim_root(root)
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


@pytest.fixture
def workdir(request):
    """An operator's own folder for a domain's images, outside every vmreplica home
    (libvirt-qemu must enter it): /tmp/vmr-<test module>-XXXX, removed afterwards."""
    short = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    d = Path(tempfile.mkdtemp(prefix=f"vmr-{short[:16]}-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


DRIVERS = os.environ.get("VMREPLICA_TEST_DRIVERS", "qemu,libvirt").split(",")

# `make test` (scripts/run-tests.sh) runs the suite in two phases. First everything but
# the clusters, in two pytest-xdist workers (--dist loadgroup): most of that time is spent
# waiting (cycles, outages, a TCG guest booting), not computing. A group runs in one
# worker, in order:
#  - "libvirt": every e2e test on the libvirt driver, and the Debian guest's.
#    They share the one system libvirtd, where a domain is named vmr-HOST-VM, and the
#    lab's hosts are site-a and site-b in every worker: two workers would collide.
#  - every other module, its own group, so its module-scoped guests and hosts are built
#    once.
# Then the modules that boot namespace clusters (marker "cluster": Corosync, Pacemaker,
# fencing with 60 s operation timeouts), alone on the machine: their timings are the
# suite's tightest, and a TCG guest booting in the other worker slowed a resource start
# past its timeout.
_CLUSTER_MODULES = {"test_ha", "test_ha_existing", "test_cluster_lab"}
_LIBVIRT_MODULES = {"test_debian_guest"}
# - the libvirt driver's own tests and those of operators' existing domains join the
#   "libvirt" group too. They use host and domain names of their own (exist-a, deb-a,
#   kvm-a, ...), but run as a group of their own beside it, two of three full runs failed
#   under the load: the isolated network outlived a test failover's `--stop-test`, and a
#   demo guest's agent missed a 15 s fsfreeze while TCG guests booted in both workers.
_EXISTING_MODULES = {"test_libvirt_driver", "test_existing_domain", "test_existing_failover",
                     "test_readme_tour_libvirt", "test_existing_raw_block",
                     "test_existing_reip", "test_existing_uefi", "test_existing_config",
                     "test_existing_continuous"}


# NOTE (stop 20): with pytest 9 and pytest-xdist 3.8 these groups are inert: xdist's
# worker appends "@GROUP" to an item's `_nodeid`, which pytest 9 no longer reads back,
# so the controller schedules test by test (a module's tests, the libvirt tests, run on
# both workers). Measured: a module marked `xdist_group("g")` ran its two tests on gw0
# and gw1. Tests therefore must not collide across workers on the one libvirtd: each
# worker has its own lab root, `vm_name` carries the worker, fixed names are per test.
@pytest.hookimpl(tryfirst=True)       # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.stem
        params = item.callspec.params if isinstance(item, pytest.Function) and \
            hasattr(item, "callspec") else {}
        if module in _CLUSTER_MODULES:
            item.add_marker(pytest.mark.cluster)
            group = "cluster"
        elif params.get("driver") == "libvirt" or module in _LIBVIRT_MODULES \
                or module in _EXISTING_MODULES:
            group = "libvirt"
        else:
            group = str(item.path.relative_to(config.rootpath))
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def libvirtd():
    """A running libvirtd (started by the project's script when none runs)."""
    with open("/tmp/vmr-libvirtd.lock", "a") as lock:   # one starter among xdist workers
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.run(["bash", str(Path(__file__).parents[1] / "scripts" /
                                           "start-libvirtd.sh")], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"libvirtd could not be started: {proc.stdout}{proc.stderr}")
        removed = lab.sweep_stale_domains()      # of runs killed before their teardown
    if removed:
        print(f"\n[libvirtd] removed {len(removed)} domains of killed test runs: "
              f"{', '.join(sorted(removed))}")
    return True


@pytest.fixture(scope="session", params=DRIVERS)
def driver(request):
    """Every end-to-end scenario runs on both hypervisor drivers."""
    if request.param == "libvirt":
        request.getfixturevalue("libvirtd")
    return request.param


@pytest.fixture
def qemu_driver_only(driver):
    """For a module whose logic does not depend on the hypervisor driver (the replica's
    recovery, the peer API, the CLI's progress and messages): run it once, on the
    embedded driver, so the suite keeps its time."""
    if driver != "qemu":
        pytest.skip("the same on both drivers: run on the qemu driver")


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
# The xdist worker (gw0, gw1): each worker counts from 0, and the libvirt hosts of both
# (site-a, site-b, each worker's own lab root) share the system libvirtd, where a domain
# is named vmr-HOST-VM — the same test on both workers made the same domain name
# (CI: "libvirt already has a domain named vmr-site-a-tampered-stream-is-r-33").
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")


@pytest.fixture
def vm_name(request):
    base = request.node.name.split("[")[0].replace("test_", "")[:20].replace("_", "-")
    return f"{base}-{_WORKER}-{next(_vm_counter)}" if _WORKER else \
        f"{base}-{next(_vm_counter)}"


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
    found = sorted(found, key=lambda p: p.stat().st_mtime)[-10:]
    for p in found:
        try:
            tail = p.read_text(errors="replace").splitlines()[-25:]
        except OSError:
            continue
        rep.sections.append((f"tail of {p}", "\n".join(tail)))
    # Then what each daemon is doing now (a hang is still hanging) and what it warned of.
    dumped = _dump_daemon_threads(_LAB_ROOTS)
    _DIGEST.append(f"{item.nodeid}:")
    for p in sorted(set(found) | dumped):
        try:
            lines = p.read_text(errors="replace").splitlines()
        except OSError:
            continue
        warned = [ln for ln in lines if (" WARNING " in ln or " ERROR " in ln)
                  and _stamp(ln) >= since][-6:]
        busy = _busy_threads(lines) if p in dumped else []
        if warned or busy:
            _DIGEST.append(f"  {p}:")
            _DIGEST.extend(f"    {ln[:1500 if 'qemu-storage-daemon' in ln else 300]}"
                           for ln in warned)
            _DIGEST.extend(f"    thread: {t}" for t in busy[:12])


def _stamp(line: str) -> float:
    try:
        return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))
    except ValueError:
        return 0.0


# A failure's digest is printed again at the very end of the run, where a CI excerpt
# that keeps only the last lines still shows it.
_DIGEST: list[str] = []
_FRAME = re.compile(r'\s+File "(.*)", line (\d+) in (.*)')


def _dump_daemon_threads(roots: list[Path]) -> set[Path]:
    """`kill -USR1` every running lab daemon: each appends its threads' stacks to its log.
    Returns those logs."""
    logs = set()
    for root in roots:
        for pidfile in root.rglob("run/daemon.pid"):
            try:
                pid = int(pidfile.read_text().strip())
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                # That home's daemon itself (a killed daemon's pid may be another's now;
                # USR1 ends a process that does not handle it).
                if b"serve" not in cmd or str(pidfile.parent.parent).encode() not in cmd:
                    continue
                os.kill(pid, signal.SIGUSR1)
            except (OSError, ValueError):
                continue
            logs.add(pidfile.parent.parent / "daemon.log")
    if logs:
        time.sleep(0.5)
    return logs


def _busy_threads(lines: list[str]) -> list[str]:
    """The threads of the last dump in a daemon log that are inside vmreplica code and
    not just waiting for work: innermost frame, then the vmreplica frames."""
    last = max((i for i, ln in enumerate(lines) if ln.startswith("Current thread 0x")),
               default=None)
    if last is None:
        return []
    start = last
    while start > 0 and (lines[start - 1].startswith(("Thread 0x", "  File ")) or
                         not lines[start - 1].strip()):
        start -= 1
    end = last + 1
    while end < len(lines) and lines[end].startswith("  File "):
        end += 1
    out, frames = [], []
    for ln in lines[start:end] + ["Thread end"]:
        m = _FRAME.match(ln)
        if m:
            frames.append((Path(m.group(1)).name, m.group(2), m.group(3), m.group(1)))
            continue
        if frames:
            ours = [f for f in frames if "/vmreplica/" in f[3]]
            idle = not ours or (ours[0][0], ours[0][2]) in {("scheduler.py", "_loop"),
                                                            ("daemon.py", "run")}
            if not idle:
                inner = frames[0]
                out.append(f"{inner[2]} ({inner[0]}:{inner[1]}) <- " +
                           " <- ".join(f"{f[2]} ({f[0]}:{f[1]})" for f in ours[:5]))
            frames = []
    return out


def pytest_unconfigure(config):
    """A failure's digest, printed after pytest's last line: a CI excerpt that keeps only
    the end of the output still shows it (storage-daemon lines last, they matter most)."""
    if not _DIGEST:
        return
    lines = _DIGEST[-60:]
    key = [ln for ln in lines if "qemu-storage-daemon" in ln]
    rest = [ln for ln in lines if "qemu-storage-daemon" not in ln]
    print("=" * 20 + " daemon warnings and busy threads of failed tests " + "=" * 20)
    for ln in rest[-30:] + key[-10:]:
        print(ln[:1500])
    sys.stdout.flush()

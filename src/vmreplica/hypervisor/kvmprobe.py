"""Whether KVM can boot a guest on this machine (the qemu driver's `--accel auto`).

`/dev/kvm` opening is not enough: nested or paravirtual KVM (kvm_pvm) can hang a Linux
kernel right after the firmware. So `auto` boots the demo guest under KVM once (up to
~20 s) and remembers the answer for the whole machine, every home and daemon on it:

    /var/cache/vmreplica/kvm-probe.json    as root
    ~/.cache/vmreplica/kvm-probe.json      otherwise ($XDG_CACHE_HOME is honoured)
    $VMREPLICA_CACHE_DIR/kvm-probe.json    when set (tests)

keyed by what would change the answer: the kernel release, /dev/kvm's identity (its
device number and the kvm modules loaded) and the QEMU version. A different key probes
again; `vmreplica host probe-kvm` probes again at once. Answers that cost no boot (no
/dev/kvm, no permission, no demo guest) are never stored. Daemons on one machine take a
file lock around the probe, so a second one waits for the first and reads its answer.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

log = logging.getLogger("vmreplica.qemu")

QEMU = "qemu-system-x86_64"
PROBE_SECONDS = 20.0
CACHE_NAME = "kvm-probe.json"
WHAT = f"probing whether KVM can boot a guest here (once per machine, ~{PROBE_SECONDS:.0f} s)"
WAITING = "waiting for another vmreplica daemon's KVM probe on this machine"

_lock = threading.Lock()
_state: dict | None = None          # the probe this process runs or waits for, if any
_qemu_memo: tuple | None = None     # ((path, mtime, size), version)


def cache_dir() -> Path:
    env = os.environ.get("VMREPLICA_CACHE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/vmreplica")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vmreplica"


def cache_path() -> Path:
    return cache_dir() / CACHE_NAME


def kvm_identity(dev: str = "/dev/kvm", modules: str = "/sys/module") -> str:
    """/dev/kvm's device number and the kvm modules the kernel has loaded (kvm_intel,
    kvm_amd, kvm_pvm...): a different KVM behind the same path is a different answer."""
    try:
        st = os.stat(dev)
    except OSError:
        return "absent"
    try:
        mods = sorted(m for m in os.listdir(modules) if m == "kvm" or m.startswith("kvm_"))
    except OSError:
        mods = []
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)} {','.join(mods) or '-'}"


def qemu_version(binary: str = QEMU) -> str:
    """QEMU's version line, asked again only when the binary changed (a stat)."""
    global _qemu_memo
    path = shutil.which(binary)
    if not path:
        return "absent"
    try:
        st = os.stat(path)
    except OSError:
        return "absent"
    ident = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    if _qemu_memo and _qemu_memo[0] == ident:
        return _qemu_memo[1]
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True,
                                 timeout=10).stdout.split("\n")[0].strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    _qemu_memo = (ident, version)
    return version


def machine_key() -> dict:
    return {"kernel": os.uname().release, "kvm": kvm_identity(), "qemu": qemu_version()}


def read_cache(key: dict | None = None, path: Path | None = None) -> dict | None:
    """The remembered answer, if there is one for ``key`` (the machine's now)."""
    path = path or cache_path()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cached, dict) or cached.get("accel") not in ("kvm", "tcg"):
        return None
    if cached.get("key") != (machine_key() if key is None else key):
        return None
    return cached


def write_cache(record: dict, path: Path | None = None) -> Path | None:
    path = path or cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return path
    except OSError as e:
        log.warning("the KVM probe's answer could not be remembered in %s: %s", path, e)
        return None


def state() -> dict | None:
    """What this process is doing about the probe right now (for the CLI's progress)."""
    s = _state
    if s is None:
        return None
    return {**s, "seconds": round(time.time() - s["since"], 1)}


def _quick(guest: str = "demo") -> tuple[str, str] | None:
    """An answer that needs no boot (never stored): no usable /dev/kvm, no guest."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
        os.close(fd)
    except OSError as e:
        return "tcg", f"/dev/kvm unusable: {e.strerror}"
    from ..errors import UsageError
    from .guest import guest_files
    try:
        guest_files(guest)
    except UsageError:
        return "tcg", "no demo guest to prove KVM with"
    return None


def resolve(setting: str, work: Path) -> str:
    """The accelerator for ``setting`` (auto, kvm, tcg): auto probes at most once per
    machine (see the module)."""
    if setting in ("kvm", "tcg"):
        return setting
    return answer(work)["accel"]


def answer(work: Path, reprobe: bool = False) -> dict:
    """The record for this machine: {accel, reason, key, checked_at, probe_seconds,
    cached (bool), path}; probes (booting a guest under KVM) only when no record matches
    the machine's key, or with ``reprobe``."""
    global _state
    quick = _quick()
    if quick:
        return {"accel": quick[0], "reason": quick[1], "cached": False, "path": None,
                "key": None, "checked_at": time.time(), "probe_seconds": 0.0}
    key = machine_key()
    path = cache_path()
    if not reprobe:
        found = read_cache(key, path)
        if found:
            return {**found, "cached": True, "path": str(path)}
    with _lock:        # one probe at a time in this process...
        if not reprobe:
            found = read_cache(key, path)
            if found:
                return {**found, "cached": True, "path": str(path)}
        _state = {"kind": "kvm-probe", "label": WAITING, "since": time.time(),
                  "expected_seconds": PROBE_SECONDS}
        try:
            with _machine_lock(path):      # ...and on the machine
                if not reprobe:
                    found = read_cache(key, path)
                    if found:
                        log.info("accelerator auto: %s (%s; probed by another daemon, "
                                 "remembered in %s)", found["accel"], found.get("reason"), path)
                        return {**found, "cached": True, "path": str(path)}
                _state = {"kind": "kvm-probe", "label": WHAT, "since": time.time(),
                          "expected_seconds": PROBE_SECONDS}
                log.info("%s", WHAT)
                t0 = time.monotonic()
                accel, reason = probe_kvm(work)
                record = {"key": key, "accel": accel, "reason": reason,
                          "checked_at": time.time(),
                          "probe_seconds": round(time.monotonic() - t0, 1)}
                where = write_cache(record, path)
                log.info("accelerator auto: %s (%s; probed in %.1f s, remembered in %s)",
                         accel, reason, record["probe_seconds"], where or "nowhere")
                return {**record, "cached": False, "path": str(where) if where else None}
        finally:
            _state = None


@contextlib.contextmanager
def _machine_lock(path: Path):
    """An exclusive lock beside the cache file (none if its folder cannot be made)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path.with_name(path.name + ".lock"), "a+")  # noqa: SIM115 — closed in the finally
    except OSError:
        yield
        return
    try:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
    finally:
        f.close()


def probe_kvm(work: Path, timeout: float = PROBE_SECONDS) -> tuple[str, str]:
    """KVM only if a guest boots under it here: /dev/kvm opening is not enough (nested
    virtualization can hang a Linux kernel right after the firmware)."""
    quick = _quick()
    if quick:
        return quick
    from ..qemutools import img
    from .guest import guest_files
    files = guest_files("demo")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    disk = work / "kvm-probe.qcow2"
    log_path = work / "kvm-probe.log"
    log_path.unlink(missing_ok=True)
    img.create(disk, 16 << 20, "qcow2")
    proc = subprocess.Popen(
        [QEMU, "-machine", "pc,accel=kvm", "-cpu", "host", "-m", "256", "-nodefaults",
         "-display", "none", "-no-user-config", "-serial", f"file:{log_path}", "-nic", "none",
         "-kernel", str(files["kernel"]), "-initrd", str(files["initrd"]),
         "-append", files["cmdline"], "-no-reboot",
         "-drive", f"file={disk},if=virtio,format=qcow2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return "tcg", f"QEMU with KVM exited ({proc.returncode})"
            try:
                if files["ready_marker"] in log_path.read_text(errors="replace"):
                    return "kvm", "a guest booted under KVM"
            except OSError:
                pass
            time.sleep(0.2)
        return "tcg", f"a guest did not boot under KVM within {timeout:.0f} s"
    finally:
        proc.kill()
        proc.wait()
        disk.unlink(missing_ok=True)
        log_path.unlink(missing_ok=True)

"""The KVM probe's answer is remembered once per machine, keyed by what would change it
(issue 17, item 4): the kernel release, /dev/kvm's identity and the QEMU version."""

from __future__ import annotations

import json
import os

import pytest

from vmreplica.hypervisor import kvmprobe


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VMREPLICA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / kvmprobe.CACHE_NAME


def test_cache_location_follows_the_user(monkeypatch, tmp_path):
    monkeypatch.setenv("VMREPLICA_CACHE_DIR", str(tmp_path / "x"))
    assert kvmprobe.cache_path() == tmp_path / "x" / "kvm-probe.json"
    monkeypatch.delenv("VMREPLICA_CACHE_DIR")
    if os.geteuid() == 0:
        assert kvmprobe.cache_dir() == kvmprobe.Path("/var/cache/vmreplica")
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert kvmprobe.cache_dir() == tmp_path / "xdg" / "vmreplica"


def test_machine_key_names_kernel_kvm_and_qemu():
    key = kvmprobe.machine_key()
    assert set(key) == {"kernel", "kvm", "qemu"}
    assert key["kernel"] == os.uname().release
    assert key["qemu"].startswith("QEMU emulator version") or key["qemu"] == "absent"
    if os.path.exists("/dev/kvm"):
        st = os.stat("/dev/kvm")
        assert key["kvm"].startswith(f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)} ")
    assert kvmprobe.machine_key() == key          # stable (QEMU's version is memoized)


def test_kvm_identity_changes_with_the_device_and_the_modules(tmp_path):
    mods = tmp_path / "module"
    (mods / "kvm").mkdir(parents=True)
    (mods / "kvm_pvm").mkdir()
    (mods / "ext4").mkdir()
    first = kvmprobe.kvm_identity("/dev/null", str(mods))
    assert first == "1:3 kvm,kvm_pvm"
    (mods / "kvm_pvm").rmdir()
    (mods / "kvm_intel").mkdir()
    assert kvmprobe.kvm_identity("/dev/null", str(mods)) == "1:3 kvm,kvm_intel"
    assert kvmprobe.kvm_identity("/dev/zero", str(mods)) == "1:5 kvm,kvm_intel"
    assert kvmprobe.kvm_identity(str(tmp_path / "nothing"), str(mods)) == "absent"


def test_answer_is_kept_for_its_key_and_dropped_when_a_part_changes(cache):
    key = {"kernel": "6.1.0-1", "kvm": "10:232 kvm,kvm_intel", "qemu": "QEMU 7.2"}
    assert kvmprobe.read_cache(key) is None                       # nothing yet
    record = {"key": key, "accel": "tcg", "reason": "a guest did not boot under KVM",
              "checked_at": 1.0, "probe_seconds": 20.0}
    assert kvmprobe.write_cache(record) == cache
    assert json.loads(cache.read_text())["accel"] == "tcg"
    assert kvmprobe.read_cache(dict(key))["reason"] == "a guest did not boot under KVM"
    for part, other in (("kernel", "6.1.0-2"), ("kvm", "10:232 kvm,kvm_pvm"),
                        ("qemu", "QEMU 8.0")):
        assert kvmprobe.read_cache({**key, part: other}) is None, part
    cache.write_text("{not json")
    assert kvmprobe.read_cache(key) is None                       # damaged: probe again
    cache.write_text(json.dumps({**record, "accel": "bogus"}))
    assert kvmprobe.read_cache(key) is None


def test_a_remembered_answer_for_this_machine_is_used_without_probing(cache, tmp_path):
    """`answer` reads the machine's record and boots nothing (it returns at once)."""
    if kvmprobe._quick():
        pytest.skip("this machine answers without booting a guest: "
                    f"{kvmprobe._quick()[1]}")
    key = kvmprobe.machine_key()
    kvmprobe.write_cache({"key": key, "accel": "kvm", "reason": "remembered",
                          "checked_at": 5.0, "probe_seconds": 20.0})
    import time
    t0 = time.monotonic()
    found = kvmprobe.answer(tmp_path / "work")
    assert time.monotonic() - t0 < 2.0
    assert (found["accel"], found["reason"], found["cached"]) == ("kvm", "remembered", True)
    assert kvmprobe.resolve("auto", tmp_path / "work") == "kvm"
    assert kvmprobe.resolve("tcg", tmp_path / "work") == "tcg"
    assert not (tmp_path / "work").exists()                       # no probe ran
    # A record for another QEMU is not this machine's answer.
    kvmprobe.write_cache({"key": {**key, "qemu": "QEMU 0.1"}, "accel": "kvm",
                          "reason": "old", "checked_at": 5.0})
    assert kvmprobe.read_cache() is None

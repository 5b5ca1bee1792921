"""Errors an operator meets in the first hour say what is wrong and where to fix it
(issue 17, items 6 and 7): the parts that need no daemon."""

from __future__ import annotations

import argparse
import io
import shutil
import sys

import pytest

from vmreplica.cli import console_cmd
from vmreplica.cli import main as cli_main
from vmreplica.errors import UsageError
from vmreplica.hypervisor.qemu import block as qemu_block
from vmreplica.hypervisor.qemu import cmdline as qemu_cmdline
from vmreplica.service import trust, vms
from vmreplica.transport import tls

FP = "sha256:" + "670b4a8c405ff89a" + "1c3e" + "0" * 44


def _typo(fp: str, at: int) -> str:
    return fp[:at] + ("f" if fp[at] != "f" else "e") + fp[at + 1:]


# -- 6. a pairing token that does not match ------------------------------------------
def test_fingerprints_are_shown_in_full_with_the_differences_marked():
    other = _typo(FP, 30)
    shown, ndiff = tls.compare_fingerprints(FP, other, ("site-b presents", "the token expects"))
    lines = shown.splitlines()
    assert ndiff == 1
    assert FP in lines[0] and other in lines[1]          # in full, not cut at 16 digits
    # The caret sits under the one character that differs, in both lines.
    start = lines[0].index(FP)
    assert lines[1].index(other) == start                # aligned
    col = lines[2].index("^")
    assert lines[2].count("^") == 1 and col == start + 30
    assert lines[0][col] != lines[1][col] and lines[0][start:col] == lines[1][start:col]


def test_a_mistyped_token_is_called_mistyped_and_the_address_is_not_blamed():
    err = trust.token_mismatch("127.0.0.1:8442", "site-b", FP, _typo(FP, 40))
    assert "probably mistyped" in err.message and "^" in err.message
    assert FP in err.message and _typo(FP, 40) in err.message
    assert "token may be wrong" in err.hint and "trust token` on site-b" in err.hint
    assert "check the address" not in err.hint


def test_a_token_from_another_host_is_told_apart_from_a_typo():
    theirs = "sha256:" + "ab" * 32
    err = trust.token_mismatch("127.0.0.1:8442", "site-b", FP, theirs)
    assert "made on another host" in err.message and "of its 64 characters" in err.message
    assert "trust token` on site-b" in err.hint


# -- 7. `--disk -1G` -----------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--disk", "-1G"], ["--disk=-1G"]])
def test_a_negative_disk_size_reaches_the_size_check(argv):
    line = ["vm", "create", "x1", *argv]
    args = cli_main.build_parser(line).parse_args(line)
    assert args.disk == ["-1G"]
    with pytest.raises(UsageError, match="disk size must be positive"):
        vms._disk_size(args.disk[0])


def test_options_still_parse_around_a_negative_value():
    line = ["vm", "create", "x1", "--disk", "-1G", "--memory", "64", "--disk", "2G"]
    args = cli_main.build_parser(line).parse_args(line)
    assert args.disk == ["-1G", "2G"] and args.memory == 64


# -- 7. QEMU's own reason, from its log ----------------------------------------------
def test_qemu_error_keeps_qemus_last_words():
    log = ("\nqemu-system-x86_64: cannot set up guest memory 'pc.ram': "
           "Cannot allocate memory\n\n")
    assert qemu_cmdline.qemu_error(log) == "cannot set up guest memory 'pc.ram': Cannot allocate memory"
    assert qemu_cmdline.qemu_error("") == ""
    many = "\n".join(f"qemu-system-x86_64: line {i}" for i in range(10))
    assert qemu_cmdline.qemu_error(many) == "line 7; line 8; line 9"


# -- 7. `vm io` with a command qemu-io rejects ---------------------------------------
needs_qemu_io = pytest.mark.skipif(shutil.which("qemu-io") is None, reason="no qemu-io")


@needs_qemu_io
@pytest.mark.parametrize("command,says", [
    ("bogus 0 4k", 'command "bogus" not found'),
    ("write -P 1 0", "off len"),                      # qemu-io's usage line
    ("write x 4k", "non-numeric"),
    ("write 30M 4M", "write failed"),                 # past the end of a 32 MiB disk
])
def test_a_command_qemu_io_rejects_is_refused(command, says):
    with pytest.raises(UsageError, match="qemu-io rejects") as e:
        qemu_block.check_qemu_io(command, 32 << 20, "vm1/disk0")
    assert says in e.value.message and "32.0 MiB" in e.value.message


@needs_qemu_io
@pytest.mark.parametrize("command", ["write -P 1 0 4k", "read -P 7 0 4k", "discard 0 4k",
                                     "flush", "write -z 31M 1M"])
def test_a_command_qemu_io_accepts_passes(command):
    qemu_block.check_qemu_io(command, 32 << 20, "vm1/disk0")   # read -P: data is not checked


# -- 7. the console after a failed enable --------------------------------------------
def test_the_console_offers_no_initial_copy_after_enable_failed(tmp_path, monkeypatch, capsys):
    # A home with no host in it: `enable` fails as it would on any refusal.
    args = argparse.Namespace(home=str(tmp_path / "nohome"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("web1\n127.0.0.1:1\n30s\ny\n"))
    console_cmd._do(args, "enable")
    out = capsys.readouterr().out
    assert "$ vmreplica enable web1" in out and "(failed, exit" in out
    assert "initial copy now" not in out and "$ vmreplica initial" not in out
    assert "not enabled" in out


# -- continuous mode and a disk only the hash scan tracks (issue 19) ----------------------
def test_continuous_mode_refuses_a_scan_tracked_disk_with_the_ways_out():
    from vmreplica.domain import tracking
    from vmreplica.primary.common import check_mirrorable
    how = {"vda": tracking.CHECKPOINT, "vdb": tracking.SCAN, "vdc": tracking.SCAN,
           "vdd": tracking.BITMAP}
    check_mirrorable("ops1", how, ["vda", "vdd"])            # bitmaps: mirrored
    with pytest.raises(UsageError) as e:
        check_mirrorable("ops1", how, ["vda", "vdb", "vdc"])
    assert "continuous mode cannot replicate disks vdb, vdc of ops1" in e.value.message
    assert "hash scan" in e.value.message
    assert e.value.hint is not None
    assert "--mode periodic" in e.value.hint and "--exclude-disk vdb" in e.value.hint
    assert "qemu-img convert -O qcow2" in e.value.hint

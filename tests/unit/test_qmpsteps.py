"""The QMP steps both drivers run (qemutools.qmpsteps), against a fake QEMU: ending a
mirror, the guest held paused while it ends (and freed by the cut when the pause hangs),
bitmap transactions."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import pytest

from vmreplica.errors import HypervisorError
from vmreplica.qemutools import qmpsteps

log = logging.getLogger("test")


class FakeQEMU:
    """Records commands; mirror jobs go once cancelled; ``refuse`` names commands that fail."""

    def __init__(self, disks=(), refuse=()):
        self.sent: list[tuple[str, dict | None]] = []
        self.jobs = {f"mirror-{d}" for d in disks}
        self.refuse = set(refuse)

    def execute(self, command, arguments=None):
        self.sent.append((command, arguments))
        if command in self.refuse:
            raise HypervisorError(f"refused {command}")
        if command == "block-job-cancel":
            self.jobs.discard(arguments["device"])
        if command == "query-block-jobs":
            return [{"device": j, "type": "mirror"} for j in sorted(self.jobs)]
        return {}

    def commands(self):
        return [c for c, _ in self.sent]


def test_ending_a_mirror_cancels_waits_and_deletes_the_targets():
    q = FakeQEMU(["disk0", "disk1"])
    qmpsteps.end_mirror_jobs(q, ["disk0", "disk1"], lambda d: f"mt-{d}")
    assert q.commands() == ["block-job-cancel", "block-job-cancel", "query-block-jobs",
                            "blockdev-del", "blockdev-del"]
    assert [a["node-name"] for c, a in q.sent if c == "blockdev-del"] == ["mt-disk0", "mt-disk1"]


def test_mirror_jobs_and_the_mirror_arguments():
    jobs = [{"device": "mirror-disk0"}, {"device": "fleece-disk0"}, {"device": "collapse-x"}]
    assert qmpsteps.mirror_jobs(jobs) == {"disk0": {"device": "mirror-disk0"}}
    args = qmpsteps.active_mirror("disk0", "node0", "mt-disk0")
    assert args["job-id"] == "mirror-disk0" and args["copy-mode"] == "write-blocking"
    node = qmpsteps.replica_export_node("mt-disk0", "disk0", {"host": "h", "port": 10809,
                                                              "tls_hostname": "b"})
    assert node["server"] == {"type": "inet", "host": "h", "port": "10809"}
    assert node["tls-creds"] == qmpsteps.TLS_CREDS and node["discard"] == "unmap"


def test_the_guest_is_paused_while_the_body_runs_and_the_mark_says_so(tmp_path):
    mark = tmp_path / "run" / "vm.paused-by-vmreplica"
    seen = []
    with qmpsteps.quiet_guest("vm1", mark, pause=lambda: seen.append("pause"),
                              resume=lambda: seen.append("resume"),
                              guard=contextlib.nullcontext(None), guard_seconds=1, log=log):
        seen.append("body")
        assert mark.read_text() == "vm1"
    assert seen == ["pause", "body", "resume"]
    assert not mark.exists()


def test_a_guest_that_cannot_be_paused_has_its_jobs_ended_as_they_are(tmp_path):
    mark = tmp_path / "vm.paused-by-vmreplica"
    seen = []

    def pause():
        raise HypervisorError("no")

    with qmpsteps.quiet_guest("vm1", mark, pause=pause, resume=lambda: seen.append("resume"),
                              guard=contextlib.nullcontext(None), guard_seconds=1, log=log):
        seen.append("body")
        assert not mark.exists()
    assert seen == ["body"]


def test_a_pause_that_hangs_is_freed_by_the_cut(tmp_path):
    freed = threading.Event()
    cuts = []

    def cut():
        cuts.append(time.monotonic())
        freed.set()

    @contextlib.contextmanager
    def guard():
        yield cut
        cuts.append("closed")                 # the guard ends after the cut, not before

    started = time.monotonic()
    with qmpsteps.quiet_guest("vm1", tmp_path / "m", pause=lambda: freed.wait(5),
                              resume=lambda: None, guard=guard(), guard_seconds=0.2, log=log):
        pass
    assert len(cuts) == 2 and cuts[1] == "closed" and cuts[0] - started >= 0.2


def test_bitmap_actions_and_an_empty_transaction():
    q = FakeQEMU()
    qmpsteps.transaction(q, [])
    assert q.sent == []
    actions = [qmpsteps.bitmap_add("d", "b1", persistent=False, disabled=True),
               qmpsteps.bitmap_merge("d", "b1", ["b0"]), qmpsteps.bitmap_remove("d", "b0")]
    qmpsteps.transaction(q, actions)
    assert q.sent == [("transaction", {"actions": actions})]
    assert actions[0]["data"] == {"node": "d", "name": "b1", "persistent": False,
                                  "disabled": True}
    assert "disabled" not in qmpsteps.bitmap_add("d", "b2")["data"]


def test_resuming_passes_over_jobs_that_are_gone():
    q = FakeQEMU(refuse={"block-job-resume"})
    qmpsteps.resume_mirror_jobs(q, ["disk0", "disk1"])
    assert q.commands() == ["block-job-resume", "block-job-resume"]
    with pytest.raises(HypervisorError):
        q.execute("block-job-resume", {})

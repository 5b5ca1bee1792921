"""A cycle's block session whose storage daemon had to be killed at the end: before the
cycle was committed that is the cycle's failure; after, it costs the tracking (an event
says the next cycle resynchronises), not the cycle the replica already has."""

from __future__ import annotations

import pytest

from vmreplica.primary.cycle import _session
from vmreplica.qemutools.qsd import QuitTimeout


class _Session:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        raise QuitTimeout("qemu-storage-daemon x did not exit within 60 s of quit and was killed")


class _Host:
    def __init__(self):
        self.events = []
        self.driver = self

    def block_session(self, name):
        return _Session()

    def event(self, kind, message, vm):
        self.events.append((kind, message, vm))


def test_a_kill_after_the_commit_costs_the_tracking_not_the_cycle():
    host = _Host()
    with _session(host, "vm1", 7, "vm1", [True]) as s:
        assert isinstance(s, _Session)
    assert host.events == [("cycle", ("cycle 7 reached the replica, but qemu-storage-daemon x "
                                      "did not exit within 60 s of quit and was killed: its "
                                      "change-tracking bitmaps are lost, the next cycle "
                                      "resynchronizes"), "vm1")]


def test_a_kill_before_the_commit_fails_the_cycle():
    host = _Host()
    with pytest.raises(QuitTimeout):
        with _session(host, "vm1", 7, "vm1", []):
            pass
    assert host.events == []



def test_an_error_after_the_commit_is_not_hidden_by_the_kill():
    host = _Host()
    with pytest.raises(QuitTimeout) as info:
        with _session(host, "vm1", 7, "vm1", [True]):
            raise RuntimeError("releasing the stale bitmaps failed")
    assert isinstance(info.value.__context__, RuntimeError)
    assert host.events == []

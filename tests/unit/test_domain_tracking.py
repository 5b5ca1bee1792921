"""domain.tracking: which disks a delta scans, and the per-disk lines status and measure
show (how each disk is tracked, what its last scan read and moved)."""

from __future__ import annotations

from vmreplica.domain import tracking as t

MiB = 1 << 20


def test_only_scan_tracked_disks_are_scanned_in_the_relationship_order():
    how = {"vda": t.CHECKPOINT, "vdc": t.SCAN, "vdb": t.SCAN, "vdd": t.VOLATILE}
    assert t.scanned(how, ["vda", "vdb", "vdc", "vdd"]) == ["vdb", "vdc"]
    assert t.scanned(how, ["vda"]) == []
    assert t.scanned({}, ["vda", "vdb"]) == []      # (not known: never scanned by a delta)


def test_lines_say_the_tracking_and_a_scanned_disks_last_cost():
    costs = {"vdb": {"read": 64 * MiB, "compared": 64 * MiB, "moved": 128 << 10, "at": 5.0}}
    lines = t.disk_lines(["vda", "vdb", "vdc"], {"vda": t.CHECKPOINT, "vdb": t.SCAN}, costs)
    assert [line.text() for line in lines] == [
        "vda: checkpoint",
        "vdb: scan (last cycle read 64.0 MiB, moved 128.0 KiB)",
        "vdc: unknown"]
    as_json = [line.to_dict() for line in lines]
    assert as_json[0] == {"disk": "vda", "tracking": "checkpoint", "last_scan": None}
    assert as_json[1]["last_scan"] == {"read": 64 * MiB, "compared": 64 * MiB,
                                       "moved": 128 << 10, "at": 5.0}
    assert [t.text_of(d) for d in as_json] == [line.text() for line in lines]


def test_a_scan_not_run_yet_shows_no_cost():
    line = t.disk_lines(["vdb"], {"vdb": t.SCAN}, {})[0]
    assert line.last_scan is None and line.text() == "vdb: scan"

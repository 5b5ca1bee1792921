"""Following the primary's configuration (domain.config): which disks join, leave or
change size, and what that asks of the relationship. Pure."""

from vmreplica.domain.config import DiskPlan, digest, disk_plan

M = 1 << 20


def test_nothing_changed():
    plan = disk_plan(["vda", "vdb"], [], [("vda", 64 * M), ("vdb", 32 * M)],
                     {"vda": 64 * M, "vdb": 32 * M})
    assert not plan.changed and not plan.resync and plan.lines() == []
    assert plan.disks == ["vda", "vdb"]


def test_a_disk_added_grown_removed():
    plan = disk_plan(["vda", "vdb"], [], [("vda", 96 * M), ("vdc", 16 * M)],
                     {"vda": 64 * M, "vdb": 32 * M})
    assert plan.added == ["vdc"] and plan.removed == ["vdb"]
    assert plan.resized == {"vda": (64 * M, 96 * M)} and plan.shrunk == []
    assert plan.disks == ["vda", "vdc"] and plan.changed
    assert plan.resync                        # the new disk is seeded by a resync
    assert plan.lines() == ["disk vdc added", "disk vda grown 64.0 MiB → 96.0 MiB",
                            "disk vdb removed"]


def test_a_grown_disk_alone_needs_no_resync_a_shrunk_one_does():
    grown = disk_plan(["vda"], [], [("vda", 2 << 30)], {"vda": 1 << 30})
    assert grown.changed and not grown.resync
    assert grown.lines() == ["disk vda grown 1.0 GiB → 2.0 GiB"]
    shrunk = disk_plan(["vda"], [], [("vda", 512 * M)], {"vda": 1 << 30})
    assert shrunk.shrunk == ["vda"] and shrunk.resync
    assert shrunk.lines() == ["disk vda shrunk 1.0 GiB → 512.0 MiB"]


def test_excluded_disks_stay_out_and_vanish_with_the_domains():
    plan = disk_plan(["vda"], ["vdb", "vdx"], [("vda", M), ("vdb", M)], {"vda": M})
    assert not plan.changed and plan.disks == ["vda"] and plan.excluded == ["vdb"]


def test_the_domains_order_is_kept_and_a_disk_without_a_size_sent_is_as_it_is():
    plan = disk_plan(["vdb"], [], [("vda", M), ("vdb", 2 * M)], {})
    assert plan.disks == ["vda", "vdb"] and plan.added == ["vda"] and plan.resized == {}


def test_an_added_disk_that_cannot_be_replicated_is_excluded():
    plan = disk_plan(["vda"], ["vdz"], [("vda", M), ("vdb", M), ("vdc", M), ("vdz", M)],
                     {"vda": M})
    out = plan.refusing(["vdc"])
    assert out == DiskPlan(disks=["vda", "vdb"], excluded=["vdz", "vdc"], added=["vdb"])
    assert out.lines() == ["disk vdb added"]


def test_the_digest_tells_definitions_apart():
    assert digest("<domain/>") == digest("<domain/>") != digest("<domain />")
    assert len(digest("")) == 64

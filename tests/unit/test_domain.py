import pytest

from vmreplica.domain import patterns, schedule, states, units
from vmreplica.errors import Conflict, UsageError


@pytest.mark.parametrize("text,expected", [("8G", 8 << 30), ("512M", 512 << 20), ("1g", 1 << 30),
                                           ("64KiB", 64 << 10), ("1048576", 1 << 20)])
def test_parse_size(text, expected):
    assert units.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "0", "-1G", "1000"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError):
        units.parse_size(text)


def test_frequencies_are_the_three_supported():
    assert [schedule.parse_frequency(f) for f in ("30s", "5m", "15m")] == [30, 300, 900]
    with pytest.raises(UsageError, match="30s, 5m or 15m"):
        schedule.parse_frequency("10m")


def test_due_and_missed():
    assert schedule.next_due(None, 30) == 0
    assert schedule.next_due(100, 30) == 130
    assert schedule.missed_cycles(0, 59, 30) == 0
    assert schedule.missed_cycles(0, 95, 30) == 2


@pytest.mark.parametrize("pattern,name,ok", [
    ("*", "anything.example.com", True),
    ("*.example.com", "site-a.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "site-a.example.org", False),
    ("primary", "PRIMARY", True),
    ("web-*", "web-01", True),
])
def test_patterns(pattern, name, ok):
    assert patterns.matches(patterns.validate_pattern(pattern), name) is ok


def test_invalid_pattern():
    with pytest.raises(UsageError):
        patterns.validate_pattern("bad name!")


def test_most_specific_authorization_wins():
    entries = [{"pattern": "*", "storage": "/a", "tag": ""},
               {"pattern": "*.example.com", "storage": "/b", "tag": "x"}]
    assert patterns.find_authorization(entries, "h.example.com")["storage"] == "/b"
    assert patterns.find_authorization(entries, "other")["storage"] == "/a"
    assert patterns.find_authorization(entries[1:], "other") is None


def test_state_machine():
    S = states.State
    assert states.check_transition(S.READY_FOR_INITIAL, S.INITIAL_IN_PROGRESS) == S.INITIAL_IN_PROGRESS
    with pytest.raises(Conflict):
        states.check_transition(S.FAILED_OVER, S.REPLICATING)
    with pytest.raises(Conflict):
        states.check_transition(S.WAITING_FOR_INITIAL, S.SUSPENDED)




def test_dr_link_keys_and_where_the_vm_runs():
    from vmreplica.domain import links
    assert links.dr_key("web1") == "web1@dr" and links.vm_name("web1@dr") == "web1"
    assert links.vm_name("web1") == "web1"
    assert links.is_dr("web1@dr") and not links.is_dr("web1")
    assert links.runs_here(None)                                  # DR-protected only
    from vmreplica.domain.relationship import Relationship

    def rel(role, state, **kw):
        return Relationship(vm="web1", id="r1", peer="b", role=role, state=state, **kw)
    assert links.runs_here(rel("primary", "replicating"))
    assert not links.runs_here(rel("primary", "error", fenced="x"))
    assert links.runs_here(rel("replica", "failed_over"))                 # ALONE
    assert not links.runs_here(rel("replica", "replicating"))
    assert not links.runs_here(rel("replica", "failover_in_progress"))

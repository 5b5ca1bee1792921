import pytest

from vmreplica.domain.networks import format_network_map, merged, parse_network_map
from vmreplica.errors import UsageError


def test_entries_parse_into_a_map():
    assert parse_network_map(["lan=dr-lan", " br0 = br-dr ", "lan=dr-lan"]) == \
        {"lan": "dr-lan", "br0": "br-dr"}
    assert parse_network_map(None) == {}


@pytest.mark.parametrize("bad", ["lan", "=x", "lan=", "a b=c", "lan=x/y", "lan=a=b"])
def test_bad_entries_are_refused_with_the_form(bad):
    with pytest.raises(UsageError) as e:
        parse_network_map([bad])
    assert "SRC=DST" in (e.value.hint or "")


def test_a_source_mapped_twice_is_refused():
    with pytest.raises(UsageError, match="mapped twice"):
        parse_network_map(["lan=a", "lan=b"])


def test_a_vms_own_map_overrides_the_servers_default():
    assert merged({"lan": "a", "dmz": "d"}, {"lan": "b"}) == {"lan": "b", "dmz": "d"}
    assert format_network_map({"b": "2", "a": "1"}) == "a=1, b=2"
    assert format_network_map({}) == "none"

"""Failover IPs (domain.reip): parsing, checking against a VM's NICs, the commands and
files they turn into inside a guest, and the check of the guest's answer."""

from __future__ import annotations

import ipaddress

import pytest

from vmreplica.domain.reip import (
    FailoverIP,
    commands,
    format_failover_ips,
    has_address,
    interface_of,
    parse_failover_ip,
    parse_failover_ips,
    resolv_conf,
    resolve,
)
from vmreplica.errors import UsageError

MAC = "52:54:00:5e:17:01"
MAC2 = "52:54:00:5e:17:02"


def test_full_entry_parses_and_round_trips():
    ip = parse_failover_ip(f"{MAC.upper()}=10.77.0.5/24,gw=10.77.0.1,dns=10.77.0.53+1.1.1.1")
    assert ip.nic == MAC and ip.mac == MAC
    assert ip.address == ipaddress.ip_interface("10.77.0.5/24")
    assert ip.gateway == ipaddress.ip_address("10.77.0.1")
    assert [str(d) for d in ip.dns] == ["10.77.0.53", "1.1.1.1"]
    assert parse_failover_ip(ip.text()) == ip
    assert FailoverIP.from_dict(ip.to_dict()) == ip
    assert ip.text() == f"{MAC}=10.77.0.5/24,gw=10.77.0.1,dns=10.77.0.53+1.1.1.1"


def test_index_and_ipv6_and_address_alone():
    ip = parse_failover_ip("1=2001:db8::5/64,gw=fe80::1")
    assert ip.nic == "1" and ip.mac is None and ip.address.version == 6
    assert parse_failover_ip("0=192.168.1.9/32").gateway is None


@pytest.mark.parametrize("entry, words", [
    ("10.77.0.5/24", "bad failover IP"),
    (f"{MAC}=", "bad failover IP"),
    ("52:54:00:5e:17=10.0.0.5/24", "bad NIC"),
    ("eth0=10.0.0.5/24", "bad NIC"),
    (f"{MAC}=10.77.0.5", "no prefix length"),
    (f"{MAC}=10.77.0.300/24", "bad address"),
    (f"{MAC}=10.77.0.5/33", "bad address"),
    (f"{MAC}=10.77.0.0/24", "network address"),
    (f"{MAC}=10.77.0.255/24", "broadcast address"),
    (f"{MAC}=127.0.0.5/8", "cannot be a NIC's address"),
    (f"{MAC}=10.77.0.5/24,gw=10.78.0.1", "is not in 10.77.0.0/24"),
    (f"{MAC}=10.77.0.5/24,gw=10.77.0.5", "the NIC's own address"),
    (f"{MAC}=10.77.0.5/24,gw=2001:db8::1", "not an IPv4 address"),
    (f"{MAC}=10.77.0.5/24,gw=banana", "bad gateway"),
    (f"{MAC}=10.77.0.5/24,dns=10.0.0.1+x", "bad DNS server"),
    (f"{MAC}=10.77.0.5/24,dns=1.1.1.1+1.1.1.2+1.1.1.3+1.1.1.4", "at most 3"),
    (f"{MAC}=10.77.0.5/24,mtu=1500", "bad option"),
    (f"{MAC}=10.77.0.5/24,gw=10.77.0.1,gw=10.77.0.2", "given twice"),
])
def test_bad_entries_are_refused_with_the_reason(entry, words):
    with pytest.raises(UsageError) as e:
        parse_failover_ip(entry)
    assert words in e.value.message


def test_none_clears_and_must_stand_alone():
    assert parse_failover_ips(["none"]) == []
    assert parse_failover_ips(None) == []
    with pytest.raises(UsageError, match="give it alone"):
        parse_failover_ips(["none", f"{MAC}=10.0.0.5/24"])


def test_resolve_turns_indexes_into_macs_and_refuses_what_the_vm_lacks():
    ips = resolve(parse_failover_ips(["1=10.1.0.5/24", f"{MAC}=10.0.0.5/24,gw=10.0.0.1"]),
                  [MAC, MAC2.upper()], "web")
    assert [ip.nic for ip in ips] == [MAC2, MAC]
    with pytest.raises(UsageError) as e:
        resolve(parse_failover_ips(["2=10.0.0.5/24"]), [MAC, MAC2], "web")
    assert "web has no NIC 2" in e.value.message and f"1={MAC2}" in (e.value.hint or "")
    with pytest.raises(UsageError, match="no NIC with MAC 52:54:00:00:00:09"):
        resolve(parse_failover_ips(["52:54:00:00:00:09=10.0.0.5/24"]), [MAC], "web")
    with pytest.raises(UsageError, match="two failover IPs"):
        resolve(parse_failover_ips(["0=10.0.0.5/24", f"{MAC}=10.0.0.6/24"]), [MAC], "web")
    with pytest.raises(UsageError, match="default gateways"):
        resolve(parse_failover_ips(["0=10.0.0.5/24,gw=10.0.0.1", "1=10.1.0.5/24,gw=10.1.0.1"]),
                [MAC, MAC2], "web")
    with pytest.raises(UsageError, match="no NIC 0"):
        resolve(parse_failover_ips(["0=10.0.0.5/24"]), [], "web")


def test_commands_resolv_conf_and_the_check():
    ip = parse_failover_ip(f"{MAC}=10.77.0.5/24,gw=10.77.0.1,dns=10.77.0.53")
    other = parse_failover_ip(f"{MAC2}=10.78.0.5/24,dns=10.77.0.53+10.78.0.53")
    assert commands(ip, "ens3") == [
        ["ip", "-4", "addr", "flush", "dev", "ens3", "scope", "global"],
        ["ip", "addr", "add", "10.77.0.5/24", "dev", "ens3"],
        ["ip", "link", "set", "dev", "ens3", "up"],
        ["ip", "-4", "route", "replace", "default", "via", "10.77.0.1", "dev", "ens3"]]
    assert len(commands(other, "ens4")) == 3               # no gateway: no route
    assert resolv_conf([ip, other]).splitlines()[1:] == [
        "nameserver 10.77.0.53", "nameserver 10.78.0.53"]
    assert resolv_conf([parse_failover_ip("0=10.0.0.5/24")]) is None
    reply = [{"name": "lo", "hardware-address": "00:00:00:00:00:00",
              "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1",
                                "prefix": 8}]},
             {"name": "ens3", "hardware-address": MAC.upper(),
              "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "10.77.0.5",
                                "prefix": 24},
                               {"ip-address-type": "ipv6", "ip-address": "fe80::1",
                                "prefix": 64}]}]
    found = interface_of(MAC, reply)
    assert found is not None and found["name"] == "ens3"
    assert interface_of(MAC2, reply) is None
    assert has_address(ip, found)
    assert not has_address(parse_failover_ip(f"{MAC}=10.77.0.5/16"), found)
    assert not has_address(parse_failover_ip(f"{MAC}=10.77.0.6/24"), found)
    assert format_failover_ips([ip]) == ip.text() and format_failover_ips([]) == "none"


def test_from_dict_checks_what_a_peer_sends():
    with pytest.raises(UsageError):
        FailoverIP.from_dict({"nic": MAC, "address": "10.0.0.5"})
    with pytest.raises(UsageError):
        FailoverIP.from_dict("52:54:00:5e:17:01=10.0.0.5/24")
    with pytest.raises(UsageError):
        FailoverIP.from_dict({"nic": MAC, "address": "10.0.0.5/24", "dns": "10.0.0.1"})

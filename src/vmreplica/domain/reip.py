"""Re-IP at failover: the address a replicated VM's NIC takes inside the guest once it
runs on the replica host. ``--failover-ip NIC=ADDR/PREFIX[,gw=GW][,dns=A+B]`` — NIC by
MAC (``52:54:00:12:34:56``) or by index in the VM's definition (``0``), one entry per
NIC; an index is turned into that NIC's MAC when it is set (``resolve``), so the replica
needs only MACs and finds the interface inside the guest by its hardware address.

Pure: parsing and checking the entries, the commands that set an address inside a Linux
guest (iproute2, run through the guest agent's guest-exec), the resolv.conf text, and
the check of the result against ``guest-network-get-interfaces``. The replica's
replica.reip runs them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_INDEX = re.compile(r"^[0-9]{1,2}$")
MAX_DNS = 3               # resolv.conf: the resolver reads three nameservers
NONE = ("none", "")       # `set VM --failover-ip none`: no re-IP any more

FORMAT_HINT = ("NIC=ADDR/PREFIX[,gw=GW][,dns=A+B], NIC a MAC address or the NIC's index "
               "(0 first), e.g. --failover-ip 52:54:00:5e:17:01=10.77.0.5/24,gw=10.77.0.1,"
               "dns=10.77.0.53+10.77.0.54")


@dataclass(frozen=True)
class FailoverIP:
    """One NIC's address at failover."""
    nic: str                     # a MAC (lower case) or, before ``resolve``, an index
    address: IPInterface         # address and prefix (ip_interface)
    gateway: IPAddress | None = None
    dns: tuple[IPAddress, ...] = ()

    @property
    def mac(self) -> str | None:
        return self.nic if _MAC.match(self.nic) else None

    def text(self) -> str:
        """As the operator writes it (``parse_failover_ip(x.text()) == x``)."""
        out = f"{self.nic}={self.address.with_prefixlen}"
        if self.gateway is not None:
            out += f",gw={self.gateway}"
        if self.dns:
            out += ",dns=" + "+".join(str(d) for d in self.dns)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"nic": self.nic, "address": self.address.with_prefixlen,
                "gateway": None if self.gateway is None else str(self.gateway),
                "dns": [str(d) for d in self.dns]}

    @classmethod
    def from_dict(cls, d: Any) -> FailoverIP:
        """From its JSON form (a relationship row, a request from the primary): checked
        as the text form is."""
        if not isinstance(d, dict):
            raise UsageError("a failover IP must be an object")
        text = f"{d.get('nic')}={d.get('address')}"
        if d.get("gateway"):
            text += f",gw={d['gateway']}"
        dns = d.get("dns") or []
        if not isinstance(dns, list):
            raise UsageError("a failover IP's dns must be a list")
        if dns:
            text += ",dns=" + "+".join(str(x) for x in dns)
        return parse_failover_ip(text)


def _address(text: str, what: str, entry: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise UsageError(f"bad {what} {text!r} in failover IP {entry!r}",
                         hint=FORMAT_HINT) from None


def parse_failover_ip(entry: str) -> FailoverIP:
    """``"52:54:00:5e:17:01=10.77.0.5/24,gw=10.77.0.1,dns=10.77.0.53"`` → FailoverIP.
    UsageError, naming what is wrong, for a bad NIC, address, prefix, gateway or DNS."""
    entry = str(entry).strip()
    nic, sep, rest = entry.partition("=")
    nic = nic.strip().lower()
    if not sep or not rest:
        raise UsageError(f"bad failover IP {entry!r}", hint=FORMAT_HINT)
    if not _MAC.match(nic) and not _INDEX.match(nic):
        raise UsageError(f"bad NIC {nic!r} in failover IP {entry!r}: not a MAC address "
                         "(aa:bb:cc:dd:ee:ff) or an index (0, 1, ...)", hint=FORMAT_HINT)
    parts = [p.strip() for p in rest.split(",")]
    addr_text = parts[0]
    if "/" not in addr_text:
        raise UsageError(f"failover IP {entry!r} has no prefix length (ADDR/PREFIX, "
                         "e.g. 10.0.0.5/24)", hint=FORMAT_HINT)
    try:
        address = ipaddress.ip_interface(addr_text)
    except ValueError:
        raise UsageError(f"bad address {addr_text!r} in failover IP {entry!r} (an IPv4 or "
                         "IPv6 address and a prefix length that fits it)",
                         hint=FORMAT_HINT) from None
    net = address.network
    if net.num_addresses > 2 and address.ip in (net.network_address, net.broadcast_address) \
            and address.version == 4:
        raise UsageError(f"{address.ip} is the {'network' if address.ip == net.network_address else 'broadcast'} "
                         f"address of {net}: not a host address (failover IP {entry!r})")
    if address.ip.is_multicast or address.ip.is_unspecified or address.ip.is_loopback:
        raise UsageError(f"{address.ip} cannot be a NIC's address (failover IP {entry!r})")
    gateway: IPAddress | None = None
    dns: list[IPAddress] = []
    seen: set[str] = set()
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        value = value.strip()
        if not sep or not value or key not in ("gw", "dns") or key in seen:
            raise UsageError(f"bad option {part!r} in failover IP {entry!r}"
                             + (" (given twice)" if key in seen else ""), hint=FORMAT_HINT)
        seen.add(key)
        if key == "gw":
            gateway = _address(value, "gateway", entry)
            if gateway.version != address.version:
                raise UsageError(f"gateway {gateway} is not an IPv{address.version} address "
                                 f"like {address.ip} (failover IP {entry!r})")
            if gateway not in net and not gateway.is_link_local:
                raise UsageError(f"gateway {gateway} is not in {net} (failover IP {entry!r})",
                                 hint="the gateway must be on the NIC's network")
            if gateway == address.ip:
                raise UsageError(f"gateway {gateway} is the NIC's own address "
                                 f"(failover IP {entry!r})")
        else:
            dns = [_address(v.strip(), "DNS server", entry) for v in value.split("+")]
            if len(dns) > MAX_DNS:
                raise UsageError(f"failover IP {entry!r} names {len(dns)} DNS servers: at "
                                 f"most {MAX_DNS} are read by the guest's resolver")
    return FailoverIP(nic=nic, address=address, gateway=gateway, dns=tuple(dns))


def parse_failover_ips(entries: list[str] | None) -> list[FailoverIP]:
    """Every ``--failover-ip`` of a command; ``["none"]`` is the empty list (clear)."""
    entries = [str(e).strip() for e in entries or []]
    if any(e.lower() in NONE for e in entries):
        if len(entries) > 1:
            raise UsageError("--failover-ip none clears the failover IPs: give it alone")
        return []
    return [parse_failover_ip(e) for e in entries]


def resolve(ips: list[FailoverIP], macs: list[str], vm: str) -> list[FailoverIP]:
    """The entries with each NIC named by its MAC (``macs``: the VM's NICs, in the order
    of its definition); UsageError for an index or MAC the VM lacks, or a NIC given twice."""
    known = [m.lower() for m in macs]
    listing = ", ".join(f"{i}={m}" for i, m in enumerate(known)) or "none"
    out: list[FailoverIP] = []
    for ip in ips:
        if ip.mac is None:
            i = int(ip.nic)
            if i >= len(known):
                raise UsageError(f"{vm} has no NIC {i} (failover IP {ip.text()})",
                                 hint=f"its NICs: {listing}")
            mac = known[i]
        else:
            mac = ip.nic
            if mac not in known:
                raise UsageError(f"{vm} has no NIC with MAC {mac} (failover IP {ip.text()})",
                                 hint=f"its NICs: {listing}")
        if any(o.nic == mac for o in out):
            raise UsageError(f"NIC {mac} of {vm} has two failover IPs: one per NIC")
        out.append(FailoverIP(nic=mac, address=ip.address, gateway=ip.gateway, dns=ip.dns))
    gateways = {str(ip.gateway) for ip in out if ip.gateway is not None
                and ip.address.version == 4}
    if len(gateways) > 1:
        raise UsageError(f"{vm}'s failover IPs name {len(gateways)} IPv4 default gateways "
                         f"({', '.join(sorted(gateways))}): a guest has one",
                         hint="give gw= on one NIC only")
    return out


def format_failover_ips(ips: list[FailoverIP]) -> str:
    return "; ".join(ip.text() for ip in ips) or "none"


# -- inside the guest ----------------------------------------------------------------------

def interface_of(mac: str, interfaces: list[dict]) -> dict | None:
    """The entry of ``guest-network-get-interfaces`` whose hardware address is ``mac``."""
    for i in interfaces:
        if str(i.get("hardware-address", "")).lower() == mac.lower():
            return i
    return None


def commands(ip: FailoverIP, ifname: str) -> list[list[str]]:
    """The iproute2 commands (argv, run in order, each must exit 0) that give interface
    ``ifname`` the address: its global addresses of that family replaced (link-local
    ones kept), the link up, the default route through the gateway."""
    family = f"-{ip.address.version}"
    out = [["ip", family, "addr", "flush", "dev", ifname, "scope", "global"],
           ["ip", "addr", "add", ip.address.with_prefixlen, "dev", ifname],
           ["ip", "link", "set", "dev", ifname, "up"]]
    if ip.gateway is not None:
        out.append(["ip", family, "route", "replace", "default", "via", str(ip.gateway),
                    "dev", ifname])
    return out


def resolv_conf(ips: list[FailoverIP]) -> str | None:
    """/etc/resolv.conf for the DNS servers of every entry (in order, each once); None
    when no entry names one (the guest's file is left alone)."""
    servers = list(dict.fromkeys(str(d) for ip in ips for d in ip.dns))
    if not servers:
        return None
    return ("# written by vmreplica at failover (re-IP)\n"
            + "".join(f"nameserver {s}\n" for s in servers[:MAX_DNS]))


def has_address(ip: FailoverIP, interface: dict) -> bool:
    """Whether an interface of ``guest-network-get-interfaces`` carries the address with
    its prefix."""
    for a in interface.get("ip-addresses") or []:
        try:
            if ipaddress.ip_address(str(a.get("ip-address"))) == ip.address.ip and \
                    int(a.get("prefix", -1)) == ip.address.network.prefixlen:
                return True
        except ValueError:
            continue
    return False

"""Network maps: where a replicated VM's NICs go on the replica host. An entry
``SRC=DST`` maps a libvirt network or bridge of the primary (SRC) to one of the replica
(DST); a VM's own map overrides its replica server's default one. Pure: parsing and
merging; the replica's driver resolves DST to a network or a bridge."""

from __future__ import annotations

import re

from ..errors import UsageError

# libvirt network and Linux interface names: no spaces, no '=' or '/'
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,63}$")


def parse_network_map(entries: list[str] | None) -> dict[str, str]:
    """``["lan=dr-lan", "br0=br-dr"]`` → ``{"lan": "dr-lan", "br0": "br-dr"}``."""
    out: dict[str, str] = {}
    for entry in entries or []:
        src, sep, dst = str(entry).partition("=")
        src, dst = src.strip(), dst.strip()
        if not sep or not _NAME.match(src) or not _NAME.match(dst):
            raise UsageError(f"bad network mapping {entry!r}",
                             hint="SRC=DST: SRC a libvirt network or bridge of the primary, "
                                  "DST one of the replica (e.g. --network-map default=dr-lan)")
        if src in out and out[src] != dst:
            raise UsageError(f"network {src} is mapped twice ({out[src]}, {dst})")
        out[src] = dst
    return out


def format_network_map(mapping: dict[str, str]) -> str:
    return ", ".join(f"{s}={d}" for s, d in sorted(mapping.items())) or "none"


def merged(default: dict[str, str] | None, own: dict[str, str] | None) -> dict[str, str]:
    """The map a VM's replica uses: its replica server's default, overridden by its own."""
    return {**(default or {}), **(own or {})}

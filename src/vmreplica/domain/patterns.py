"""Authorization patterns of a replica server: which primaries may replicate here."""

from __future__ import annotations

import fnmatch
import re

from ..errors import UsageError

_NAME = re.compile(r"^[A-Za-z0-9*]([A-Za-z0-9.*_-]*[A-Za-z0-9*])?$")


def validate_pattern(pattern: str) -> str:
    """``*``, ``host.example.com``, ``*.example.com``, ``web-*``: host-name characters and ``*``."""
    if pattern != "*" and not _NAME.match(pattern):
        raise UsageError(
            f"invalid primary pattern {pattern!r}",
            hint="use a host name, '*', or a wildcard such as '*.example.com'",
        )
    return pattern.lower()


def matches(pattern: str, host_name: str) -> bool:
    """Case-insensitive; ``*`` matches any run of characters, ``*.example.com`` any sub-domain."""
    return fnmatch.fnmatchcase(host_name.lower(), pattern.lower())


def find_authorization(entries: list[dict], host_name: str) -> dict | None:
    """The most specific entry (longest pattern without its wildcards) that allows ``host_name``."""
    allowed = [e for e in entries if matches(e["pattern"], host_name)]
    if not allowed:
        return None
    return max(allowed, key=lambda e: len(e["pattern"].replace("*", "")))

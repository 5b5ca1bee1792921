"""`set VM...`: change how existing relationships replicate, without re-seeding: frequency,
recovery history and interval, app-consistent cadence, compression, resync window.
History goes to the replica too (its retention applies it at the next point)."""

from __future__ import annotations

from ..domain import points as dp
from ..domain.schedule import format_frequency, parse_frequency, parse_window
from ..errors import UsageError
from .relationship import COMPRESSIONS, _rel

FIELDS = ("frequency", "history", "point_interval", "app_every", "compression",
          "resync_window")


def validate(changes: dict) -> dict:
    out = {}
    for key, value in changes.items():
        if value is None:
            continue
        if key == "frequency":
            out[key] = parse_frequency(value)
        elif key == "history":
            out[key] = dp.validate_history(int(value))
        elif key == "point_interval":
            out[key] = dp.parse_interval(value)
        elif key == "app_every":
            if int(value) < 0:
                raise UsageError("--app-consistent-every must be 0 or more")
            out[key] = int(value)
        elif key == "compression":
            if value not in COMPRESSIONS:
                raise UsageError(f"unknown compression {value!r}", hint="choose zstd or none")
            out[key] = value
        elif key == "resync_window":
            out[key] = None if value in ("", "none", "always") else value
            parse_window(out[key])
        else:
            raise UsageError(f"cannot set {key!r}")
    if not out:
        raise UsageError("nothing to change", hint="give at least one option, e.g. --frequency 5m")
    return out


def apply(host, vm: str, changes: dict) -> dict:
    rel = _rel(host, vm)
    if "history" in changes:
        host.client_for_peer(rel["peer"], timeout=60).request(
            "POST", f"/v1/replica/relationships/{vm}/settings", {"history": changes["history"]})
    host.store.update_relationship(vm, **changes)
    shown = dict(changes)
    if "frequency" in shown:
        shown["frequency"] = format_frequency(shown["frequency"])
    host.event("relationship", "settings changed: " + ", ".join(f"{k}={v}" for k, v in
                                                                  shown.items()), vm)
    return {"vm": vm, **shown}

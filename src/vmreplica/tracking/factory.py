"""The registry that picks a change tracker by name (a relationship's ``tracker``)."""

from __future__ import annotations

from ..errors import UsageError
from .bitmap import BitmapTracker


def get_tracker(name: str) -> BitmapTracker:
    if name == "bitmap":
        return BitmapTracker()
    raise UsageError(f"unknown change tracker {name!r}", hint="choose bitmap")

"""The registry that picks a hypervisor driver by name (the host's configuration)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from .base import Driver


def get_driver(name: str, home: Path, config: dict) -> Driver:
    """Drivers are chosen by name from the host's configuration."""
    if name == "qemu":
        from .qemu import QemuDriver
        return QemuDriver(home, config)
    if name == "libvirt":
        try:
            from .libvirt import LibvirtDriver
        except ImportError as e:
            raise UsageError(f"the libvirt driver is not available: {e}") from None
        return LibvirtDriver(home, config)
    raise UsageError(f"unknown hypervisor driver {name!r}", hint="choose qemu or libvirt")

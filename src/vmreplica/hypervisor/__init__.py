"""Hypervisor drivers: list/inspect VMs and disks, power, define from a portable description,
change-tracking block sessions, guest-agent calls. `base` is the protocol and registry.

May import `qemutools`, `domain` and `errors`; never the service, primary or replica layers.
"""

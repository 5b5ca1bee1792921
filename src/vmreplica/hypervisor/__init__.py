"""Hypervisor drivers: list/inspect VMs and disks, power, define from a portable description,
change-tracking block sessions, guest-agent calls, continuous mode's mirror, save/restore.
`base` is the interface (one Protocol per part), `factory` picks a driver by name.
Each driver is a package, one module per part: `qemu/` (QEMU processes of its own)
and `libvirt/` (libvirt domains); the QMP steps both run are qemutools.qmpsteps.
`guest` finds the built-in demo guest, `kvmprobe` decides whether KVM is usable.

May import `qemutools`, `domain` and `errors`; never the service, primary or replica layers.
"""

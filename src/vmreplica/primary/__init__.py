"""The primary side: relationship operations (enable, initial, sync, suspend, remove,
settings, resync, reverse, DR links), the cycle and continuous mode. `common` holds what
the operations share, `standing` what the replica says of this host's standing.

May import `tracking`, `hypervisor`, `transport`, `qemutools`, `domain`, `errors`; never
`replica` (what spans both sides is composed in service.operations); gets the host as a
context.
"""

"""The primary side: relationship operations (enable, initial, sync, suspend, remove,
settings, resync, reverse, DR links), the cycle and continuous mode. `common` holds what
the operations share, `standing` what the replica says of this host's standing;
`continuous` is continuous mode's watchdog, `mirror_steps` and `mirror_probe` its workers
and its probe of the replica.

May import `tracking`, `hypervisor`, `transport`, `qemutools`, `domain`, `errors`; never
`replica` (what spans both sides is composed in service.operations); gets the host as a
context.
"""

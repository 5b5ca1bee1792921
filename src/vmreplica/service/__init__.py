"""The daemon: management and replication API routes (`api/`), the operations both front
ends run and those that span both sides of a relationship (`operations`), scheduler,
state store, host context.

May import every layer below it: `cluster`, `primary`, `replica`, `tracking`,
`hypervisor`, `transport`, `qemutools`, `domain`, `errors`. Never `web` or `cli` above.
"""

"""The replica side: accept relationships, receive/stage/apply cycles into qcow2 chains,
recovery points, failover (test, planned, unplanned), the mirror target. `checks` holds
the checks every request from a primary passes; `receiver` takes a cycle in, `staged`
applies a staged cycle, `recovery` applies staged cycles again after a crash,
`lifecycle` and `removal` are a relationship's life.

May import `tracking`, `hypervisor`, `transport`, `qemutools`, `domain`, `errors`; never
`primary` (what spans both sides is composed in service.operations); gets the host as a
context.
"""

"""The replica side: accept relationships, receive/stage/apply cycles into qcow2 chains,
recovery points, failover (test, planned, unplanned).

May import `qemutools`, `transport.wire`, `tracking.scan` (block manifests), `domain`,
`errors`; gets the host as a context.
"""

"""The replica side: accept relationships, receive and stage cycles, apply them into qcow2 chains.

May import only `qemutools`, `transport.wire`, `domain`, `errors`; gets the host as a context.
"""

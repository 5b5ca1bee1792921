"""The daemon: management and replication API routes, scheduler, state store, host context.

May import every lower layer (primary, replica, tracking, transport, hypervisor, domain).
"""

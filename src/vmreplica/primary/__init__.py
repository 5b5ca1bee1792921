"""The primary side: relationship operations (enable, initial, sync, suspend, remove) and the cycle.

May import tracking, hypervisor, transport, domain, errors; gets the host as a context.
"""

"""Host-to-host transport: the cycle wire format, TLS identities and pinning, HTTP plumbing.

May import `domain` and `errors` only; it knows nothing of VMs, trackers or the store.
"""

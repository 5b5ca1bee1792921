"""The two HTTP APIs a daemon serves. Management API (unix socket in the home, for the
CLI): every operation of the host, `management`. Replication API (TCP + mutual TLS, for
peer hosts): pairing, hello, relationship creation, cycles, removal, `peer`; every route
but /v1/pair requires a pinned client certificate. What both share, and the dashboard
runs too (recovery points, failover), is in `common`.
"""

from .management import management_routes
from .peer import replication_routes

__all__ = ["management_routes", "replication_routes"]

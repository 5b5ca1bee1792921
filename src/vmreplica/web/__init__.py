"""The web listener: the dashboard (login by a one-time token from `vmreplica dashboard`),
its JSON and actions, and Prometheus /metrics. HTTPS with the host's certificate.

May import `service` (read models and operations), `transport.http`, `domain`, `errors`.
"""

"""The web listener: the dashboard (login by a one-time token from `vmreplica dashboard`),
its live fragments and actions, and Prometheus /metrics. HTTPS with the host's certificate.
`app` holds the routes; the pages are in `pages`, the operator's actions in `actions`,
the page shell they share in `layout`, the login sessions in `auth`.

A UI over the service: may import `service` (its operations and read models),
`transport` (HTTP plumbing), `domain` and `errors`; never primary, replica or cluster
directly. The daemon does not import it: `serve` (cli) hands it `app.Dashboard`.
"""

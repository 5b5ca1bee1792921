"""The command line: parse, call the daemon's management API, render. One module per group.

May import `service.home` and `service.daemon` (`init`, `serve`), `web.app` (`serve` hands
the daemon its dashboard), `cluster.pacemaker` (`cluster setup` writes Pacemaker's
configuration here), `domain` (formatting) and `errors`. The top layer: nothing imports it.
"""

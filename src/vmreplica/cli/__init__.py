"""The command line: parse, call the daemon's management API, render. One module per group.

May import `errors`, `domain` (formatting) and `service.home`/`service.daemon` (init, serve).
"""

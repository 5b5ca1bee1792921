"""The web dashboard (a later issue): pages served by the daemon over the management API.

May import `service` read models only.
"""

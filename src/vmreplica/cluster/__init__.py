"""HA on Pacemaker/Corosync: the OCF resource agents, `vmreplica cluster`, takeover and
the broker (DR replication that follows the VM), and a namespace lab for tests/demo.

May import `service` operations, `primary`, `replica`, `domain`, `errors`.
"""

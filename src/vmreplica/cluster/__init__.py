"""HA on Pacemaker/Corosync: the OCF resource agents, `vmreplica cluster`, takeover and
the broker (DR replication that follows the VM). (The namespace cluster lab the tests
and `make demo-ha` build, and its fence agent, are harness: tests/harness.)

Below the service, above both sides of a relationship: may import `primary`, `replica`,
`tracking`, `hypervisor`, `transport`, `qemutools`, `domain`, `errors`.
"""

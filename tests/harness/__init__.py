"""The test and demo harness: it drives vmreplica from outside, through its real CLI, and
is not part of the package (nothing under src/ imports it).

    lab              two or more hosts on this machine (homes, daemons, ports), paired
    nslab            a real Pacemaker/Corosync cluster on this machine: two nodes and a
                     corosync-qnetd witness in namespaces, with a PDU that fences
    hasite           a vmreplica daemon on each lab node, the demo guest protected by it
    fence_vmreplica  the fence agent for the lab's PDU (installed as /usr/sbin/fence_vmreplica)

Imported as ``harness`` with tests/ on the path: pytest puts it there (``pythonpath`` in
pyproject.toml), the demos (``demo/``) and the benchmarks (``bench/``) insert it.
"""

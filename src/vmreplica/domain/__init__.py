"""The nouns and rules of replication: relationships, states, schedules, sizes, patterns, health.

Pure Python: imports nothing from vmreplica but `errors`, does no I/O, reads no clock.
"""

"""The nouns and rules of replication: relationships (typed: `relationship`), recovery
points, cycle records, states, schedules, sizes, patterns, health.

Pure Python, no I/O, no clock. May import `errors` only.
"""

"""vmreplica: disaster-recovery replication of KVM virtual machines between hosts."""

__version__ = "0.1.0"

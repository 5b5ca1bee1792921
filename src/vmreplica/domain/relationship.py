"""The core noun: a replication relationship, as one side (primary or replica) holds it.

A relationship is keyed by its VM (``NAME``, or ``NAME@dr`` for a DR link: domain.links)
and written by ``service.store.Store`` only, which returns and takes ``Relationship``
values (frozen: a change is ``Store.update_relationship`` or, for the state,
``Store.set_state``). No I/O here.

``Settings`` are what the operator chooses (``enable``, ``set``, ``cluster protect``):
every default lives in its fields, once; ``DEFAULTS`` is an instance to read them from
(``DEFAULTS.history``). ``Relationship`` adds the identity (the nine columns of the
store's table), then what each side records as it runs. Nested records (a failover, a
test failover, a seed, a collapse, ...) stay small JSON objects (``dict``), as the wire
and the store carry them.

The store's other rows are typed beside the rules that read them: a recovery point is
``domain.points.Point``, a cycle of the history ``domain.health.CycleRecord``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What the operator sets on a relationship, with its defaults (the one place)."""
    frequency: int = 300                 # seconds between cycles: 30, 300 or 900
    compression: str = "zstd"            # zstd | none
    excluded: list[str] = field(default_factory=list)   # disks not replicated
    security_tag: str = ""               # what the replica's authorization entry asks
    history: int = 4                     # recovery points kept on the replica (0-24)
    point_interval: int = 3600           # seconds between recovery points
    app_every: int = 0                   # every Nth point app-consistent; 0: never
    resync_window: str | None = None     # HH:MM-HH:MM automatic resyncs wait for
    mode: str = "periodic"               # periodic | continuous
    max_stall: float = 5.0               # continuous: longest a guest write may wait
    cluster: bool = False                # protected by the cluster (cluster protect)
    holders: list[str] = field(default_factory=list)    # DR link: hosts that may hold it
    tracker: str = "bitmap"              # the change tracker (tracking.factory.get_tracker)
    # Re-IP at failover: each NIC's address inside the guest on the replica host
    # (domain.reip.FailoverIP.to_dict, NICs by MAC); the replica applies them.
    failover_ips: list[dict[str, Any]] = field(default_factory=list)
    # Pending changes over this share of the replicated disks' size need a resync
    # (like Hyper-V's log overflow); not set by any command, a knob for the row.
    pending_bound: float = 0.5

    def settings(self) -> Settings:
        """The settings part alone."""
        return Settings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Settings)})


DEFAULTS = Settings()


def duration_text(seconds: int) -> str:
    """A duration as an operator types it (3600 → ``1h``, 300 → ``5m``)."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


# The defaults the CLI and the API take as text (`--frequency 5m`, `--point-interval 1h`).
FREQUENCY_TEXT = duration_text(DEFAULTS.frequency)
POINT_INTERVAL_TEXT = duration_text(DEFAULTS.point_interval)


@dataclass(frozen=True, kw_only=True)
class Relationship(Settings):
    """One relationship row. The identity first (the store's columns), then the
    settings (``Settings``), then what the primary and the replica record as they run.
    A field a side does not use keeps its default."""

    # -- identity (real columns of the store's table) ----------------------------------
    vm: str                              # the key: NAME, or NAME@dr (a DR link)
    id: str                              # the relationship's id, the same on both sides
    role: str                            # primary | replica (domain.states.Role)
    peer: str                            # the other side's host name
    peer_address: str | None = None
    state: str                           # domain.states.State (its value)
    epoch: int = 1                       # who is primary: a failover raises it
    created_at: float = 0.0              # set by the store
    updated_at: float = 0.0              # set by the store

    # -- both sides ----------------------------------------------------------------------
    disks: list[str] = field(default_factory=list)        # replicated disks, in order
    fenced: str | None = None            # why this copy is fenced (another is primary)
    last_error: str | None = None
    replicating_since: float | None = None
    sync_state: str | None = None        # continuous: catching_up|in_sync|degraded|idle
    sync_reason: str | None = None
    sync_since: float | None = None
    health_seen: str | None = None       # the last health level recorded as an event

    # -- primary: cycles and tracking ----------------------------------------------------
    cycle: int = -1                      # the last cycle acknowledged
    bitmap: str | None = None            # the tracking point (bitmap) of that cycle
    bitmap_next: str | None = None       # continuous: the bitmap a catch-up moves to
    # how each disk is tracked (domain.tracking: checkpoint, bitmap, scan, ...), as the
    # driver said at enable and at the last cycle; what the last scan of each
    # scan-tracked disk cost (domain.tracking.ScanCost as a dict)
    disk_tracking: dict[str, str] = field(default_factory=dict)
    scan_costs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # an existing libvirt domain's configuration as last sent to the replica
    # (domain.config): the digest of its inactive XML, its disks' virtual sizes
    definition_digest: str | None = None
    disk_sizes: dict[str, int] = field(default_factory=dict)
    disk_paths: dict[str, str] = field(default_factory=dict)   # (a disk removed from the
                                         # domain: its image loses this relationship's bitmaps)
    consecutive_failures: int = 0
    last_error_code: str | None = None
    last_error_hint: str | None = None
    last_attempt_at: float | None = None
    # the cycle schedule (domain.schedule): the slot the last scheduled cycle ran for,
    # and when this schedule began if later than replicating_since (resumed, frequency
    # or mode changed): health judges only the slots from then on
    last_slot_at: float | None = None
    schedule_since: float | None = None
    # scheduled slots due before this do not run: the last cycle run outside the
    # schedule (initial, resync, manual sync) stands for them (schedule.unscheduled_cover)
    unscheduled_until: float | None = None
    last_success_at: float | None = None
    last_cycle_at: float | None = None
    last_cycle_seconds: float | None = None
    last_catch_up_bytes: int | None = None
    last_point_at: float | None = None   # when the last cycle that carried a point froze
    points_made: int = 0
    last_check_at: float | None = None   # the scheduler's last check of the peer
    suspended_from: str | None = None    # the state `resume` goes back to
    preparing: bool = False              # planned failover: the final cycle runs
    # initial copy: when it is scheduled and how; a seed exported to media
    initial_at: float | None = None
    initial_plan: dict[str, Any] | None = None
    seed: dict[str, Any] | None = None
    # resynchronization
    resync_reason: str | None = None
    resync_window_missed: bool = False
    resync_window_seen: bool = False
    last_resync_attempt_at: float | None = None
    reversed_at: float | None = None
    # continuous mode: the replica's mirror export and the TLS credentials to it; what
    # the replica was last told of the sub-state
    mirror_target: dict[str, Any] | None = None
    mirror_creds: str | None = None
    peer_told: dict[str, Any] | None = None
    # DR links: the third host of a VM's DR link (on its main relationship), the
    # cluster's reverse after a takeover
    dr_peer: str | None = None
    dr_address: str | None = None
    next_reverse_at: float | None = None

    # -- replica: chains, points, failover -----------------------------------------------
    storage: str = ""                    # the replica storage directory
    chains: dict[str, list[str]] = field(default_factory=dict)   # disk -> layers, base first
    last_applied_cycle: int = -1
    last_applied_at: float | None = None
    last_freeze_at: float | None = None  # the primary's freeze time of that cycle
    index_valid: bool = False            # the hash index matches the heads
    next_point_id: int = 1
    points_count: int | None = None
    merging: bool = False                # a retention merge is under way
    pending_point: dict[str, Any] | None = None     # {kind, time}: made after the apply
    apply_pending: dict[str, Any] | None = None     # a staged cycle not applied whole
    primary_prepared: dict[str, Any] | None = None  # {cycle, at}: the final cycle
    failover: dict[str, Any] | None = None          # the failover under way
    failed_over_at: float | None = None
    test: dict[str, Any] | None = None              # the test failover running
    collapse: dict[str, Any] | None = None          # the chain merge after a failover
    reip: dict[str, Any] | None = None   # the last re-IP (replica.reip): of the failed-over
                                         # or test VM, waiting, done or failed
    # UEFI variables (replica.nvram): the BLAKE3 of the NVRAM the last applied cycle
    # carried, and of each point's (by point id); the files are content-addressed.
    nvram: str | None = None
    nvram_points: dict[str, str] = field(default_factory=dict)
    mirror_open: bool = False            # continuous: the mirror's export is open
    mirror_port: int | None = None
    # the VM's own network map (`enable --network-map`), over the replica server's default:
    # where the NICs of its primary's definition go when the definition follows
    network_map: dict[str, str] = field(default_factory=dict)

    # -- both sides: a definition of the primary the replica VM could not follow (why),
    # reported once (an event) until it changes or follows
    definition_refused: str | None = None

    COLUMNS: ClassVar[tuple[str, ...]] = ("vm", "id", "role", "peer", "peer_address",
                                          "state", "epoch", "created_at", "updated_at")

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return _FIELDS

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> tuple[Relationship, list[str]]:
        """A relationship from a row's values, and the names of the keys it dropped
        (written by older code: nothing reads them any more)."""
        unknown = sorted(k for k in values if k not in _FIELDS)
        missing = [k for k in _REQUIRED if k not in values]
        if missing:
            raise TypeError(f"a relationship needs {', '.join(missing)}")
        # What the dataclass's __init__ does (it checks no types), without its one
        # object.__setattr__ per field: the scheduler and the health pass decode every
        # relationship twice a second, and at 100 VMs __init__ was 80 % of that.
        fields = dict(_DEFAULTS)
        for k, make in _FACTORIES:
            if k not in values:
                fields[k] = make()
        for k, v in values.items():
            if k in _FIELDS:
                fields[k] = v
        rel = object.__new__(cls)
        rel.__dict__.update(fields)
        return rel, unknown

    def to_dict(self) -> dict[str, Any]:
        """Every field, as JSON takes it (a deep copy: the nested dicts too)."""
        return dataclasses.asdict(self)

    def data(self) -> dict[str, Any]:
        """The fields the store keeps in its JSON column (all but the columns)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.COLUMNS}


_FIELDS = frozenset(f.name for f in dataclasses.fields(Relationship))
_REQUIRED = tuple(f.name for f in dataclasses.fields(Relationship)
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Relationship)
             if f.default is not dataclasses.MISSING}
_FACTORIES = tuple((f.name, f.default_factory) for f in dataclasses.fields(Relationship)
                   if f.default_factory is not dataclasses.MISSING)


"""Chaos: crash states of replica heads, the long run of
tests/integration/test_crash_states.py (issue 16, defect 2).

Each round builds the scenario through real daemons (a 1.5 GiB disk, a recovery point,
region A written then trimmed, then a cycle at random places in region B — a new L2
table — and region A, with the head server's writes logged by QEMU's blklogwrites
filter, the replica SIGKILLed after the ack), then checks crash states of that cycle:
each one written in place of the head, the replica's state store and stage restored as
at the kill, the real start-up recovery run, the head compared with the cycle's source.

The rounds take the three phases in turn (tests/crashstates.py): ``apply`` (the above),
``resync`` (a hash resync at random places after the primary's tracking broke, the
differing blocks written O_DIRECT into the head; each state: start-up recovery, no block
outside the resync's changed, the primary's resync again, the head equal to the primary's
disk) and ``rotation`` (a cycle that makes a recovery point; each state: a commit of the
store from the pending point on, the new layer as a power cut can leave it, the VM's
description old or new; start-up recovery, the replica opens and reads as the source,
lists only points whose layers exist, once each, and takes the primary's next cycle).

    python bench/chaos_crash_states.py [--states 1000] [--per-round 200] [--seed S]
                                       [--resync-per-round 40] [--rotation-per-round 30]
                                       [--phases apply,resync,rotation]
                                       [--minutes 60] [--work DIR]

Bounded: it stops after ``--states`` states or ``--minutes``, whichever comes first, and
ends with one line `crash_states=N mismatches=M refusals=R earlier_data_changed=E
seconds=S` (exit status 1 unless M, R and E are 0).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
import crashstates  # noqa: E402
from harness import lab  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--states", type=int, default=1000)
    ap.add_argument("--per-round", type=int, default=200,
                    help="crash states per scenario (a new cycle layout each round)")
    ap.add_argument("--resync-per-round", type=int, default=40,
                    help="crash states per resync round (about 3 s each: a resync again)")
    ap.add_argument("--rotation-per-round", type=int, default=30,
                    help="crash states per rotation round (about 2.5 s each: a next cycle)")
    ap.add_argument("--phases", default="apply,resync,rotation",
                    help="the phases the rounds take in turn")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--minutes", type=float, default=60.0, help="stop after this long")
    ap.add_argument("--work", default=None, help="(default: a new directory under /tmp; "
                                                 "unix socket paths must stay short)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    root = Path(args.work or tempfile.mkdtemp(prefix="vmr-chaos-", dir="/tmp")).absolute()
    print(f"seed={seed} work={root}", flush=True)
    start = time.monotonic()
    deadline = start + args.minutes * 60
    outcomes, rounds = [], 0
    phases = [x for x in args.phases.split(",") if x]
    if not phases or set(phases) - {"apply", "resync", "rotation"}:
        ap.error("--phases: a list of apply, resync, rotation")
    try:
        while len(outcomes) < args.states and time.monotonic() < deadline:
            rounds += 1
            where = root / f"r{rounds}"
            a, b = lab.two_sites(where, driver="qemu", names=("chaos-a", "chaos-b"))
            phase = phases[(rounds - 1) % len(phases)]
            say = lambda m: print(f"round {rounds} ({phase}): {m}", flush=True)  # noqa: E731, B023 — used in this round only
            left = args.states - len(outcomes)
            until = deadline - time.monotonic()
            try:
                if phase == "apply":
                    cycle = crashstates.random_cycle(rng)
                    sc = crashstates.prepare(a, b, f"chaos-{rounds}", where / "crash", cycle)
                    if not sc.l2_on_stale_bytes:
                        say("note: the new L2 table did not land on stale bytes")
                    got = crashstates.run(sc, min(args.per_round, left), rng.randrange(1 << 32),
                                          report=say, stop_after=until)
                    what = (f"cycle={cycle} log_entries={sc.log_entries} "
                            f"flushes={sc.flushes}")
                elif phase == "resync":
                    layout = crashstates.random_resync(rng)
                    sc = crashstates.prepare_resync(a, b, f"chaos-{rounds}", where / "crash",
                                                    layout)
                    if not sc.l2_on_stale_bytes:
                        say("note: the resync's new L2 table did not land on stale bytes")
                    got = crashstates.run_resync(sc, min(args.resync_per_round, left),
                                                 rng.randrange(1 << 32), a, b, report=say,
                                                 stop_after=until)
                    what = (f"resync={layout} log_entries={sc.log_entries} "
                            f"flushes={sc.flushes} differing_blocks={len(sc.differing)}")
                else:
                    cycle = crashstates.random_cycle(rng)
                    sc = crashstates.prepare_rotation(a, b, f"chaos-{rounds}", where / "crash",
                                                      cycle)
                    got = crashstates.run_rotation(sc, min(args.rotation_per_round, left),
                                                   rng.randrange(1 << 32), a, b, report=say,
                                                   stop_after=until)
                    what = (f"cycle={cycle} store_commits={len(sc.store.states)} "
                            f"classes={len(sc.classes())}")
                outcomes += got
                say(f"{what} {crashstates.summary(got, sum(o.seconds for o in got))}")
            finally:
                lab.teardown(a, b)
                if not args.keep:
                    shutil.rmtree(where, ignore_errors=True)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(root, ignore_errors=True)
    line = crashstates.summary(outcomes, time.monotonic() - start)
    print(line, flush=True)
    bad = any(o.mismatch_at is not None or o.refused or o.earlier_data for o in outcomes)
    return 1 if bad or not outcomes else 0


if __name__ == "__main__":
    sys.exit(main())

"""`vmreplica console`: an interactive menu for the common tasks, for operators who do
not want to remember the commands. Each choice asks for what it needs and runs the same
management API calls as the commands (shown, so the menu also teaches them)."""

from __future__ import annotations

import sys

from .. import errors
from .main import client_of
from .main import main as cli_main

MENU = [
    ("status", "Status of replicated VMs"),
    ("replica-server", "Enable this host as a replica server"),
    ("dashboard", "Open the dashboard (prints a login address)"),
    ("enable", "Enable replication of a VM"),
    ("test", "Test failover (on the replica)"),
    ("planned", "Planned failover (prepare on the primary / fail over on the replica)"),
    ("reverse", "Reverse replication (on the host that failed over)"),
    ("remove", "Remove replication of a VM"),
]


def register(sub) -> None:
    p = sub.add_parser("console", help="interactive menu for the common tasks")
    p.set_defaults(func=cmd_console)


def _ask(prompt: str, default: str | None = None) -> str:
    suffix = f" [{default}]" if default else ""
    sys.stdout.write(f"{prompt}{suffix}: ")
    sys.stdout.flush()
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.strip() or (default or "")


def _run(args, *argv: str) -> bool:
    """Run one vmreplica command for this home, showing it first; True if it succeeded."""
    full = (["--home", args.home] if args.home else []) + list(argv)
    print(f"$ vmreplica {' '.join(argv)}", flush=True)
    rc = cli_main(full)
    print("(done)" if rc == 0 else f"(failed, exit {rc})", flush=True)
    return rc == 0


def cmd_console(args) -> int:
    info = client_of(args).call("GET", "/v1/host")
    print(f"vmreplica console on {info['name']} ({info['listen']}). Ctrl-D or 0 to leave.")
    while True:
        print()
        for i, (_, text) in enumerate(MENU, 1):
            print(f"  {i}. {text}")
        print("  0. Quit")
        try:
            choice = _ask("choice")
        except EOFError:
            print()
            return 0
        if choice in ("0", "q", "quit"):
            return 0
        if not choice.isdigit() or not 1 <= int(choice) <= len(MENU):
            print(f"no such choice: {choice!r}")
            continue
        try:
            _do(args, MENU[int(choice) - 1][0])
        except EOFError:
            print()
            return 0
        except errors.VmreplicaError as e:
            print(f"error: {e.message}" + (f" ({e.hint})" if e.hint else ""))


def _do(args, what: str) -> None:
    if what == "status":
        _run(args, "status")
    elif what == "replica-server":
        pattern = _ask("allow primaries matching (e.g. *.example.com)", "*")
        _run(args, "replica-server", "enable", "--allow", pattern)
    elif what == "dashboard":
        _run(args, "dashboard")
    elif what == "enable":
        vm = _ask("VM")
        replica = _ask("replica HOST:PORT")
        from ..domain.relationship import FREQUENCY_TEXT
        freq = _ask("frequency (30s, 5m, 15m)", FREQUENCY_TEXT)
        if not _run(args, "enable", vm, "--replica", replica, "--frequency", freq):
            print(f"replication of {vm} was not enabled: no initial copy to start")
            return
        if _ask("start the initial copy now? (y/n)", "y").lower().startswith("y"):
            _run(args, "initial", vm)
    elif what == "test":
        vm = _ask("VM")
        if _ask("start or stop a test failover? (start/stop)", "start") == "stop":
            _run(args, "failover", vm, "--stop-test")
        else:
            point = _ask("recovery point (id, or latest)", "latest")
            _run(args, "failover", vm, "--test", *(["--point", point] if point != "latest"
                                                    else []))
    elif what == "planned":
        vm = _ask("VM")
        side = _ask("is this host the primary or the replica? (primary/replica)", "primary")
        if side.startswith("p"):
            _run(args, "failover", vm, "--prepare", "--shutdown")
        else:
            _run(args, "failover", vm)
    elif what == "reverse":
        _run(args, "reverse", _ask("VM"))
    elif what == "remove":
        vm = _ask("VM")
        if _ask(f"remove replication of {vm} on both hosts? (yes/no)", "no") == "yes":
            _run(args, "remove", vm)
        else:
            print("not removed")

"""`vmreplica` entry point: global options, sub-command registry, error → exit code."""

from __future__ import annotations

import argparse
import os
import re
import sys

from .. import errors

# One module per command group; each has register(subparsers).
GROUPS = ("host_cmd", "trust_cmd", "replica_server_cmd", "vm_cmd", "replication_cmd",
          "failover_cmd", "events_cmd", "monitor_cmd", "console_cmd",
          "cluster_cmd")

# The top-level commands of each group (a unit test keeps this equal to what the groups
# register). A command line names one of them, and only its group is imported and only
# its sub-parser built (the group's others are _Unused): importing all ten groups and
# building every sub-parser cost 22 ms of each call, the other eleven sub-parsers of
# `sync`'s group 3 ms more (bench_cycle times whole `vmreplica sync` commands). Help and
# unknown commands load all.
COMMANDS = {
    "host_cmd": ("host", "init", "serve", "shutdown"),
    "trust_cmd": ("trust",),
    "replica_server_cmd": ("replica-server",),
    "vm_cmd": ("vm",),
    "replication_cmd": ("dr", "enable", "initial", "remove", "resume", "resync", "set",
                        "status", "suspend", "sync", "test-connection"),
    "failover_cmd": ("failover", "points", "reverse"),
    "events_cmd": ("events",),
    "monitor_cmd": ("dashboard", "health-thresholds", "measure"),
    "console_cmd": ("console",),
    "cluster_cmd": ("cluster",),
}


def command_word(argv: list[str]) -> str | None:
    """The command a command line names (the first word after the global options)."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--home":
            i += 2
            continue
        if word.startswith("--home="):
            i += 1
            continue
        return None if word.startswith("-") else word
    return None


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter, sized to the terminal as argparse does it but without
    importing shutil for it: argparse makes a formatter for every add_argument, and
    that import was 1.6 ms of every command."""

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        if width is None:
            width = _columns() - 2
        super().__init__(prog, indent_increment, max_help_position, width)


def _columns() -> int:
    """shutil.get_terminal_size().columns: $COLUMNS, else the terminal's, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]  # None: AttributeError
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


_NEGATIVE_VALUE = re.compile(r"^-\.?\d")


class _Parser(argparse.ArgumentParser):
    """Every parser of the command line (sub-parsers take their parent's class) formats
    with _Formatter unless told otherwise."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)
        # A word that starts with '-' and a digit ("-1G", "-5m") is a value, not an
        # option (no option of ours starts with a digit): `--disk -1G` reaches the check
        # that says what is wrong with it instead of argparse's "expected one argument".
        self._negative_number_matcher = _NEGATIVE_VALUE


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    import importlib
    p = _Parser(
        prog="vmreplica",
        description="Replicate KVM virtual machines to another host; fail over and back.")
    p.add_argument("--home", help="host home directory (default: $VMREPLICA_HOME)")
    p.add_argument("--version", action="version", version="vmreplica 0.1.0")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    word = command_word(sys.argv[1:] if argv is None else argv)
    groups = [g for g in GROUPS if word in COMMANDS[g]]
    target = _Only(sub, word) if word is not None and groups else sub
    for g in groups or GROUPS:
        importlib.import_module(f".{g}", __package__).register(target)
    return p


class _Only:
    """The sub-parsers action of the top-level parser, building only ``word``'s parser:
    the others a group registers get an _Unused, which takes their set-up and keeps
    none of it."""

    def __init__(self, sub, word: str):
        self._sub, self._word = sub, word

    def add_parser(self, name: str, **kwargs):
        if name == self._word:
            return self._sub.add_parser(name, **kwargs)
        return _Unused()


class _Unused:
    """Takes any call (add_argument, set_defaults, add_subparsers, add_parser, ...) and
    returns itself."""

    def __getattr__(self, name: str):
        return self

    def __call__(self, *args, **kwargs):
        return self


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
        return int(rc or 0)
    except errors.VmreplicaError as e:
        print(f"error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"  hint: {e.hint}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def run() -> None:
    """The console script. A client command leaves without the interpreter's teardown
    (its output flushed first): nothing it opened needs it, and it cost 4-5 ms of every
    call. `serve` (the daemon) exits the ordinary way."""
    rc = main()
    if command_word(sys.argv[1:]) == "serve":
        sys.exit(rc)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        pass
    os._exit(rc)


def home_of(args):
    from ..service.home import Home
    home = Home.resolve(args.home)
    home.require()
    return home


def client_of(args):
    from .client import Client
    return Client(home_of(args))


if __name__ == "__main__":
    sys.exit(main())

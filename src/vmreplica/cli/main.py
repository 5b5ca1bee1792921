"""`vmreplica` entry point: global options, sub-command registry, error → exit code."""

from __future__ import annotations

import argparse
import os
import sys

from .. import errors

# One module per command group; each has register(subparsers).
GROUPS = ("host_cmd", "trust_cmd", "replica_server_cmd", "vm_cmd", "replication_cmd",
          "failover_cmd", "events_cmd", "monitor_cmd", "console_cmd",
          "cluster_cmd")


def build_parser() -> argparse.ArgumentParser:
    import importlib
    p = argparse.ArgumentParser(
        prog="vmreplica",
        description="Replicate KVM virtual machines to another host; fail over and back.")
    p.add_argument("--home", help="host home directory (default: $VMREPLICA_HOME)")
    p.add_argument("--version", action="version", version="vmreplica 0.1.0")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for g in GROUPS:
        importlib.import_module(f".{g}", __package__).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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

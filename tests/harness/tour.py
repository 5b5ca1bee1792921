"""The README's tours, run as written (issue 17; the libvirt part, issue 19): the one
shell block between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in README.md,
command after command, in one bash (so ``export`` and ``TOKEN=$(...)`` carry over, as in
the reader's terminal), with fresh homes and fresh ports (each listen port's web port,
listen + 1, free too) and, where a tour names libvirt objects, names of this run's own.
The first command that fails (any part of it: an ERR trap, pipefail) fails the test,
named with its output."""

from __future__ import annotations

import os
import re
import secrets
import select
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness import lab

REPO = Path(__file__).resolve().parents[2]
COMMAND_TIMEOUT = 240                      # seconds, for any one command of a tour


@dataclass
class Tour:
    marker: str                            # tour → <!-- tour:begin --> ... <!-- tour:end -->
    homes: tuple[str, str]                 # the two homes, as the README writes them
    ports: tuple[int, int, int, int]       # first host's listen, its web; second's, its web
    names: tuple[str, str]                 # the two hosts' names
    timeout: float                         # for the whole tour
    renames: dict[str, str] = field(default_factory=dict)   # libvirt names → this run's


def tour_block(text: str, marker: str = "tour") -> str:
    """The one ```sh block between the markers ``marker``."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    assert text.count(begin) == 1 and text.count(end) == 1, \
        f"README.md must mark its runnable tour once with {begin} ... {end}"
    part = text.split(begin, 1)[1].split(end, 1)[0]
    blocks = re.findall(r"^```sh\n(.*?)^```", part, flags=re.DOTALL | re.MULTILINE)
    assert len(blocks) == 1, f"expected one ```sh block between the tour markers, got {len(blocks)}"
    return blocks[0]


def tour_commands(block: str) -> list[str]:
    """Commands in order: continuation lines joined, comment-only and blank lines dropped
    (a trailing comment stays: bash ignores it)."""
    commands, pending = [], ""
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        commands.append(pending + line)
        pending = ""
    assert not pending, f"the tour ends inside a continued command: {pending!r}"
    return commands


def fresh_ports() -> tuple[int, int]:
    """Two listen ports whose web ports (listen + 1) are free too, all four distinct."""
    chosen: list[int] = []
    for _ in range(200):
        p = lab.free_port()
        if p >= 65535 or {p, p + 1} & set(chosen):
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
        except OSError:
            continue
        chosen += [p, p + 1]
        if len(chosen) == 4:
            return chosen[0], chosen[2]
    raise AssertionError("no two free pairs of ports found")


def substitute(command: str, homes: dict[str, str], ports: dict[int, int]) -> str:
    for old, new in homes.items():
        command = command.replace(old, new)
    for port, to in ports.items():
        command = re.sub(rf"(?<![0-9]){port}(?![0-9])", str(to), command)
    return command


class Shell:
    """One bash fed the tour command by command; each command's output and whether any
    part of it failed."""

    def __init__(self, env: dict):
        self.mark = f"__tour_{secrets.token_hex(6)}__"
        self.proc = subprocess.Popen(["bash", "--noprofile", "--norc"], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self._send(f"set -o pipefail\ntrap 'echo \"{self.mark} failed $? at: $BASH_COMMAND\"' ERR\n")

    def _send(self, text: str) -> None:
        self.stdin.write(text.encode())
        self.stdin.flush()

    def run(self, command: str, timeout: float) -> tuple[bool, str]:
        # A group in this shell (exports stay), reading nothing of the script that feeds it.
        self._send(f"{{ {command}\n}} </dev/null\necho \"{self.mark} rc $?\"\n")
        out = b""
        deadline = time.monotonic() + timeout
        done = re.compile(rf"{self.mark} rc (\d+)\n".encode())
        while not done.search(out):
            left = deadline - time.monotonic()
            if left <= 0:
                return False, out.decode(errors="replace") + f"\n(no end after {timeout:.0f} s)"
            ready, _, _ = select.select([self.stdout], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self.stdout.fileno(), 65536)
                if not chunk:
                    return False, out.decode(errors="replace") + "\n(the shell exited)"
                out += chunk
        m = done.search(out)
        assert m is not None
        text = out[:m.start()].decode(errors="replace")
        failed = int(m.group(1)) != 0 or f"{self.mark} failed" in text
        return not failed, text.replace(self.mark, "ERR")

    def close(self) -> None:
        try:
            self.stdin.close()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def substitute_names(command: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        command = re.sub(rf"(?<![A-Za-z0-9_]){re.escape(old)}(?![A-Za-z0-9_])", new, command)
    return command


def run_tour(tour: Tour, root: Path) -> None:
    """Run ``tour`` as written, its homes under ``root``; stop its hosts at the end."""
    commands = tour_commands(tour_block((REPO / "README.md").read_text(), tour.marker))
    pa, pb = fresh_ports()
    homes = {tour.homes[0]: str(root / tour.names[0]), tour.homes[1]: str(root / tour.names[1])}
    ports = dict(zip(tour.ports, (pa, pa + 1, pb, pb + 1), strict=True))
    commands = [substitute_names(substitute(c, homes, ports), tour.renames) for c in commands]
    for c in commands:           # nothing of the tour may reach a real /srv or a fixed port
        assert "/srv/" not in c, c
        for port in re.findall(r"127\.0\.0\.1:(\d+)", c):
            assert int(port) in ports.values(), f"an address the test does not map: {c}"

    env = {k: v for k, v in os.environ.items() if not k.startswith("VMREPLICA_")}
    env["PATH"] = f"{REPO / '.venv' / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    hosts = [lab.LabHost(Path(homes[tour.homes[0]]), tour.names[0], port=pa),
             lab.LabHost(Path(homes[tour.homes[1]]), tour.names[1], port=pb)]
    shell = Shell(env)
    ran: list[str] = []
    started = time.monotonic()
    try:
        for command in commands:
            left = tour.timeout - (time.monotonic() - started)
            assert left > 0, f"the tour took over {tour.timeout} s; it reached: {command}"
            t0 = time.monotonic()
            ok, output = shell.run(command, timeout=min(COMMAND_TIMEOUT, left))
            ran.append(f"{time.monotonic() - t0:6.1f} s  {command}")
            print(f"$ {command}\n{output}", flush=True)     # the whole tour's transcript
            if not ok:
                pytest.fail(f"tour command {len(ran)} of {len(commands)} failed:\n  $ {command}\n"
                            f"{output}\n(the commands before it:\n" + "\n".join(ran[:-1]) + ")",
                            pytrace=False)
        print("\n".join(ran))
    finally:
        shell.close()
        lab.teardown(*(h for h in hosts if h.home.exists()))

"""The README's five-minute tour, run as written (issue 17): the shell block between
``<!-- tour:begin -->`` and ``<!-- tour:end -->`` in README.md, command after command, in
one bash (so ``export`` and ``TOKEN=$(...)`` carry over, as in the reader's terminal),
with fresh homes (``/srv/site-a``, ``/srv/site-b`` → under the lab root) and fresh ports
(8441..8444 → free ones, each listen port's web port, listen + 1, free too). The first
command that fails (any part of it: an ERR trap, pipefail) fails the test, named with its
output. Nothing is skipped: a command the tour cannot run to its end has no place in the
block."""

from __future__ import annotations

import os
import re
import secrets
import select
import socket
import subprocess
import time
from pathlib import Path

import pytest

from harness import lab

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- tour:begin -->", "<!-- tour:end -->"
# The tour's homes and ports, as the README writes them.
HOMES = ("/srv/site-a", "/srv/site-b")
PORTS = (8441, 8442, 8443, 8444)          # site-a listen, its web; site-b listen, its web
COMMAND_TIMEOUT = 240                      # seconds, for any one command of the tour
TOUR_TIMEOUT = 420                         # and for the whole of it


def tour_block(text: str) -> str:
    """The one ```sh block between the tour markers."""
    assert text.count(BEGIN) == 1 and text.count(END) == 1, \
        f"README.md must mark its runnable tour once with {BEGIN} ... {END}"
    part = text.split(BEGIN, 1)[1].split(END, 1)[0]
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
    for old, new in ports.items():
        command = re.sub(rf"(?<![0-9]){old}(?![0-9])", str(new), command)
    return command


class Shell:
    """One bash fed the tour command by command; each command's output and whether any
    part of it failed."""

    def __init__(self, env: dict):
        self.mark = f"__tour_{secrets.token_hex(6)}__"
        self.proc = subprocess.Popen(["bash", "--noprofile", "--norc"], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self._send(f"set -o pipefail\ntrap 'echo \"{self.mark} failed $? at: $BASH_COMMAND\"' ERR\n")

    def _send(self, text: str) -> None:
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

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
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    return False, out.decode(errors="replace") + "\n(the shell exited)"
                out += chunk
        m = done.search(out)
        text = out[:m.start()].decode(errors="replace")
        failed = int(m.group(1)) != 0 or f"{self.mark} failed" in text
        return not failed, text.replace(self.mark, "ERR")

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def test_the_readme_tour_runs_as_written(fresh_dir):
    commands = tour_commands(tour_block((REPO / "README.md").read_text()))
    pa, pb = fresh_ports()
    homes = {HOMES[0]: str(fresh_dir / "site-a"), HOMES[1]: str(fresh_dir / "site-b")}
    ports = dict(zip(PORTS, (pa, pa + 1, pb, pb + 1), strict=True))
    commands = [substitute(c, homes, ports) for c in commands]
    for c in commands:           # nothing of the tour may reach a real /srv or a fixed port
        assert "/srv/" not in c, c
        for port in re.findall(r"127\.0\.0\.1:(\d+)", c):
            assert int(port) in ports.values(), f"an address the test does not map: {c}"

    env = {k: v for k, v in os.environ.items() if not k.startswith("VMREPLICA_")}
    env["PATH"] = f"{REPO / '.venv' / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    hosts = [lab.LabHost(Path(homes[HOMES[0]]), "site-a", port=pa),
             lab.LabHost(Path(homes[HOMES[1]]), "site-b", port=pb)]
    shell = Shell(env)
    ran: list[str] = []
    started = time.monotonic()
    try:
        for command in commands:
            left = TOUR_TIMEOUT - (time.monotonic() - started)
            assert left > 0, f"the tour took over {TOUR_TIMEOUT} s; it reached: {command}"
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


def test_the_tour_runner_sees_every_kind_of_failure():
    """The runner itself: a failing first command of a list, a failing producer in a
    pipeline, a command that never ends, and state carried between commands."""
    shell = Shell({**os.environ, "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    try:
        assert shell.run("export X=1; Y=$(echo 2)  # a comment", 10) == (True, "")
        assert shell.run('echo "$X$Y"', 10) == (True, "12\n")
        ok, out = shell.run("false; true", 10)
        assert not ok and "failed 1 at: false" in out, out
        ok, out = shell.run("exit_code() { return 3; }; exit_code | cat", 10)
        assert not ok, out
        ok, out = shell.run("cat; echo read nothing", 10)           # stdin is not the script
        assert ok and out == "read nothing\n", out
        ok, out = shell.run("sleep 30", 1)
        assert not ok and "no end after" in out, out
    finally:
        shell.proc.kill()
        shell.close()
    assert tour_commands("a \\\n  b\n# c\n\nd  # e\n") == ["a    b", "d  # e"]

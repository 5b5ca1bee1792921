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

import pytest

from harness.tour import Shell, Tour, run_tour, tour_commands

pytestmark = pytest.mark.e2e

# The tour's homes and ports, as the README writes them.
TOUR = Tour("tour", ("/srv/site-a", "/srv/site-b"), (8441, 8442, 8443, 8444),
            ("site-a", "site-b"), timeout=420)


def test_the_readme_tour_runs_as_written(fresh_dir):
    run_tour(TOUR, fresh_dir)


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

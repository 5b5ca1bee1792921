"""A host's two ports (issue 17): `init` refuses a replication or web port that is taken
(by a running process, or as the port of a home beside it) and says which and by what,
leaving nothing behind; `serve` names the port it cannot listen on and the command that
changes it; `host set` changes a home's addresses while its daemon is stopped, keeping
its certificate, pairings and relationships."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from harness import lab

pytestmark = pytest.mark.e2e


def _pair_of_free_ports() -> int:
    """A port whose next one (its web port) is free too."""
    for _ in range(200):
        p = lab.free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise AssertionError("no two free ports in a row")


def _cli(home, *args):
    return subprocess.run(lab.cli_path() + ["--home", str(home), *args], capture_output=True,
                          text=True, timeout=120)


def test_init_refuses_a_taken_port_and_says_which_and_by_what(fresh_dir):
    pa = _pair_of_free_ports()
    a = lab.LabHost(fresh_dir / "site-a", "site-a", port=pa).init()
    try:
        # site-a is not running yet: its ports are still its own, the home beside says so.
        p = _cli(fresh_dir / "site-b", "init", "--name", "site-b", "--listen", f"127.0.0.1:{pa + 1}")
        assert p.returncode == 2, p.stdout + p.stderr
        assert f"port {pa + 1}" in p.stderr and "site-a's web port" in p.stderr, p.stderr
        assert "--listen" in p.stderr and str(fresh_dir / "site-a") in p.stderr, p.stderr
        assert not (fresh_dir / "site-b").exists()                 # nothing made
        # Running: the listening daemon named, with its pid and what the port is to it.
        a.start()
        pid = a.daemon_pid()
        p = _cli(fresh_dir / "site-b", "init", "--name", "site-b", "--listen",
                 f"127.0.0.1:{lab.free_port()}", "--web", f"127.0.0.1:{pa}")
        assert p.returncode == 2, p.stdout + p.stderr
        assert f"port {pa}" in p.stderr and "the web port, --web" in p.stderr, p.stderr
        assert f"pid {pid}" in p.stderr and "site-a's replication port" in p.stderr, p.stderr
        assert not (fresh_dir / "site-b").exists()
        # Another program: named by its pid and command line.
        holder = subprocess.Popen([sys.executable, "-c",
                                   ("import socket,sys,time; s=socket.socket(); "
                                    "s.bind(('127.0.0.1',0)); s.listen(); "
                                    "print(s.getsockname()[1], flush=True); time.sleep(120)")],
                                  stdout=subprocess.PIPE, text=True)
        try:
            port = int(holder.stdout.readline())
            p = _cli(fresh_dir / "site-b", "init", "--name", "site-b", "--listen",
                     f"127.0.0.1:{port}", "--web", "off")
            assert p.returncode == 2, p.stdout + p.stderr
            assert f"port {port} (the replication port, --listen) is in use by pid " \
                   f"{holder.pid}" in p.stderr, p.stderr
        finally:
            holder.kill()
            holder.wait()
        # The same port twice.
        p = _cli(fresh_dir / "site-b", "init", "--name", "site-b", "--listen", "127.0.0.1:40000",
                 "--web", "127.0.0.1:40000")
        assert p.returncode == 2 and "same port" in p.stderr, p.stderr
        assert not (fresh_dir / "site-b").exists()
    finally:
        lab.teardown(a)


def test_serve_names_the_taken_port_and_host_set_moves_it(fresh_dir):
    pb = _pair_of_free_ports()
    b = lab.LabHost(fresh_dir / "site-b", "site-b", port=pb).init()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", pb + 1))        # b's web port, taken after its init
    squatter.listen()
    try:
        p = b.run("serve", "--detach", check=False)
        assert p.returncode == 1, p.stdout + p.stderr
        assert f"port {pb + 1}" in p.stderr and "web port" in p.stderr, p.stderr
        assert f"vmreplica --home {b.home} host set --web" in p.stderr, p.stderr
        assert not (b.home / "run" / "mgmt.sock").exists()       # no socket left behind
        # The way out the hint gives: another web port, then serve.
        web = _pair_of_free_ports()
        out = b.run("host", "set", "--web", f"127.0.0.1:{web}").stdout
        assert f"127.0.0.1:{web}" in out and f"(was 127.0.0.1:{pb + 1})" in out, out
        b.start()
        assert b.json("host")["web"] == f"127.0.0.1:{web}"
    finally:
        squatter.close()
        lab.teardown(b)


def test_host_set_keeps_identity_pairings_and_relationships(fresh_dir, vm_name):
    a, b = lab.two_sites(fresh_dir)
    try:
        a.run("vm", "create", vm_name, "--disk", "32M")
        a.run("enable", vm_name, "--replica", b.address, "--frequency", "5m")
        a.run("initial", vm_name)
        before = b.json("host")
        peers_before = b.json("trust", "list")

        p = b.run("host", "set", "--listen", "127.0.0.1:1", check=False)   # daemon running
        assert p.returncode == 2 and "shutdown" in p.stderr, p.stderr
        b.stop()
        new = _pair_of_free_ports()
        p = b.run("host", "set", "--listen", f"127.0.0.1:{new}")
        assert f"(was {b.address})" in p.stdout, p.stdout
        assert f"127.0.0.1:{new + 1}" in p.stdout, p.stdout            # web followed listen + 1
        assert "site-a" in p.stdout and f"trust pair 127.0.0.1:{new}" in p.stdout, p.stdout
        info = json.loads(b.run("host", "set", "--web", f"127.0.0.1:{new + 1}", "--json").stdout)
        assert info["listen"] == f"127.0.0.1:{new}" and info["peers_to_tell"] == []

        b.address, b.port = f"127.0.0.1:{new}", new
        b.start()
        after = b.json("host")
        assert after["listen"] == f"127.0.0.1:{new}" and after["web"] == f"127.0.0.1:{new + 1}"
        assert after["fingerprint"] == before["fingerprint"] and after["name"] == "site-b"
        assert b.json("trust", "list") == peers_before
        assert b.json("status", vm_name)[0]["state"] == "replicating"
        # site-a still knows site-b at the old address until it pairs again, as printed.
        lab.pair(a, b)
        a.run("sync", vm_name, "--verify")
        assert a.json("status", vm_name)[0]["state"] == "replicating"
        assert [p["address"] for p in a.json("trust", "list")] == [b.address]
    finally:
        lab.teardown(a, b)

"""fence_vmreplica — a fence agent for the nodes of vmreplica's namespace lab.

A lab node (see `harness.nslab`) is powered off by ending its init process; the
lab runs a small "PDU" on the host that does exactly that, reachable over a unix socket
(`pdu_socket`). This agent speaks the fence-agents API so that Pacemaker's fencer runs it
like any other agent (fence_ipmilan, fence_virsh, ...):

- options as `key=value` lines on stdin (what Pacemaker sends) or on the command line
  (`-o ACTION -n NODE --pdu-socket PATH`);
- actions on, off, reboot, status, monitor, list, list-status, metadata, validate-all;
- exit codes 0 success, 1 error, 2 status "off" (fence-agents' EC_STATUS).

The PDU protocol is one line each way: `off NODE` / `on NODE` / `status NODE` / `list`,
answered by `ok ...` or `error MESSAGE`.

This file uses the standard library only: `install_fence_agent()` copies it as an
executable script for /usr/bin/python3 (the lab's nodes share the host's root
filesystem, so one copy serves every node).
"""

from __future__ import annotations

import os
import socket
import sys
import time

AGENT = "fence_vmreplica"
VERSION = "1.0"
EC_OK, EC_ERROR, EC_STATUS = 0, 1, 2
ACTIONS = ("on", "off", "reboot", "status", "monitor", "list", "list-status",
           "metadata", "validate-all")
DEFAULT_POWER_TIMEOUT = 40.0

METADATA = """<?xml version="1.0" ?>
<resource-agent name="fence_vmreplica" shortdesc="Fence agent for vmreplica lab nodes (namespace nodes powered by the lab's PDU)">
<longdesc>fence_vmreplica powers the nodes of vmreplica's namespace cluster lab off and on. Each lab node is a set of Linux namespaces whose init process is the node's power switch; the lab runs a PDU on the host, reached through a unix socket, that ends a node's init (off) or boots the node again (on). For real hardware use fence_ipmilan, fence_redfish or fence_virsh instead.</longdesc>
<vendor-url>https://clusterlabs.org</vendor-url>
<parameters>
	<parameter name="action" unique="0" required="1">
		<getopt mixed="-o, --action=[action]" />
		<content type="string" default="reboot"  />
		<shortdesc lang="en">Fencing action</shortdesc>
	</parameter>
	<parameter name="plug" unique="0" required="1" obsoletes="port">
		<getopt mixed="-n, --plug=[node]" />
		<content type="string"  />
		<shortdesc lang="en">Lab node to act on (the PDU outlet)</shortdesc>
	</parameter>
	<parameter name="port" unique="0" required="1" deprecated="1">
		<getopt mixed="-n, --plug=[node]" />
		<content type="string"  />
		<shortdesc lang="en">Lab node to act on (the PDU outlet)</shortdesc>
	</parameter>
	<parameter name="pdu_socket" unique="0" required="1">
		<getopt mixed="--pdu-socket=[path]" />
		<content type="string"  />
		<shortdesc lang="en">Path of the lab PDU's unix socket</shortdesc>
	</parameter>
	<parameter name="power_timeout" unique="0" required="0">
		<getopt mixed="--power-timeout=[seconds]" />
		<content type="second" default="40"  />
		<shortdesc lang="en">Seconds to wait for the PDU to answer a power command</shortdesc>
	</parameter>
	<parameter name="verbose" unique="0" required="0">
		<getopt mixed="-v, --verbose" />
		<content type="boolean"  />
		<shortdesc lang="en">Verbose mode (to stderr)</shortdesc>
	</parameter>
	<parameter name="version" unique="0" required="0">
		<getopt mixed="-V, --version" />
		<content type="boolean"  />
		<shortdesc lang="en">Display version information and exit</shortdesc>
	</parameter>
	<parameter name="help" unique="0" required="0">
		<getopt mixed="-h, --help" />
		<content type="boolean"  />
		<shortdesc lang="en">Display help and exit</shortdesc>
	</parameter>
</parameters>
<actions>
	<action name="on" automatic="0"/>
	<action name="off" />
	<action name="reboot" />
	<action name="status" />
	<action name="list" />
	<action name="list-status" />
	<action name="monitor" />
	<action name="metadata" />
	<action name="validate-all" />
</actions>
</resource-agent>
"""

USAGE = f"""Usage: {AGENT} [options]
   -o, --action=ACTION     on, off, reboot, status, monitor, list, list-status,
                           metadata, validate-all (default reboot)
   -n, --plug=NODE         lab node to act on
   --pdu-socket=PATH       the lab PDU's unix socket
   --power-timeout=SECS    wait this long for the PDU (default {DEFAULT_POWER_TIMEOUT:g})
   -v, --verbose           verbose output on stderr
   -V, --version           print the version
   -h, --help              this text
Without arguments, options are read as key=value lines from standard input.
"""

# command-line option -> stdin key; None value means a flag
_LONG = {"--action": "action", "--plug": "plug", "--port": "plug", "--pdu-socket": "pdu_socket",
         "--power-timeout": "power_timeout"}
_SHORT = {"-o": "action", "-n": "plug"}
_FLAGS = {"-v": "verbose", "--verbose": "verbose", "-V": "version", "--version": "version",
          "-h": "help", "--help": "help"}
# keys accepted on stdin; anything else is ignored with a note (Pacemaker passes extras)
_KNOWN = {"action", "plug", "port", "pdu_socket", "power_timeout", "verbose", "version",
          "help", "nodename", "option"}


class FenceError(Exception):
    pass


def parse_args(argv: list[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _FLAGS:
            opts[_FLAGS[arg]] = "1"
        elif "=" in arg and arg.split("=", 1)[0] in _LONG:
            key, value = arg.split("=", 1)
            opts[_LONG[key]] = value
        elif arg in _LONG or arg in _SHORT:
            if i + 1 >= len(argv):
                raise FenceError(f"option {arg} needs a value")
            opts[(_LONG.get(arg) or _SHORT[arg])] = argv[i + 1]
            i += 1
        else:
            raise FenceError(f"unknown option {arg!r}")
        i += 1
    return opts


def parse_stdin(text: str) -> dict[str, str]:
    opts: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            print(f"{AGENT}: ignoring line without '=': {line!r}", file=sys.stderr)
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        if key == "option":          # old name of "action"
            key = "action"
        if key not in _KNOWN:
            print(f"{AGENT}: ignoring unknown option {key!r}", file=sys.stderr)
            continue
        opts[key] = value
    if "port" in opts and "plug" not in opts:
        opts["plug"] = opts["port"]
    return opts


def pdu_request(path: str, line: str, timeout: float) -> str:
    """Send one command line to the PDU and return its answer after `ok `."""
    if not path:
        raise FenceError("pdu_socket is not set")
    if not os.path.exists(path):
        raise FenceError(f"PDU socket {path} does not exist (is the lab running?)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
            s.sendall(line.encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except OSError as e:  # includes socket.timeout
            raise FenceError(f"PDU {path}: {e}") from None
    answer = data.decode(errors="replace").strip()
    if answer.startswith("ok"):
        return answer[2:].strip()
    raise FenceError(f"PDU refused {line!r}: {answer or 'no answer'}")


def run(opts: dict[str, str], out=sys.stdout) -> int:
    if opts.get("help"):
        out.write(USAGE)
        return EC_OK
    if opts.get("version"):
        out.write(f"{VERSION}\n")
        return EC_OK
    action = opts.get("action", "reboot")
    verbose = bool(opts.get("verbose"))
    if action not in ACTIONS:
        print(f"{AGENT}: unknown action {action!r} (one of {', '.join(ACTIONS)})", file=sys.stderr)
        return EC_ERROR
    if action == "metadata":
        out.write(METADATA)
        return EC_OK
    sock = opts.get("pdu_socket", "")
    plug = opts.get("plug", "")
    try:
        timeout = float(opts.get("power_timeout") or DEFAULT_POWER_TIMEOUT)
    except ValueError:
        print(f"{AGENT}: power_timeout must be a number of seconds", file=sys.stderr)
        return EC_ERROR
    needs_plug = action in ("on", "off", "reboot", "status")
    try:
        if not sock:
            raise FenceError("pdu_socket is required")
        if needs_plug and not plug:
            raise FenceError(f"action {action} needs plug (the node name)")
        if action == "validate-all":
            return EC_OK
        if action == "monitor":
            pdu_request(sock, "list", timeout)
            return EC_OK
        if action in ("list", "list-status"):
            names = pdu_request(sock, "list", timeout).split()
            for name in names:
                if action == "list":
                    out.write(f"{name},\n")
                else:
                    state = pdu_request(sock, f"status {name}", timeout)
                    out.write(f"{name},,{state.upper()}\n")
            return EC_OK
        if action == "status":
            state = pdu_request(sock, f"status {plug}", timeout)
            out.write(f"Status: {state.upper()}\n")
            return EC_OK if state == "on" else EC_STATUS
        if action in ("off", "reboot"):
            started = time.monotonic()
            pdu_request(sock, f"off {plug}", timeout)
            if verbose:
                print(f"{AGENT}: {plug} off after {time.monotonic() - started:.2f} s", file=sys.stderr)
            if pdu_request(sock, f"status {plug}", timeout) != "off":
                raise FenceError(f"{plug} still on after off")
            if action == "off":
                out.write("Success: Powered OFF\n")
                return EC_OK
        pdu_request(sock, f"on {plug}", timeout)
        if pdu_request(sock, f"status {plug}", timeout) != "on":
            raise FenceError(f"{plug} still off after on")
        out.write("Success: Rebooted\n" if action == "reboot" else "Success: Powered ON\n")
        return EC_OK
    except FenceError as e:
        print(f"{AGENT}: {action} {plug}: {e}", file=sys.stderr)
        return EC_ERROR


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv:
            opts = parse_args(argv)
        else:
            opts = parse_stdin("" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read())
    except FenceError as e:
        print(f"{AGENT}: {e}\n{USAGE}", file=sys.stderr)
        return EC_ERROR
    return run(opts)


def install_fence_agent(path: str | os.PathLike = "/usr/sbin/fence_vmreplica") -> str:
    """Write this agent as an executable script at `path` (Pacemaker's fencer looks for
    `fence_*` in /usr/sbin). Idempotent: the file is rewritten only when it differs.
    Returns the path."""
    path = os.fspath(path)
    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    text = "#!/usr/bin/python3\n# Installed by vmreplica's test harness (tests/harness/fence_vmreplica.py).\n" + source
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text and os.access(path, os.X_OK):
                return path
    except OSError:
        pass
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    sys.exit(main())

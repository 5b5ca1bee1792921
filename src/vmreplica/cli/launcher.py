"""The `vmreplica` command as `make setup` installs it: Python without site processing.

Most commands are clients of the daemon: they parse a command line, send one request on
the home's unix socket and print the answer, with nothing but the standard library and
this package. Yet an interpreter spends most of its start in `site`: it reads every
`.pth` file of the virtual environment and of the system's site-packages (the venv is
built with --system-site-packages for libnbd and libvirt), and some of them import
modules (here a CA-bundle hook imports certifi and importlib.resources: 21 ms). Measured
on this machine, `vmreplica status` took 37 ms, 30 of them before vmreplica's own code
ran.

So the installed command runs `python -S` with this package's directory on its path,
and the site-packages join the path the first time an import needs them: a finder at
the end of ``sys.meta_path`` that nothing else answered looks the module up in the
directories a normal start would have added (noted when the command was written), and
if one of them holds it, runs ``site.main()`` (what the interpreter would have done at
start: the same path, the same .pth files) and resolves it there. A command that needs
a third-party module (the daemon, `init` with its TLS identity) pays for `site` then;
the others never do. An import that finds nothing anyway (the standard library probes
for optional modules, e.g. `copy` for Jython's `org.python`) changes nothing. The
console script pip generates (``vmreplica.cli.main:run``) stays for installations
without this one.

Install: ``python -m vmreplica.cli.launcher PATH`` writes the command to PATH, for the
interpreter that runs it.
"""

from __future__ import annotations

import sys

SCRIPT = """#!{python} -S
# vmreplica's command, written by `python -m vmreplica.cli.launcher` (make setup): the
# interpreter starts without site processing; see vmreplica/cli/launcher.py.
import sys
sys.path.insert(0, {root!r})
from vmreplica.cli.launcher import boot
boot({site_paths!r})
"""


class SiteOnDemand:
    """A meta-path finder, last in line: a top-level module no other finder resolves,
    found in ``paths`` (what site processing adds), loads `site` and is resolved on the
    path that makes."""

    loaded = False
    paths: list[str] = []  # noqa: RUF012 — the class is the finder (no typing import here)

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if path is not None or cls.loaded:     # a submodule: its package was found
            return None
        from importlib.machinery import PathFinder
        if PathFinder.find_spec(name, cls.paths) is None:
            return None
        cls.load()
        return PathFinder.find_spec(name)

    @classmethod
    def load(cls) -> None:
        """Run site processing (once, and only if the interpreter skipped it)."""
        if cls.loaded:
            return
        cls.loaded = True
        if cls in sys.meta_path:
            sys.meta_path.remove(cls)
        if sys.flags.no_site:
            import site
            site.main()


def boot(site_paths: list[str]) -> None:
    """The installed command's entry: as ``vmreplica.cli.main:run``, site on demand
    (`serve`, the daemon, loads it at once)."""
    if sys.flags.no_site and SiteOnDemand not in sys.meta_path:
        SiteOnDemand.paths = list(site_paths)
        sys.meta_path.append(SiteOnDemand)
    from .main import command_word, run
    if command_word(sys.argv[1:]) == "serve":
        SiteOnDemand.load()       # the daemon: its whole environment, from the start
    run()


def site_paths() -> list[str]:
    """The path entries site processing adds to this interpreter's (its site-packages
    and what their .pth files name)."""
    import json
    import subprocess

    def path(*flags: str) -> list[str]:
        return json.loads(subprocess.run(
            [sys.executable, *flags, "-c", "import json, sys; print(json.dumps(sys.path))"],
            check=True, capture_output=True, text=True).stdout)
    bare = path("-S")
    return [p for p in path() if p and p not in bare]


def install(path: str) -> None:
    import os
    from pathlib import Path
    root = str(Path(__file__).resolve().parents[2])     # the directory holding vmreplica/
    paths = [p for p in site_paths() if p != root]
    text = SCRIPT.format(python=sys.executable, root=root, site_paths=paths)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, path)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m vmreplica.cli.launcher PATH")
    install(sys.argv[1])

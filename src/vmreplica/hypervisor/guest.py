"""Built-in guests: the demo guest (Debian's kernel + a busybox initramfs built by
`scripts/build-guest.sh`) that writes numbered records to its last disk.

A guest is installed data, not part of the package: a directory NAME/ holding `vmlinuz`
and `initramfs.img`, found (by the daemon, which boots it) in

1. ``$VMREPLICA_GUEST_DIR/NAME`` when that is set (the operator's choice: only there);
2. else ``PREFIX/share/vmreplica/guests/NAME`` for the installation's prefix (its
   virtual environment's; `make setup` builds the demo guest and links it into
   ``.venv/share/vmreplica/guests/demo``), then ``/usr/local/share/...`` and
   ``/usr/share/...`` (a system-wide installation).

Absent, `vm create --guest` says where it looked and how to build it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import UsageError

GUESTS = ("demo",)
CMDLINE = "console=ttyS0 quiet panic=-1"
READY_MARKER = "vmreplica-demo"
ENV = "VMREPLICA_GUEST_DIR"
DATA = ("share", "vmreplica", "guests")          # under an installation prefix
BUILD_HINT = ("build it: `make setup` in a vmreplica clone, or `scripts/build-guest.sh "
              f"DIR/{{name}}` and give the daemon {ENV}=DIR")


def _prefixes() -> list[str]:
    """The installation prefixes to look under, most specific first."""
    out = [sys.prefix]
    # Started without site processing (the installed command runs `python -S`), a virtual
    # environment's prefix is not sys.prefix yet: it is the directory of its pyvenv.cfg.
    venv = os.path.dirname(os.path.dirname(os.path.abspath(sys.executable)))
    if os.path.isfile(os.path.join(venv, "pyvenv.cfg")):
        out.append(venv)
    out += ["/usr/local", "/usr"]
    return list(dict.fromkeys(out))


def guest_dirs(name: str) -> list[Path]:
    """Where guest ``name`` is looked for, in order."""
    env = os.environ.get(ENV)
    if env:
        return [Path(env) / name]
    return [Path(p).joinpath(*DATA, name) for p in _prefixes()]


def guest_dir(name: str) -> Path | None:
    """The first directory that holds guest ``name`` (symbolic links resolved), or None."""
    for d in guest_dirs(name):
        if (d / "vmlinuz").is_file() and (d / "initramfs.img").is_file():
            return d.resolve()
    return None


def guest_files(name: str) -> dict:
    if name not in GUESTS:
        raise UsageError(f"unknown guest {name!r}", hint=f"built-in guests: {', '.join(GUESTS)}")
    d = guest_dir(name)
    if d is None:
        raise UsageError(f"the {name} guest is not installed (looked in "
                         f"{', '.join(str(p) for p in guest_dirs(name))})",
                         hint=BUILD_HINT.format(name=name))
    return {"kernel": d / "vmlinuz", "initrd": d / "initramfs.img", "cmdline": CMDLINE,
            "ready_marker": READY_MARKER}


RECORD = b"vmreplica-demo seq="


def parse_record(sector: bytes) -> int | None:
    """The sequence number in one 512-byte demo record, or None if it is not one."""
    if not sector.startswith(RECORD):
        return None
    text, _, rest = sector[len(RECORD):].partition(b"\0")
    if not text.isdigit() or rest.strip(b"\0"):
        return None
    return int(text)


def read_demo_records(image: str | Path, limit_sectors: int | None = None) -> dict:
    """What the demo guest wrote on ``image`` (its last disk): the top record (sector 0),
    the highest N such that records 1..N are all present and exact, and the first gap.

    Reads guest-visible contents with ``qemu-img dd -U`` (works on a running VM's disk and
    on a replica head with a backing chain).
    """
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(prefix="vmr-records-") as tmp:
        # Whole-disk reads in 1 MiB blocks (qemu-img dd issues one request per block: at
        # bs=512 a 64 MiB disk takes seconds); a short prefix is read sector by sector.
        args = ["qemu-img", "dd", "-U", "-O", "raw", f"if={image}", f"of={tmp.name}"]
        args += ["bs=512", f"count={limit_sectors}"] if limit_sectors else ["bs=1M"]
        proc = subprocess.run(args, capture_output=True, text=True)
        if proc.returncode != 0:
            raise UsageError(f"cannot read {image}: {proc.stderr.strip()}")
        data = Path(tmp.name).read_bytes()
    sectors = len(data) // 512
    top = parse_record(data[:512])
    n = 0
    while n + 1 < sectors and parse_record(data[(n + 1) * 512:(n + 2) * 512]) == n + 1:
        n += 1
    # A record beyond the first missing one means a write was lost in between.
    later = None
    at = data.find(RECORD, (n + 2) * 512)
    while at >= 0 and later is None:
        if at % 512 == 0 and parse_record(data[at:at + 512]) is not None:
            later = at // 512
        at = data.find(RECORD, at + 1)
    return {"top": top, "contiguous": n, "gap_at": n + 1 if later else None}

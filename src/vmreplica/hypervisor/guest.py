"""Built-in guests: the demo guest (Debian's kernel + a busybox initramfs built by
`scripts/build-guest.sh` at set-up) that writes numbered records to its last disk.

Found in $VMREPLICA_GUEST_DIR/<name>, else in the source tree's guest/<name>.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError

GUESTS = ("demo",)
CMDLINE = "console=ttyS0 quiet panic=-1"
READY_MARKER = "vmreplica-demo"


def guest_dir(name: str) -> Path:
    env = os.environ.get("VMREPLICA_GUEST_DIR")
    if env:
        return Path(env) / name
    return Path(__file__).resolve().parents[3] / "guest" / name


def guest_files(name: str) -> dict:
    if name not in GUESTS:
        raise UsageError(f"unknown guest {name!r}", hint=f"built-in guests: {', '.join(GUESTS)}")
    d = guest_dir(name)
    kernel, initrd = d / "vmlinuz", d / "initramfs.img"
    if not (kernel.exists() and initrd.exists()):
        raise UsageError(f"the {name} guest is not built ({d})",
                         hint="run `make setup` (it runs scripts/build-guest.sh)")
    return {"kernel": kernel, "initrd": initrd, "cmdline": CMDLINE, "ready_marker": READY_MARKER}


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
        count = f"count={limit_sectors}" if limit_sectors else None
        args = ["qemu-img", "dd", "-U", "-O", "raw", "bs=512", f"if={image}", f"of={tmp.name}"]
        if count:
            args.append(count)
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
    later = next((i for i in range(n + 2, sectors)
                  if parse_record(data[i * 512:(i + 1) * 512]) is not None), None)
    return {"top": top, "contiguous": n, "gap_at": n + 1 if later else None}

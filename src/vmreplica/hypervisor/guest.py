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

"""The embedded `qemu` driver: VMs are QEMU processes this host starts itself, controlled
over QMP. No other daemon needed.

A VM keeps running when the daemon stops or dies (as with any hypervisor); the daemon
finds it again by its pid file and uuid.

One module per concern; each says what it owns:

    files       a VM's vm.json and runtime files, its pid, its main monitor, pause mark
    cmdline     QEMU's command line from vm.json; reading QEMU's log and errors
    inventory   list, create, define, delete; start, stop, pause, resume; save/restore
    agent       guest agent, the VM checker (check)
    session     block sessions: fleecing, live views, storage daemon, bitmaps
    block       block access: sessions, views a dead daemon left, `vm io`
    mirror      continuous mode: the mirror into the replica, the watchdog's monitor
    collapse    a failed-over VM's chain merged into its base, live
    driver      QemuDriver, combining the parts
"""

from .driver import QemuDriver

__all__ = ["QemuDriver"]

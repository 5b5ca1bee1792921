#!/bin/bash
# Idempotent set-up of a fresh Debian machine for vmreplica: Debian packages, the demo
# guest, a virtual environment built from Debian's python (for python3-libnbd and
# python3-libvirt) and the package itself. Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(qemu-system-x86 qemu-utils qemu-system-common python3-venv python3-libnbd
          python3-libvirt libvirt-daemon-system python3-cryptography rsync cpio busybox-static
          iproute2 procps chromium chromium-driver
          ovmf    # UEFI firmware: the Debian guest booted through OVMF (tests/e2e/test_existing_uefi.py)
          curl)   # the README's tour reads /metrics with it (tests/e2e/test_readme_tour.py)
# The HA stack (issue 8): Corosync, Pacemaker, corosync-qnetd/qdevice and their tools.
mapfile -t CLUSTER_PACKAGES < <(grep -v '^#' scripts/cluster-packages.txt | grep .)
PACKAGES+=("${CLUSTER_PACKAGES[@]}")

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        -o Dpkg::Options::=--force-confold "${missing[@]}"
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import nbd' 2>/dev/null; then
    echo "setup: creating .venv from /usr/bin/python3 --system-site-packages"
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.vmreplica-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing vmreplica into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    touch "$stamp"
fi
# The command itself: Python without site processing until an import needs it (pip's
# console script pays ~10 ms more per call here; see src/vmreplica/cli/launcher.py).
.venv/bin/python -m vmreplica.cli.launcher .venv/bin/vmreplica
# Byte-compiled now, as pip does for a regular install: an editable install compiles on
# first import, and not at all where PYTHONDONTWRITEBYTECODE is set (this machine's
# shells set it): every command then compiled its modules again, ~4 ms of each call.
.venv/bin/python -m compileall -q src/vmreplica

if [ ! -f guest/demo/initramfs.img ] || [ scripts/build-guest.sh -nt guest/demo/initramfs.img ] \
   || [ scripts/guest-init.sh -nt guest/demo/initramfs.img ]; then
    echo "setup: building the demo guest"
    bash scripts/build-guest.sh guest/demo
fi
# The guest is installed data: the daemon looks for it under its installation's prefix
# (PREFIX/share/vmreplica/guests/NAME, see src/vmreplica/hypervisor/guest.py), not in
# this clone. Link the one just built into the virtual environment's.
mkdir -p .venv/share/vmreplica/guests
ln -sfn "$PWD/guest/demo" .venv/share/vmreplica/guests/demo
# Pacemaker finds resource agents under /usr/lib/ocf/resource.d and fence agents in
# /usr/sbin: install the product's resource agents there (ocf:vmreplica:vm,
# ocf:vmreplica:daemon) and the test harness's fence agent for the namespace lab's PDU
# (fence_vmreplica, tests/harness/fence_vmreplica.py).
if [ "$(id -u)" -eq 0 ]; then
    .venv/bin/python -c 'from vmreplica.cluster import agent; agent.install()'
    .venv/bin/python -c 'import sys; sys.path.insert(0, "tests")
from harness import fence_vmreplica; fence_vmreplica.install_fence_agent()'
else
    echo "setup: not root: the OCF and fence agents are not installed (run as root for HA)"
fi
echo "setup: ready (.venv/bin/vmreplica)"

#!/bin/bash
# Start libvirtd (and virtlogd) on a machine without systemd, for the libvirt driver, its
# tests and the demo. Idempotent: does nothing when `virsh -c qemu:///system version`
# already answers. Never edits /etc/libvirt/qemu.conf (a changed conffile makes a later
# `apt-get install` stop at a prompt). Exit 0 once libvirtd answers, 1 if it cannot start.
#
# Host homes (and every folder above a VM's disks) must be traversable by the
# `libvirt-qemu` user that runs QEMU under libvirt: e.g. /tmp/xyz with mode 0755.
set -euo pipefail

URI=qemu:///system
TIMEOUT=${LIBVIRTD_START_TIMEOUT:-30}

answers() { virsh -c "$URI" version > /dev/null 2>&1; }

if answers; then
    exit 0
fi
if ! command -v libvirtd > /dev/null || ! command -v virtlogd > /dev/null; then
    echo "start-libvirtd: libvirtd/virtlogd are not installed (run \`make setup\`)" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "start-libvirtd: must run as root to start the system libvirtd" >&2
    exit 1
fi

# No NAT network: vmreplica needs no bridge, and libvirt's default network would try to
# set up dnsmasq and iptables. Only the autostart link goes; the definition stays.
rm -f /etc/libvirt/qemu/networks/autostart/default.xml

mkdir -p /var/log/libvirt /var/log/libvirt/qemu /run/libvirt
if ! pgrep -x virtlogd > /dev/null; then
    virtlogd -d
fi
# A stale pid file of a dead libvirtd makes a new one refuse to start.
if [ -f /run/libvirtd.pid ] && ! kill -0 "$(cat /run/libvirtd.pid 2>/dev/null)" 2>/dev/null; then
    rm -f /run/libvirtd.pid
fi
if ! pgrep -x libvirtd > /dev/null; then
    libvirtd -d
fi

deadline=$((SECONDS + TIMEOUT))
until answers; do
    if [ $SECONDS -ge $deadline ]; then
        echo "start-libvirtd: libvirtd did not answer on $URI within ${TIMEOUT} s" >&2
        exit 1
    fi
    sleep 0.2
done
echo "start-libvirtd: libvirtd answers on $URI"

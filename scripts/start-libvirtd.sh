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

# running DAEMON: its pid file names a live process that is not a zombie (a stale pid file
# of a dead daemon makes a new one refuse to start: remove it)
running() {
    local pidfile=/run/$1.pid pid state
    pid=$(cat "$pidfile" 2>/dev/null) || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || state=
    if [ -n "$state" ] && [ "$state" != Z ] && grep -qa "$1" "/proc/$pid/cmdline" 2>/dev/null; then
        return 0
    fi
    rm -f "$pidfile"
    return 1
}

running virtlogd || virtlogd -d
running libvirtd || libvirtd -d

deadline=$((SECONDS + TIMEOUT))
until answers; do
    if [ $SECONDS -ge $deadline ]; then
        echo "start-libvirtd: libvirtd did not answer on $URI within ${TIMEOUT} s" >&2
        exit 1
    fi
    sleep 0.2
done
echo "start-libvirtd: libvirtd answers on $URI"

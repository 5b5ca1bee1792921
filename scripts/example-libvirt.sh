#!/bin/bash
# An operator's libvirt objects for the README's libvirt tour, made as an operator's own
# tooling (virt-install, virt-manager) would leave them — vmreplica never made them:
#
#   bash scripts/example-libvirt.sh network NAME        a libvirt network NAME (a bridge,
#                                                       no forwarding, no address): a site's
#                                                       LAN that reaches nothing else
#   bash scripts/example-libvirt.sh domain NAME NETWORK a Debian 12 domain NAME booting from
#                                                       its own disk (the Debian guest of
#                                                       scripts/build-debian-guest.sh, built
#                                                       once into guest/debian), a NIC on
#                                                       NETWORK, the guest-agent channel
#   bash scripts/example-libvirt.sh clean NAME... [--network NET...]
#                                                       power off and undefine the domains
#                                                       (their disks go), stop the networks
#
# As root. Disks go to VMR_EXAMPLE_IMAGES (default /var/lib/libvirt/images). Domains are
# type qemu (TCG): KVM cannot boot a Linux guest on the machines this project is tested on.
set -euo pipefail

die() { echo "example-libvirt: ERROR: $*" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
images=${VMR_EXAMPLE_IMAGES:-/var/lib/libvirt/images}
virsh=(virsh -q -c qemu:///system)

bridge_of() { echo "vmrx$(echo -n "$1" | sha1sum | cut -c1-8)"; }   # at most 15 characters

network() {
    local name=$1
    if "${virsh[@]}" net-info "$name" >/dev/null 2>&1; then
        echo "network $name exists"; return
    fi
    local xml
    xml=$(mktemp)
    echo "<network><name>$name</name><bridge name='$(bridge_of "$name")' stp='off'/></network>" >"$xml"
    "${virsh[@]}" net-create "$xml" >/dev/null
    rm -f "$xml"
    echo "network $name: bridge $(bridge_of "$name"), no forwarding"
}

domain() {
    local name=$1 net=$2
    "${virsh[@]}" domstate "$name" >/dev/null 2>&1 && die "a domain named $name exists"
    "${virsh[@]}" net-info "$net" >/dev/null 2>&1 || die "no libvirt network $net"
    bash "$here/build-debian-guest.sh" "$repo/guest/debian" | tail -n 1
    mkdir -p "$images"
    local disk=$images/$name.qcow2 xml
    cp --sparse=always "$repo/guest/debian/disk.qcow2" "$disk"
    xml=$(mktemp)
    cat >"$xml" <<EOF
<domain type='qemu'>
  <name>$name</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/><apic/></features>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$disk'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'><source network='$net'/><model type='virtio'/></interface>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
    "${virsh[@]}" define "$xml" >/dev/null
    rm -f "$xml"
    echo "domain $name: $disk, a NIC on $net ($("${virsh[@]}" domiflist "$name" --inactive | awk '{print $5}'))"
}

clean() {
    local nets=() doms=()
    while [ $# -gt 0 ]; do
        case $1 in
            --network) nets+=("$2"); shift 2 ;;
            *) doms+=("$1"); shift ;;
        esac
    done
    for d in "${doms[@]}"; do
        "${virsh[@]}" destroy "$d" >/dev/null 2>&1 || true
        "${virsh[@]}" undefine "$d" --checkpoints-metadata >/dev/null 2>&1 || true
        rm -f "$images/$d.qcow2"
    done
    for n in "${nets[@]}"; do
        "${virsh[@]}" net-destroy "$n" >/dev/null 2>&1 || true
    done
}

[ "$(id -u)" -eq 0 ] || die "must run as root"
case ${1:-} in
    network) [ $# -eq 2 ] || die "usage: $0 network NAME"; network "$2" ;;
    domain) [ $# -eq 3 ] || die "usage: $0 domain NAME NETWORK"; domain "$2" "$3" ;;
    clean) shift; clean "$@" ;;
    *) die "usage: $0 network NAME | domain NAME NETWORK | clean NAME... [--network NET]..." ;;
esac

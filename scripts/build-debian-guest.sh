#!/bin/bash
# Build the vmreplica Debian guest: a small Debian 12 (bookworm) system made from Debian's
# packages that boots from its own disk both ways — BIOS (SeaBIOS -> gptmbr.bin ->
# extlinux) and UEFI (OVMF -> systemd-boot) — into Debian's cloud kernel and systemd, with
# an ext4 root (label vmr-root), qemu-guest-agent and a workload service: a SQLite bank
# (guest-src/debian/vmr-bank, checked by /usr/local/bin/bank-check).
#
# Usage: bash scripts/build-debian-guest.sh OUTDIR        (as root)
#
# Writes OUTDIR/disk.qcow2 (a 1 GiB disk) and OUTDIR/VERSION: its first line is the recipe
# hash (this script and the guest-src/debian files it installs), the next lines key=value
# facts (kernel, layout, build date, seconds). Idempotent: does nothing when
# OUTDIR/VERSION's hash matches and disk.qcow2 exists. Installs the Debian packages it
# needs (mmdebstrap, extlinux, mtools, ...) when missing. One build at a time per OUTDIR
# (flock); the outputs are replaced atomically; loop devices and mounts are released on
# every exit path (and those a killed build left behind, on the next run).
# Packages come from the host's apt sources (/etc/apt/sources.list.d/debian.sources, or
# VMR_DEBIAN_SOURCES=FILE).
#
# The disk (GPT, one image for both firmwares):
#   partition 1  the root: ext4, label vmr-root, GPT attribute LegacyBIOSBootable, with
#                extlinux in /boot/extlinux; syslinux's gptmbr.bin in the protective MBR
#                boots it under a BIOS.
#   partition 2  the EFI system partition (64 MiB, vfat, label VMR-ESP): systemd-boot
#                (Debian's systemd-boot-efi) as \EFI\BOOT\BOOTX64.EFI, the removable-media
#                path firmware looks for without any boot entry, and a loader entry
#                (\loader\entries\debian.conf) with copies of the kernel and the initrd.
#                The host kernel has no vfat driver: the ESP is written with mtools, never
#                mounted. The guest does not mount it either (systemd.gpt_auto=0): a
#                kernel installed later inside the guest would not reach it.
# Both boot entries give the kernel the same command line (root=LABEL=vmr-root
# console=ttyS0).
#
# Boot it under TCG (KVM cannot boot a Linux guest on these machines, see FIELD-NOTES),
# 512 MiB, a virtio disk, the org.qemu.guest_agent.0 virtio serial port, console on ttyS0:
# BIOS: machine pc, cpu qemu64 (tests/integration/test_debian_guest.py has a libvirt
# domain); UEFI: machine q35, OVMF_CODE_4M.fd with an NVRAM from OVMF_VARS_4M.fd
# (tests/e2e/test_existing_uefi.py). The root account has no password (locked): run
# commands through the guest agent (guest-exec), e.g. /usr/local/bin/bank-check.
set -euo pipefail

log() { echo "build-debian-guest: $*"; }
die() { echo "build-debian-guest: ERROR: $*" >&2; exit 1; }

[ $# -eq 1 ] && [ -n "$1" ] || die "usage: bash $0 OUTDIR"
[ "$(id -u)" -eq 0 ] || die "must run as root (mmdebstrap, loop devices, mount)"

here=$(cd "$(dirname "$0")" && pwd)
SRC=$(cd "$here/.." && pwd)/guest-src/debian
GUEST_FILES=(vmr-bank bank-check vmr-bank.service)
for f in "${GUEST_FILES[@]}"; do
    [ -f "$SRC/$f" ] || die "missing $SRC/$f"
done

SUITE=bookworm
DISK_MIB=1024              # the disk: 1 GiB
ESP_MIB=64                 # its EFI system partition (partition 2, at the end)
LABEL=vmr-root
ESP_LABEL=VMR-ESP
HOSTNAME_=vmr-debian
# systemd-boot-efi: only its EFI binary is used (copied to the ESP); it installs no hooks
PACKAGES=(linux-image-cloud-amd64 systemd-sysv udev dbus qemu-guest-agent sqlite3
          iproute2 procps initramfs-tools zstd systemd-boot-efi)
SDBOOT=/usr/lib/systemd/boot/efi/systemd-bootx64.efi     # in the guest's root
# the modules the initramfs needs to mount the root (MODULES=list keeps it small)
INITRD_MODULES=(virtio_pci virtio_blk ext4)

# The recipe: this script and the guest's files. Same hash, same guest.
RECIPE=$( (cat "$0"; for f in "${GUEST_FILES[@]}"; do echo "== $f"; cat "$SRC/$f"; done) |
          sha256sum | cut -c1-16)

mkdir -p "$1"
OUTDIR=$(cd "$1" && pwd)
case $OUTDIR in *[[:space:]]*) die "OUTDIR must not contain white space: $OUTDIR" ;; esac

built() {
    [ -f "$OUTDIR/disk.qcow2" ] && [ -f "$OUTDIR/VERSION" ] &&
        [ "$(head -n1 "$OUTDIR/VERSION")" = "$RECIPE" ]
}
if built; then
    log "up to date: $OUTDIR/disk.qcow2 (recipe $RECIPE)"
    exit 0
fi

# One build at a time per OUTDIR; another one may have just finished it.
exec 9> "$OUTDIR/.lock"
if ! flock -n 9; then
    log "waiting for another build in $OUTDIR"
    flock 9
fi
if built; then
    log "up to date: $OUTDIR/disk.qcow2 (recipe $RECIPE)"
    exit 0
fi

# --- releasing mounts, loop devices and scratch directories ----------------------------

# mounts_under DIR: the mount points at or below DIR, deepest first
mounts_under() {
    awk -v d="$1" '{ m = $2; gsub(/\\040/, " ", m)
                     if (m == d || index(m, d "/") == 1) print m }' /proc/mounts | sort -r
}
# release DIR: unmount what is mounted below DIR, detach the loop devices on files in DIR,
# then remove DIR (never across a file system boundary: a bind mount left mounted below it
# is never descended into). Best effort; says what it could not do.
release() {
    local dir=$1 m dev
    [ -n "$dir" ] && [ -e "$dir" ] || return 0
    for m in $(mounts_under "$dir"); do
        umount "$m" 2> /dev/null || umount -l "$m" 2> /dev/null ||
            echo "build-debian-guest: WARNING: cannot unmount $m" >&2
    done
    for dev in $(losetup -n -O NAME,BACK-FILE 2> /dev/null |
                 awk -v d="$dir/" 'index($2, d) == 1 { print $1 }'); do
        losetup -d "$dev" 2> /dev/null ||
            echo "build-debian-guest: WARNING: cannot detach $dev" >&2
    done
    if [ -n "$(mounts_under "$dir")" ]; then
        echo "build-debian-guest: WARNING: $dir still has mounts; not removing it" >&2
        return 0
    fi
    rm -rf --one-file-system "$dir"
}

WORK=
MNT=
LOOP=
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [ -n "$MNT" ] && mountpoint -q "$MNT"; then
        umount "$MNT" 2> /dev/null || umount -l "$MNT"
    fi
    if [ -n "$LOOP" ]; then
        losetup -d "$LOOP" 2> /dev/null
    fi
    release "$WORK"
    rm -f "$OUTDIR/.disk.qcow2.new" "$OUTDIR/.VERSION.new"
    [ $rc -eq 0 ] || echo "build-debian-guest: FAILED (exit $rc); nothing in $OUTDIR was replaced" >&2
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# what a build killed without its trap (SIGKILL) left behind
for old in "$OUTDIR"/.work.*; do
    [ -e "$old" ] || continue
    log "removing the scratch directory of an interrupted build: $old"
    release "$old"
done

t0=$SECONDS

# --- host tools ----------------------------------------------------------------------

# command:package for every host tool this build runs
TOOLS=(mmdebstrap:mmdebstrap extlinux:extlinux sfdisk:fdisk losetup:mount partx:util-linux
       mkfs.ext4:e2fsprogs qemu-img:qemu-utils mkfs.vfat:dosfstools mcopy:mtools)
missing=()
for spec in "${TOOLS[@]}"; do
    cmd=${spec%%:*}; pkg=${spec#*:}
    if ! command -v "$cmd" > /dev/null 2>&1 ||
       ! dpkg-query -W -f='${Status}' "$pkg" 2> /dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
[ -f /usr/lib/syslinux/mbr/gptmbr.bin ] || missing+=(syslinux-common)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    apt_install() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            -o Dpkg::Options::=--force-confold "${missing[@]}" > /dev/null
    }
    if ! apt_install; then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -q > /dev/null ||
            die "apt-get update failed"
        apt_install || die "cannot install ${missing[*]} (apt-get install failed)"
    fi
fi
MBR=/usr/lib/syslinux/mbr/gptmbr.bin     # boots the GPT partition marked LegacyBIOSBootable
MERGED_USR_HOOK=/usr/share/mmdebstrap/hooks/merged-usr
[ -f "$MBR" ] || die "$MBR is missing (package syslinux-common)"

# the host's apt sources, as mmdebstrap's mirror
SOURCES=${VMR_DEBIAN_SOURCES:-}
if [ -n "$SOURCES" ]; then
    [ -f "$SOURCES" ] && [ -r "$SOURCES" ] ||
        die "VMR_DEBIAN_SOURCES=$SOURCES is not a readable apt sources file"
else
    for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
        if [ -s "$f" ]; then SOURCES=$f; break; fi
    done
fi
[ -n "$SOURCES" ] && [ -s "$SOURCES" ] ||
    die "no apt sources file (looked for /etc/apt/sources.list.d/debian.sources and" \
        "/etc/apt/sources.list); give one with VMR_DEBIAN_SOURCES=FILE"
grep -q "$SUITE" "$SOURCES" || die "$SOURCES names no $SUITE suite"

# --- 1. the root file system ---------------------------------------------------------

WORK=$(mktemp -d "$OUTDIR/.work.XXXXXX")
ROOT=$WORK/root
MNT=$WORK/mnt
mkdir -p "$MNT"

# Before the packages beyond Essential (the kernel among them) are installed: the
# initramfs-tools settings, so the initrd built when the kernel is installed is the small
# one (MODULES=list) and holds what mounting the root needs. (/etc/initramfs-tools/modules
# is a conffile of initramfs-tools: modules.d/ is the place for a package-less list.)
ESSENTIAL_HOOK="mkdir -p \"\$1/etc/initramfs-tools/conf.d\" \"\$1/usr/share/initramfs-tools/modules.d\"
echo MODULES=list > \"\$1/etc/initramfs-tools/conf.d/vmreplica.conf\"
printf '%s\n' ${INITRD_MODULES[*]} > \"\$1/usr/share/initramfs-tools/modules.d/vmreplica\""

# After everything is installed: the guest's own files and settings (runs on the host,
# $1 is the root).
CUSTOMIZE_HOOK=$(cat <<EOF
set -e
R=\$1
echo '$HOSTNAME_' > "\$R/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\t$HOSTNAME_\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "\$R/etc/hosts"
printf '# <file system>\t<mount point>\t<type>\t<options>\t<dump>\t<pass>\nLABEL=$LABEL\t/\text4\terrors=remount-ro\t0\t1\n' > "\$R/etc/fstab"
install -m 0755 '$SRC/vmr-bank' "\$R/usr/local/sbin/vmr-bank"
install -m 0755 '$SRC/bank-check' "\$R/usr/local/bin/bank-check"
install -m 0644 '$SRC/vmr-bank.service' "\$R/etc/systemd/system/vmr-bank.service"
chroot "\$R" systemctl enable vmr-bank.service
# no timers: nothing but the workload writes to the disk on its own
for t in "\$R"/lib/systemd/system/*.timer "\$R"/etc/systemd/system/*.timer; do
    [ -e "\$t" ] || continue
    chroot "\$R" systemctl mask "\$(basename "\$t")"
done
# e2scrub_reap (LVM snapshots of e2scrub; there is no LVM here) costs ~10 s of a TCG boot
[ ! -e "\$R/lib/systemd/system/e2scrub_reap.service" ] || chroot "\$R" systemctl mask e2scrub_reap.service
# a journal in memory only (the default without /var/log/journal, said explicitly)
mkdir -p "\$R/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\n' > "\$R/etc/systemd/journald.conf.d/vmreplica.conf"
rm -rf "\$R/var/log/journal"
# each copy of the image gets its own machine id on its first boot
: > "\$R/etc/machine-id"
rm -f "\$R/var/lib/dbus/machine-id"
EOF
)

log "mmdebstrap $SUITE (mirror: $SOURCES)"
# merged-usr hook: /usr merged by symlinks at the start (as debootstrap does), so the
# usrmerge package (and the ~50 MB of perl it brings) is not needed.
[ -d "$MERGED_USR_HOOK" ] || die "$MERGED_USR_HOOK is missing (package mmdebstrap)"
mmdebstrap --variant=minbase --hook-dir="$MERGED_USR_HOOK" \
    --include="$(IFS=,; echo "${PACKAGES[*]}")" \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --essential-hook="$ESSENTIAL_HOOK" \
    --customize-hook="$CUSTOMIZE_HOOK" \
    "$SUITE" "$ROOT" "$SOURCES" > "$WORK/mmdebstrap.log" 2>&1 ||
    { tail -n 40 "$WORK/mmdebstrap.log" >&2; die "mmdebstrap failed (its last lines above)"; }
log "root file system: $(du -sh --one-file-system "$ROOT" | cut -f1) in $((SECONDS - t0)) s"

# the kernel, its initrd, and what the initrd holds
kver=$(ls "$ROOT/lib/modules" | head -n1)
[ -n "$kver" ] || die "no kernel in $ROOT/lib/modules"
[ -f "$ROOT/boot/vmlinuz-$kver" ] || die "no /boot/vmlinuz-$kver"
[ -f "$ROOT/boot/initrd.img-$kver" ] || die "no /boot/initrd.img-$kver (initramfs-tools did not run)"
listing=$(chroot "$ROOT" lsinitramfs "/boot/initrd.img-$kver") || die "cannot list the initrd"
for m in "${INITRD_MODULES[@]}"; do
    if ! grep -q "/$m\.ko" <<< "$listing" &&
       ! grep -q "/$m\.ko" "$ROOT/lib/modules/$kver/modules.builtin"; then
        die "module $m is neither in the initrd nor built into kernel $kver"
    fi
done
log "kernel $kver, initrd $(stat -c %s "$ROOT/boot/initrd.img-$kver") bytes"

# --- 2. the disk -------------------------------------------------------------------------

RAW=$WORK/disk.raw
truncate -s "${DISK_MIB}M" "$RAW"
# GPT: the root from 1 MiB, the ESP at the end (1 MiB left for the backup GPT)
ROOT_TYPE=0FC63DAF-8483-4772-8E79-3D69D8477DE4      # Linux filesystem data
ESP_TYPE=C12A7328-F81F-11D2-BA4B-00A0C93EC93B       # EFI system partition
printf '%s\n' 'label: gpt' \
    "start=1MiB, size=$((DISK_MIB - ESP_MIB - 2))MiB, type=$ROOT_TYPE, name=$LABEL, attrs=LegacyBIOSBootable" \
    "start=$((DISK_MIB - ESP_MIB - 1))MiB, size=${ESP_MIB}MiB, type=$ESP_TYPE, name=$ESP_LABEL" |
    sfdisk -q "$RAW" > /dev/null || die "sfdisk failed"
# the boot code of the protective MBR (440 bytes: its partition table stays)
dd if="$MBR" of="$RAW" bs=440 count=1 conv=notrunc status=none

LOOP=$(losetup -f --show -P "$RAW") || die "losetup failed (are loop devices available?)"
PART=${LOOP}p1
ESP=${LOOP}p2
for _ in $(seq 50); do
    [ -b "$PART" ] && [ -b "$ESP" ] && break
    # partition scanning alone does not always create the partitions (on this kernel)
    partx -a "$LOOP" 2> /dev/null || true
    sleep 0.1
done
[ -b "$PART" ] && [ -b "$ESP" ] || die "the partitions $PART and $ESP of $LOOP did not appear"

# the kernel's command line, the same from both boot loaders (systemd.gpt_auto=0: the
# guest does not look for the ESP to mount it, booted by systemd-boot or not)
CMDLINE="root=LABEL=$LABEL ro console=ttyS0,115200 quiet no_timer_check systemd.gpt_auto=0"

log "mkfs.ext4 -d (filling the file system)"
mkfs.ext4 -q -L "$LABEL" -d "$ROOT" "$PART" || die "mkfs.ext4 failed"
mount "$PART" "$MNT" || die "cannot mount $PART"
mkdir -p "$MNT/boot/extlinux"
cat > "$MNT/boot/extlinux/extlinux.conf" <<EOF
DEFAULT debian
PROMPT 0
TIMEOUT 0

LABEL debian
    LINUX /boot/vmlinuz-$kver
    INITRD /boot/initrd.img-$kver
    APPEND $CMDLINE
EOF
out=$(extlinux --install "$MNT/boot/extlinux" 2>&1) || die "extlinux --install failed: $out"
used=$(df -h --output=used "$MNT" | tail -n1 | tr -d ' ')
umount "$MNT"

# The ESP: staged in a directory, copied in with mtools (no vfat driver on the host).
log "the EFI system partition (systemd-boot)"
[ -f "$ROOT$SDBOOT" ] || die "no $SDBOOT in the guest's root (package systemd-boot-efi)"
STAGE=$WORK/esp
mkdir -p "$STAGE/EFI/BOOT" "$STAGE/loader/entries" "$STAGE/debian"
cp "$ROOT$SDBOOT" "$STAGE/EFI/BOOT/BOOTX64.EFI"
cp "$ROOT/boot/vmlinuz-$kver" "$ROOT/boot/initrd.img-$kver" "$STAGE/debian/"
printf 'default debian.conf\ntimeout 0\neditor no\n' > "$STAGE/loader/loader.conf"
cat > "$STAGE/loader/entries/debian.conf" <<EOF
title   Debian GNU/Linux 12 (vmreplica)
version $kver
linux   /debian/vmlinuz-$kver
initrd  /debian/initrd.img-$kver
options $CMDLINE
EOF
mkfs.vfat -F 32 -n "$ESP_LABEL" "$ESP" > /dev/null || die "mkfs.vfat failed"
# (mtools says "Could not get geometry of device" of a loop partition, harmlessly: its
# messages are shown only when it fails)
export MTOOLS_SKIP_CHECK=1
mcopy -s -Q -i "$ESP" "$STAGE/EFI" "$STAGE/loader" "$STAGE/debian" :: 2> "$WORK/mtools.log" ||
    { cat "$WORK/mtools.log" >&2; die "mcopy to the ESP failed"; }
esp_listing=$(mdir -/ -b -i "$ESP" :: 2> "$WORK/mtools.log") ||
    { cat "$WORK/mtools.log" >&2; die "cannot list the ESP"; }
for f in ::/EFI/BOOT/BOOTX64.EFI ::/loader/loader.conf ::/loader/entries/debian.conf \
         "::/debian/vmlinuz-$kver" "::/debian/initrd.img-$kver"; do
    grep -qixF "$f" <<< "$esp_listing" || die "$f is missing from the ESP"
done
esp_used=$(du -sh "$STAGE" | cut -f1)
losetup -d "$LOOP"
LOOP=

log "qemu-img convert -O qcow2"
qemu-img convert -O qcow2 "$RAW" "$OUTDIR/.disk.qcow2.new" || die "qemu-img convert failed"
chmod 0644 "$OUTDIR/.disk.qcow2.new"
{
    echo "$RECIPE"
    echo "suite=$SUITE"
    echo "kernel=$kver"
    echo "disk_size=${DISK_MIB}MiB"
    echo "layout=gpt p1=root(ext4,LegacyBIOSBootable) p2=esp(vfat,${ESP_MIB}MiB)"
    echo "boot=bios:gptmbr+extlinux uefi:systemd-boot"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "build_seconds=$((SECONDS - t0))"
} > "$OUTDIR/.VERSION.new"
mv -f "$OUTDIR/.disk.qcow2.new" "$OUTDIR/disk.qcow2"
mv -f "$OUTDIR/.VERSION.new" "$OUTDIR/VERSION"
log "done in $((SECONDS - t0)) s: $OUTDIR/disk.qcow2 ($(stat -c %s "$OUTDIR/disk.qcow2") bytes;" \
    "$used used in the guest's root, $esp_used in its ESP), kernel $kver, recipe $RECIPE"

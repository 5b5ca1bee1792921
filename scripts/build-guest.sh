#!/bin/bash
# Build the vmreplica demo guest: OUTDIR/vmlinuz (Debian's current amd64 kernel),
# OUTDIR/initramfs.img (gzip'ed newc cpio: busybox-static, the virtio/ACPI-button modules
# and scripts/guest-init.sh as /init) and OUTDIR/VERSION (the kernel version).
#
# Usage: bash scripts/build-guest.sh [OUTDIR]        (default: guest/demo)
#
# Idempotent: the .deb files are downloaded once into OUTDIR/.cache (only they are kept);
# everything else is rebuilt from scratch on every run and the outputs replaced atomically.
# Environment: VMR_KERNEL_PKG=linux-image-X overrides the kernel package.
#
# Boot it (TCG; a Linux guest hangs under KVM on some hosts) with:
#   qemu-system-x86_64 -accel tcg -m 256 -nodefaults -nographic -no-reboot
#     -kernel OUTDIR/vmlinuz -initrd OUTDIR/initramfs.img
#     -append "console=ttyS0 quiet panic=-1" -serial file:console.log
#     -drive file=d.qcow2,if=none,id=d0,format=qcow2 -device virtio-blk-pci,drive=d0
#     -device virtio-serial-pci -chardev socket,id=qga0,path=SOCK,server=on,wait=off
#     -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0
set -euo pipefail

log() { echo "build-guest: $*"; }
die() { echo "build-guest: ERROR: $*" >&2; exit 1; }

here=$(cd "$(dirname "$0")" && pwd)
OUTDIR=${1:-$here/../guest/demo}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
CACHE=$OUTDIR/.cache
INIT_SRC=$here/guest-init.sh
[ -f "$INIT_SRC" ] || die "missing $INIT_SRC"
mkdir -p "$CACHE"
# one build at a time per OUTDIR (concurrent set-ups share the cache and the outputs)
exec 9> "$CACHE/.lock"
flock 9
rm -rf "$CACHE"/work.*          # left by an interrupted build

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
APT_OPTS=(-q)
# apt's download sandbox user (_apt) may not be able to write into OUTDIR
[ "$(id -u)" -eq 0 ] && APT_OPTS+=(-o APT::Sandbox::User=root)

apt_updated=0
apt_update_once() {
    if [ $apt_updated -eq 0 ]; then
        log "apt-get update"
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q > /dev/null
        apt_updated=1
    fi
}

# install_tools CMD:PACKAGE... - installs the Debian packages whose command is missing
install_tools() {
    local missing=() spec cmd pkg
    for spec in "$@"; do
        cmd=${spec%%:*}; pkg=${spec#*:}
        if ! command -v "$cmd" > /dev/null 2>&1 ||
           ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$pkg")
        fi
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing Debian packages: ${missing[*]}"
    if ! $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" > /dev/null; then
        apt_update_once
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" > /dev/null
    fi
}

# 1. host tools
log "checking host tools"
install_tools cpio:cpio gzip:gzip find:findutils

# 2. which kernel
kernel_pkg=${VMR_KERNEL_PKG:-}
find_kernel_pkg() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}
if [ -z "$kernel_pkg" ]; then
    kernel_pkg=$(find_kernel_pkg || true)
    if [ -z "$kernel_pkg" ]; then
        apt_update_once
        kernel_pkg=$(find_kernel_pkg || true)
    fi
    [ -n "$kernel_pkg" ] || die "cannot find the kernel package (apt-cache depends linux-image-amd64)"
fi
log "kernel package $kernel_pkg"

# 3. download (once)
download() {
    local pkg=$1 deb
    deb=$(ls "$CACHE/${pkg}"_*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$deb" ]; then
        log "downloading $pkg"
        if ! (cd "$CACHE" && apt-get "${APT_OPTS[@]}" download "$pkg" > /dev/null); then
            apt_update_once
            (cd "$CACHE" && apt-get "${APT_OPTS[@]}" download "$pkg" > /dev/null)
        fi
        deb=$(ls "$CACHE/${pkg}"_*.deb 2>/dev/null | head -n1 || true)
        [ -n "$deb" ] || die "apt-get download $pkg produced no .deb"
    else
        log "using cached $(basename "$deb")"
    fi
    DEB=$deb
}

# 4. extract (into a scratch dir removed at exit: the kernel package unpacks to ~400 MB)
WORK=$(mktemp -d "$CACHE/work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM
extract() {
    log "extracting $(basename "$1")"
    mkdir -p "$2"
    dpkg -x "$1" "$2"
}

# fetch PACKAGE DIR: download (once) and extract; a damaged cached .deb (an interrupted
# download) is fetched again
fetch() {
    download "$1"
    if ! extract "$DEB" "$2" 2> /dev/null; then
        log "cached $(basename "$DEB") is damaged, downloading it again"
        rm -rf "$DEB" "$2"
        download "$1"
        extract "$DEB" "$2"
    fi
}
fetch "$kernel_pkg" "$WORK/kernel"
# drop the .deb of an older kernel once a newer one is cached
find "$CACHE" -maxdepth 1 -name 'linux-image-*.deb' ! -name "$(basename "$DEB")" -delete
fetch busybox-static "$WORK/busybox"

KROOT=$WORK/kernel
kver=$(ls "$KROOT/lib/modules" | head -n1)
[ -n "$kver" ] || die "no lib/modules in $kernel_pkg"
[ -f "$KROOT/boot/vmlinuz-$kver" ] || die "no boot/vmlinuz-$kver in $kernel_pkg"
BUSYBOX=$WORK/busybox/bin/busybox
[ -x "$BUSYBOX" ] || die "no bin/busybox in busybox-static"
log "kernel version $kver"

# 5. stage the initramfs tree
STAGE=$WORK/root
log "staging the initramfs"
mkdir -p "$STAGE"/{bin,dev,proc,sys,run,tmp,etc,lib/modules}
cp "$BUSYBOX" "$STAGE/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$STAGE/bin/$applet"
done
ln -s bin "$STAGE/sbin"
mkdir -p "$STAGE/usr"
ln -s ../bin "$STAGE/usr/bin"
ln -s ../bin "$STAGE/usr/sbin"
install -m 0755 "$INIT_SRC" "$STAGE/init"
mknod -m 600 "$STAGE/dev/console" c 5 1 2> /dev/null || true   # the kernel's builtin cpio has one too

# modules: the wanted ones plus what they depend on (from their .modinfo), dependencies first
MODDIR=$KROOT/lib/modules/$kver/kernel
WANTED=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk
        virtio_console button evdev)
declare -A MODPATH=() DONE=()
ORDER=()
find_module() {     # prints the file of module $1 (names treat - and _ alike)
    local n=$1 f
    f=$(find "$MODDIR" \( -name "$n.ko*" -o -name "${n//_/-}.ko*" \) -print -quit)
    [ -n "$f" ] || die "module $n not found in $kernel_pkg"
    echo "$f"
}
add_module() {
    local n=$1 f deps d
    [ -n "${DONE[$n]:-}" ] && return 0
    DONE[$n]=1
    f=$(find_module "$n")
    case $f in
        *.ko) deps=$(grep -a -o 'depends=[A-Za-z0-9_,-]*' "$f" | head -n1 || true) ;;
        *.ko.xz) deps=$(xz -dc "$f" | grep -a -o 'depends=[A-Za-z0-9_,-]*' | head -n1 || true) ;;
        *.ko.gz) deps=$(gzip -dc "$f" | grep -a -o 'depends=[A-Za-z0-9_,-]*' | head -n1 || true) ;;
        *.ko.zst) deps=$(zstd -qdc "$f" | grep -a -o 'depends=[A-Za-z0-9_,-]*' | head -n1 || true) ;;
        *) die "unknown module format $f" ;;
    esac
    deps=${deps#depends=}
    for d in ${deps//,/ }; do
        add_module "${d//-/_}"
    done
    MODPATH[$n]=$f
    ORDER+=("$n")
}
# tools for compressed modules, only if this kernel has them
if find "$MODDIR" -name '*.ko.xz' -print -quit | grep -q .; then install_tools xz:xz-utils; fi
if find "$MODDIR" -name '*.ko.zst' -print -quit | grep -q .; then install_tools zstd:zstd; fi
for m in "${WANTED[@]}"; do
    add_module "$m"
done
: > "$STAGE/etc/vmreplica-modules"
for m in "${ORDER[@]}"; do
    f=${MODPATH[$m]}
    case $f in          # busybox insmod loads plain .ko files only: decompress here
        *.ko)     cp "$f" "$STAGE/lib/modules/$m.ko" ;;
        *.ko.xz)  xz -dc "$f" > "$STAGE/lib/modules/$m.ko" ;;
        *.ko.gz)  gzip -dc "$f" > "$STAGE/lib/modules/$m.ko" ;;
        *.ko.zst) zstd -qdc "$f" > "$STAGE/lib/modules/$m.ko" ;;
    esac
    echo "$m.ko" >> "$STAGE/etc/vmreplica-modules"
done
log "modules (load order): ${ORDER[*]}"

# 6. pack
log "packing $OUTDIR/initramfs.img"
tmp=$WORK/initramfs.img
find "$STAGE" -exec touch -h -d @0 {} +          # reproducible: same inputs, same bytes
(cd "$STAGE" && find . -mindepth 1 | LC_ALL=C sort |
    cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -9 -n > "$tmp"
# an empty archive is what a missing/broken cpio produces: check /init is in it
listing=$(gzip -dc "$tmp" | cpio -t --quiet 2> /dev/null || true)
grep -qx init <<< "$listing" || die "the initramfs archive has no /init (is cpio working?)"
# replace the outputs atomically (a running test may be booting the previous ones)
cp "$tmp" "$OUTDIR/.initramfs.img.new"
mv -f "$OUTDIR/.initramfs.img.new" "$OUTDIR/initramfs.img"
cp "$KROOT/boot/vmlinuz-$kver" "$OUTDIR/.vmlinuz.new"
mv -f "$OUTDIR/.vmlinuz.new" "$OUTDIR/vmlinuz"
echo "$kver" > "$OUTDIR/.VERSION.new"
mv -f "$OUTDIR/.VERSION.new" "$OUTDIR/VERSION"
log "done: $OUTDIR/vmlinuz ($(stat -c %s "$OUTDIR/vmlinuz") bytes)," \
    "$OUTDIR/initramfs.img ($(stat -c %s "$OUTDIR/initramfs.img") bytes), VERSION $kver"

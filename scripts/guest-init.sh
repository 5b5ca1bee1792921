#!/bin/sh
# /init of the vmreplica demo guest (busybox sh; packed by scripts/build-guest.sh).
#
# Runs two things:
#   * the record writer: on the LAST virtio disk (/dev/vd* whole disks in name order) it
#     writes, every 100 ms, record N to 512-byte sector N and then the same 512 bytes to
#     sector 0. A record is the ASCII text "vmreplica-demo seq=N" padded with zero bytes to
#     512 bytes. Each write is O_DIRECT followed by a flush of the device (busybox dd
#     oflag=direct conv=fsync), so sector N is durable before sector 0 is written, and
#     sector 0 is durable before record N+1 begins. On boot it continues from the sequence
#     number found in sector 0 (or from 1). It stops when sector N would lie beyond the
#     end of the disk.
#   * a minimal guest agent on the virtio-serial port org.qemu.guest_agent.0: guest-sync,
#     guest-sync-delimited, guest-ping, guest-info, guest-fsfreeze-freeze/-thaw/-status
#     and guest-shutdown. A freeze pauses the writer between records and auto-thaws
#     after 10 s.
# ACPI power button (QEMU system_powerdown): busybox acpid runs /etc/acpi/PWRF/00000080,
# which stops the writer after its current record and powers off, like guest-shutdown.
#
# Internal entry points (never used by the kernel): "/init --vmr-shutdown [poweroff|reboot]".

PATH=/bin
export PATH
RUN=/run/vmr                       # state shared by the writer, the agent and acpid
AGENT_PORT_NAME=org.qemu.guest_agent.0
FREEZE_TIMEOUT_CS=1000             # auto-thaw after 10 s (in 1/100 s)

say() { echo "vmreplica-demo: $*"; }

# nap SECONDS: a sleep without fork/exec (a read with timeout on a FIFO nobody writes to,
# held open on fd 4); fractions allowed
open_nap() {
    [ -p "$RUN/nap" ] || mkfifo "$RUN/nap"
    exec 4<> "$RUN/nap"
}
nap() { read -t "$1" nap_ <&4; }

# NOW := monotonic time in 1/100 s (from /proc/uptime; no fork). The "1" prefix keeps a
# fraction such as "08" from being read as octal.
NOW=0
set_now() {
    local up rest
    read -r up rest < /proc/uptime
    NOW=$(( ${up%.*} * 100 + 1${up#*.} - 100 ))
}

# ---------------------------------------------------------------------------------------
# clean stop (guest-shutdown, ACPI power button): finish the current record, then power off
vmr_shutdown() {
    local mode=${1:-poweroff} i=0
    : > "$RUN/stop"
    while [ ! -e "$RUN/idle" ] && [ $i -lt 100 ]; do    # at most ~5 s
        nap 0.05
        i=$((i + 1))
    done
    [ -e "$RUN/idle" ] || say "writer did not stop in time"
    sync
    say "$mode"
    if [ "$mode" = reboot ]; then reboot -f; else poweroff -f; fi
    sleep 5
}

if [ "$1" = "--vmr-shutdown" ]; then
    open_nap
    vmr_shutdown "$2"
    exit 0
fi

# ---------------------------------------------------------------------------------------
# the record writer
#
# One record = one busybox dd writing 512 bytes with O_DIRECT and then fsync()ing the block
# device (which sends a FLUSH to the virtual disk). bs=4096 with count=512 bytes is on
# purpose: busybox dd page-aligns its buffer only when bs >= the page size, and silently
# falls back to buffered I/O (4 KiB read-modify-write through the page cache) when an
# O_DIRECT write fails on an unaligned buffer.
DD_W="bs=4096 count=512 iflag=count_bytes oflag=seek_bytes,direct conv=notrunc,fsync"
writer() {
    local dev=$1 name=${1#/dev/} size hdr n k next d rec=$RUN/record
    size=$(cat "/sys/block/$name/size")            # in 512-byte sectors
    hdr=$(dd if="$dev" bs=4096 count=512 iflag=count_bytes,direct 2>/dev/null | tr -d '\000')
    n=1
    case $hdr in
        "vmreplica-demo seq="*)
            k=${hdr#vmreplica-demo seq=}
            case $k in
                ''|*[!0-9]*) ;;
                *) k=${k#"${k%%[!0]*}"}               # strip leading zeros (octal)
                   n=$(( ${k:-0} + 1 )) ;;
            esac ;;
    esac
    dd if=/dev/zero of="$rec" bs=512 count=1 2>/dev/null
    say "writer on $dev from seq=$n"
    set_now
    next=$NOW
    while :; do
        if [ -e "$RUN/stop" ]; then
            say "writer stopped at seq=$((n - 1))"
            break
        fi
        if [ -e "$RUN/freeze" ]; then
            : > "$RUN/paused"
            say "frozen at seq=$((n - 1))"
            while [ -e "$RUN/freeze" ] && [ ! -e "$RUN/stop" ]; do
                d=
                read -r d < "$RUN/freeze" 2>/dev/null
                set_now
                case $d in
                    ''|*[!0-9]*) ;;
                    *) if [ "$NOW" -ge "$d" ]; then
                           rm -f "$RUN/freeze"
                           say "freeze timed out, auto-thaw"
                       fi ;;
                esac
                nap 0.05
            done
            rm -f "$RUN/paused"
            [ -e "$RUN/stop" ] || say "thawed at seq=$((n - 1))"
            set_now
            next=$NOW
            continue                   # re-check freeze/stop before writing anything
        fi
        if [ "$n" -ge "$size" ]; then
            say "disk $dev full, writer stops at seq=$((n - 1))"
            break
        fi
        # the record: overwrite the text in place at the start of the 512-byte zero file
        # (no truncation; the text never gets shorter as n grows)
        printf 'vmreplica-demo seq=%d' "$n" 1<> "$rec"
        if dd if="$rec" of="$dev" $DD_W seek=$((n * 512)) 2>/dev/null &&
           dd if="$rec" of="$dev" $DD_W seek=0 2>/dev/null; then
            [ $((n % 10)) -eq 0 ] && say "seq=$n"
            n=$((n + 1))
        else
            say "write of seq=$n to $dev failed, retrying in 1 s"
            nap 1
        fi
        # pace to 10 records/s against the clock, without bursts after a long stall
        next=$((next + 10))
        set_now
        d=$((next - NOW))
        if [ "$d" -gt 0 ]; then
            if [ "$d" -lt 10 ]; then nap "0.0$d"; else nap "0.$d"; fi
        elif [ "$d" -lt -50 ]; then
            next=$NOW
        fi
    done
    : > "$RUN/idle"
}

# ---------------------------------------------------------------------------------------
# the guest agent
agent_reply() { printf '%s\n' "$1" >&3; }

agent_handle() {
    local l=$1 c cmd id a
    case $l in *'{'*) ;; *) return ;; esac
    l="{${l#*\{}"                        # drop 0xFF resync bytes / noise before the object
    case $l in
        *'"execute"'*) ;;
        *) agent_reply '{"error": {"class": "GenericError", "desc": "Expected '"'"'execute'"'"' in QMP input"}}'
           return ;;
    esac
    c=${l#*\"execute\"}
    c=${c#"${c%%[!:	 ]*}"}
    c=${c#\"}
    cmd=${c%%\"*}
    case $cmd in
        guest-sync|guest-sync-delimited)
            id=
            case $l in
                *'"id"'*)
                    a=${l#*\"id\"}
                    a=${a#"${a%%[!:	 ]*}"}
                    id=${a%%[!0-9-]*} ;;
            esac
            if [ -z "$id" ]; then
                agent_reply '{"error": {"class": "GenericError", "desc": "Parameter '"'"'id'"'"' is missing"}}'
            elif [ "$cmd" = guest-sync-delimited ]; then
                printf '\377{"return": %s}\n' "$id" >&3
            else
                agent_reply "{\"return\": $id}"
            fi ;;
        guest-ping)
            agent_reply '{"return": {}}' ;;
        guest-info)
            agent_reply '{"return": {"version": "vmreplica-demo-1", "supported_commands": [{"enabled": true, "name": "guest-sync", "success-response": true}, {"enabled": true, "name": "guest-sync-delimited", "success-response": true}, {"enabled": true, "name": "guest-ping", "success-response": true}, {"enabled": true, "name": "guest-info", "success-response": true}, {"enabled": true, "name": "guest-fsfreeze-freeze", "success-response": true}, {"enabled": true, "name": "guest-fsfreeze-thaw", "success-response": true}, {"enabled": true, "name": "guest-fsfreeze-status", "success-response": true}, {"enabled": true, "name": "guest-shutdown", "success-response": false}]}}' ;;
        guest-fsfreeze-freeze|guest-fsfreeze-freeze-list)
            local i=0
            set_now
            echo $((NOW + FREEZE_TIMEOUT_CS)) > "$RUN/freeze.new"
            mv -f "$RUN/freeze.new" "$RUN/freeze"      # (re)arms the 10 s auto-thaw
            while [ ! -e "$RUN/paused" ] && [ ! -e "$RUN/idle" ] && [ $i -lt 200 ]; do
                nap 0.05                              # wait for the record in flight
                i=$((i + 1))
            done
            if [ -e "$RUN/paused" ] || [ -e "$RUN/idle" ]; then
                agent_reply '{"return": 1}'
            else
                rm -f "$RUN/freeze"
                agent_reply '{"error": {"class": "GenericError", "desc": "the record writer did not pause"}}'
            fi ;;
        guest-fsfreeze-thaw)
            if [ -e "$RUN/freeze" ]; then
                rm -f "$RUN/freeze"
                agent_reply '{"return": 1}'
            else
                agent_reply '{"return": 0}'            # not frozen (or auto-thawed already)
            fi ;;
        guest-fsfreeze-status)
            if [ -e "$RUN/freeze" ]; then
                agent_reply '{"return": "frozen"}'
            else
                agent_reply '{"return": "thawed"}'
            fi ;;
        guest-shutdown)
            case $l in
                *'"reboot"'*) vmr_shutdown reboot ;;
                *) vmr_shutdown poweroff ;;
            esac ;;
        *)
            agent_reply "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command $cmd has not been found\"}}" ;;
    esac
}

agent() {
    local port=$1 line
    exec 3<> "$port"
    say "agent on $port"
    while :; do
        line=
        if IFS= read -r line <&3; then
            agent_handle "$line"
        else
            # EOF: no host side connected to the chardev (or it just disconnected). A
            # partial line is what a host that went away mid-command left: drop it.
            nap 0.2
        fi
    done
}

find_agent_port() {
    local p n
    for p in /sys/class/virtio-ports/*; do
        [ -e "$p/name" ] || continue
        read -r n < "$p/name" 2>/dev/null
        if [ "$n" = "$AGENT_PORT_NAME" ] && [ -e "/dev/${p##*/}" ]; then
            echo "/dev/${p##*/}"
            return 0
        fi
    done
    return 1
}

# ---------------------------------------------------------------------------------------
# init proper
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec < /dev/console > /dev/console 2>&1
mkdir -p /run /tmp
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p "$RUN"
open_nap

while read -r mod; do
    [ -n "$mod" ] || continue
    insmod "/lib/modules/$mod" 2>/dev/null || say "insmod $mod failed"
done < /etc/vmreplica-modules

# the disks: wait (bounded) for the first one, then until the set is stable for 0.3 s
disks=
i=0
stable=0
while [ $i -lt 200 ]; do                    # at most ~10 s
    cur=
    for b in /sys/block/vd*; do
        [ -e "$b" ] && [ -b "/dev/${b##*/}" ] && cur="$cur /dev/${b##*/}"
    done
    if [ -n "$cur" ] && [ "$cur" = "$disks" ]; then
        stable=$((stable + 1))
        [ $stable -ge 6 ] && break
    else
        stable=0
    fi
    disks=$cur
    nap 0.05
    i=$((i + 1))
done
target=
for d in $disks; do                          # the last in name order: vda < vdb < ... < vdz < vdaa
    if [ -z "$target" ] || [ ${#d} -gt ${#target} ] ||
       { [ ${#d} -eq ${#target} ] && [ "$d" \> "$target" ]; }; then
        target=$d
    fi
done
if [ -n "$target" ]; then
    writer "$target" &
else
    say "no virtio disk found, no writer"
    : > "$RUN/idle"
fi

# the agent channel (virtio_console binds its ports asynchronously: wait up to ~5 s)
port=
i=0
while [ $i -lt 100 ]; do
    port=$(find_agent_port) && break
    [ -d /sys/class/virtio-ports ] || [ $i -lt 20 ] || break   # no virtio-serial device
    nap 0.05
    i=$((i + 1))
done
if [ -n "$port" ]; then
    agent "$port" &
else
    say "no $AGENT_PORT_NAME port, no agent"
fi

# ACPI power button -> clean stop (busybox acpid runs /etc/acpi/PWRF/00000080)
if ls /dev/input/event* > /dev/null 2>&1; then
    mkdir -p /etc/acpi/PWRF
    printf '#!/bin/sh\nexec /init --vmr-shutdown poweroff\n' > /etc/acpi/PWRF/00000080
    chmod 755 /etc/acpi/PWRF/00000080
    acpid -d -c /etc/acpi -p /run/acpid.pid 2>/dev/null &     # -d: no log file, foreground
fi

# PID 1 must never exit; it also reaps orphans.
while :; do
    wait
    sleep 60
done

#!/bin/sh
# /init of the volumefs guest microVM (busybox sh, PID 1). Copied into the initramfs by build.sh.
#
# Mounts the pseudo file systems, loads the virtio/vsock/fuse modules, then runs
#   volumefs-guest agent --server vsock:2:1024
# and respawns it if it exits. PID 1 never exits (that would panic the kernel).
#
# Kernel command line flags (all optional):
#   volumefs.shell=1          drop to a shell on the console instead of starting the agent
#                             (leaving the shell powers the VM off)
#   volumefs.server=EP        agent endpoint (default vsock:2:1024)
#   volumefs.agent=0          do not start the agent
#   volumefs.smoke=1|PATH     after the agent is ready: write, list and read back a file in the
#                             first volumefs mount (or PATH), print SMOKE OK/FAIL, stop the agent
#                             (it flushes and unmounts) and power off
#   volumefs.run=PATH         after the agent is ready: run `sh PATH MOUNT` (MOUNT: the first
#                             volumefs mount) with its output on the console, print
#                             `RUN EXIT status`, stop the agent and power off (scripts/bench --vm)
#   volumefs.smoke_timeout=S  how long smoke and run wait for a mount (default 60)
#
# Power off from inside the guest with `poweroff` (SIGUSR2 to PID 1: the agent is stopped in
# order, flushing its mounts, before the power goes), or from the host with QEMU's
# `system_powerdown` (the ACPI power button; boot.sh sends it on SIGTERM). `poweroff -f` cuts
# the power at once.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=${TERM:-linux}
umask 022

mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=000 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
exec </dev/console >/dev/console 2>&1

log() { echo "init: $*"; }

# Modules, in dependency order (the list is written by build.sh; built-in ones are absent).
while read -r m; do
    [ -n "$m" ] || continue
    insmod "/lib/modules/$m.ko" || log "insmod $m failed"
done </lib/modules/load-order

hostname volumefs-guest
ip link set lo up 2>/dev/null

# Kernel command line.
SHELL_FLAG=0 AGENT=1 SMOKE= RUN= SMOKE_TIMEOUT=60 SERVER=vsock:2:1024
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        volumefs.shell=*) SHELL_FLAG=${arg#*=} ;;
        volumefs.agent=*) AGENT=${arg#*=} ;;
        volumefs.server=*) SERVER=${arg#*=} ;;
        volumefs.smoke=*) SMOKE=${arg#*=} ;;
        volumefs.run=*) RUN=${arg#*=} ;;
        volumefs.smoke_timeout=*) SMOKE_TIMEOUT=${arg#*=} ;;
    esac
done

AGENT_PID=
AGENT_LOOP_PID=
STOPPING=0

# Unmounts what a dead agent left behind, so that a new one can mount again.
clear_stale_mounts() {
    awk '$3 ~ /^fuse(\.volumefs)?$/ && $1 ~ /^volumefs:/ { print $2 }' /proc/mounts | while read -r mp; do
        umount -l "$mp" 2>/dev/null && log "detached stale mount $mp"
    done
}

# Runs the agent in the foreground of a subshell and restarts it when it exits.
agent_loop() {
    trap 'kill -TERM $child 2>/dev/null; wait $child; log "volumefs-guest stopped (status $?)"; exit 0' TERM
    while :; do
        /bin/volumefs-guest agent --server "$SERVER" &
        child=$!
        echo "$child" >/run/agent.pid
        wait $child
        rc=$?
        log "volumefs-guest exited (status $rc); restarting in 1 s"
        clear_stale_mounts
        sleep 1
    done
}

start_agent() {
    agent_loop &
    AGENT_LOOP_PID=$!
}

# Stops the agent in order: SIGTERM makes it syncfs and unmount every volume.
stop_agent() {
    [ -n "$AGENT_LOOP_PID" ] || return 0
    kill -TERM "$AGENT_LOOP_PID" 2>/dev/null
    i=0
    while kill -0 "$AGENT_LOOP_PID" 2>/dev/null && [ $i -lt 300 ]; do
        usleep 100000
        i=$((i + 1))
    done
    kill -0 "$AGENT_LOOP_PID" 2>/dev/null && log "agent did not stop in 30 s"
    AGENT_LOOP_PID=
}

do_shutdown() {
    [ "$STOPPING" = 1 ] && return
    STOPPING=1
    log "$1: stopping the agent"
    stop_agent
    sync
    log "$1"
    usleep 100000   # let the UART drain the last lines
    if [ "$1" = reboot ]; then reboot -f; else poweroff -f; fi
    while :; do sleep 1; done
}
# busybox halt/poweroff/reboot signal PID 1 with USR1/USR2/TERM.
trap 'do_shutdown poweroff' USR1 USR2
trap 'do_shutdown reboot' TERM

# Sets mp to the mount point $1 (or to the first volumefs mount when $1 is 1) once it appears;
# fails after SMOKE_TIMEOUT seconds.
wait_mount() {
    mp=
    i=0
    while [ $i -lt $((SMOKE_TIMEOUT * 10)) ]; do
        if [ "$1" = 1 ]; then
            mp=$(awk '$3 ~ /^fuse(\.volumefs)?$/ && $1 ~ /^volumefs:/ { print $2; exit }' /proc/mounts)
        elif awk -v p="$1" '$2 == p { f = 1 } END { exit !f }' /proc/mounts; then
            mp=$1
        fi
        [ -n "$mp" ] && return 0
        usleep 100000
        i=$((i + 1))
    done
    return 1
}

smoke() {
    if ! wait_mount "$SMOKE"; then
        echo "SMOKE FAIL: no volumefs mount after ${SMOKE_TIMEOUT} s"
        cat /proc/mounts
        return 1
    fi
    echo "smoke: mounted at $mp (uptime $(cut -d' ' -f1 /proc/uptime) s)"
    grep " $mp " /proc/mounts
    # No `set -e` here: PID 1 must never exit. Each step is checked by hand.
    fail() { echo "SMOKE FAIL: $*"; return 1; }
    echo "hello from the guest, $(uname -r), uptime $(cut -d' ' -f1 /proc/uptime)" >"$mp/smoke.txt" || { fail "write $mp/smoke.txt"; return 1; }
    mkdir -p "$mp/smoke.d" || { fail "mkdir $mp/smoke.d"; return 1; }
    dd if=/dev/urandom of="$mp/smoke.d/random.bin" bs=65536 count=16 2>/dev/null || { fail "dd"; return 1; }
    sum1=$(md5sum <"$mp/smoke.d/random.bin")
    sync
    echo 3 >/proc/sys/vm/drop_caches
    sum2=$(md5sum <"$mp/smoke.d/random.bin")
    ls -la "$mp" "$mp/smoke.d"
    cat "$mp/smoke.txt" || { fail "cat $mp/smoke.txt"; return 1; }
    df -k "$mp"
    if [ -z "$sum1" ] || [ "$sum1" != "$sum2" ]; then
        fail "checksum ${sum1:-none} read back as ${sum2:-none}"
        return 1
    fi
    echo "smoke: 1 MiB read back after dropping caches, md5 ${sum1%% *}"
    echo "SMOKE OK (uptime $(cut -d' ' -f1 /proc/uptime) s)"
}

# The ACPI power button (QEMU `system_powerdown`, sent by boot.sh on SIGTERM): any event on it
# means "power off in order". A 24-byte read is one struct input_event.
for ev in /sys/class/input/event*; do
    [ "$(cat "$ev/device/name" 2>/dev/null)" = "Power Button" ] || continue
    (
        trap - USR1 USR2 TERM
        if dd if="/dev/input/${ev##*/}" of=/dev/null bs=24 count=1 2>/dev/null; then
            log "power button pressed"
            kill -USR2 1
        else
            log "cannot watch the power button (/dev/input/${ev##*/})"
        fi
    ) &
done

if [ "$SHELL_FLAG" = 1 ]; then
    log "volumefs.shell=1: starting a shell (exit powers off)"
    setsid cttyhack sh -l
    do_shutdown poweroff
fi

if [ "$AGENT" != 0 ]; then
    start_agent
fi

if [ -n "$SMOKE" ] && [ "$SMOKE" != 0 ]; then
    smoke
    do_shutdown poweroff
fi

if [ -n "$RUN" ]; then
    if wait_mount 1; then
        sh "$RUN" "$mp"
        echo "RUN EXIT $?"
    else
        echo "RUN EXIT 124: no volumefs mount after ${SMOKE_TIMEOUT} s"
    fi
    do_shutdown poweroff
fi

# PID 1 idles forever; `wait` returns early when a trapped signal arrives.
while :; do
    sleep 3600 &
    wait $!
done

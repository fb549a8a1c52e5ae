#!/usr/bin/env bash
# Boots one volumefs guest microVM in the foreground (QEMU `microvm`, software CPU), with a
# vhost-user vsock device backed by vhost-device-vsock in hybrid (unix socket) mode.
#
#   vm-images/boot.sh --uds PATH [options]
#
#   --uds PATH            hybrid-vsock socket of the sandbox: a guest connecting to CID 2 port P
#                         reaches the host unix socket PATH_P; the host reaches a guest listener
#                         on port P by connecting to PATH and writing "CONNECT P\n" (required)
#   --memory SIZE         guest memory (default 256M)
#   --cpus N              virtual CPUs (default 1)
#   --kernel FILE         kernel (default: BUILD/vmlinux or BUILD/vmlinuz, per BUILD/kernel.txt)
#   --initrd FILE         initramfs (default BUILD/initramfs.gz)
#   --build DIR           image directory written by build.sh (default vm-images/build)
#   --cmdline-extra STR   appended to the kernel command line, e.g. 'volumefs.shell=1',
#                         'volumefs.smoke=1' or 'loglevel=7' (see vm-images/init.sh)
#   --console FILE        console to FILE instead of stdio
#   --qmp PATH            QMP monitor on unix socket PATH (stop/cont, quit)
#   --pidfile FILE        write QEMU's pid to FILE
#   --cid N               guest CID (default 3)
#   --accel tcg|kvm       default tcg: /dev/kvm on these machines is a PVM host on which Debian
#                         kernels fail; kvm is used only when asked for
#   -- ARGS...            extra QEMU arguments
#
# Environment: VHOST_DEVICE_VSOCK (backend binary), QEMU (qemu binary), TSC_KHZ (guest TSC kHz,
# default: the host's), QEMU_CPU (default qemu64: boots faster under TCG than `max`),
# MICROVM_OPTS (microvm machine options, default rtc=on: without the RTC the kernel loses 2 s
# probing it), BOOT_STOP_TIMEOUT, BOOT_DEBUG=1 (print the commands).
#
# Exits with QEMU's status once the VM powers off (the guest's `poweroff`, a kernel panic), or on
# SIGTERM/SIGINT/SIGHUP: the guest is first asked to power off in order through the ACPI power
# button (its agent flushes and unmounts the volumes), and QEMU is stopped if it has not within
# BOOT_STOP_TIMEOUT seconds (default 15). The backend is always stopped with QEMU.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD=$HERE/build
UDS= MEMORY=256M CPUS=1 KERNEL= INITRD= EXTRA= CONSOLE= QMP= PIDFILE= CID=3 ACCEL=tcg
QEMU_EXTRA=()

die() { echo "boot.sh: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --uds) UDS=$2; shift 2 ;;
        --memory|--mem) MEMORY=$2; shift 2 ;;
        --cpus|--smp) CPUS=$2; shift 2 ;;
        --kernel) KERNEL=$2; shift 2 ;;
        --initrd) INITRD=$2; shift 2 ;;
        --build) BUILD=$2; shift 2 ;;
        --cmdline-extra) EXTRA="$EXTRA $2"; shift 2 ;;
        --console) CONSOLE=$2; shift 2 ;;
        --qmp) QMP=$2; shift 2 ;;
        --pidfile) PIDFILE=$2; shift 2 ;;
        --cid) CID=$2; shift 2 ;;
        --accel) ACCEL=$2; shift 2 ;;
        --uds=*|--memory=*|--mem=*|--cpus=*|--smp=*|--kernel=*|--initrd=*|--build=*|--cmdline-extra=*|--console=*|--qmp=*|--pidfile=*|--cid=*|--accel=*)
            k=${1%%=*}; v=${1#*=}; shift; set -- "$k" "$v" "$@" ;;
        --) shift; QEMU_EXTRA=("$@"); break ;;
        -h|--help) usage ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[ -n "$UDS" ] || die "--uds PATH is required (see --help)"

if [ -z "$KERNEL" ]; then
    k=$(sed -n 's/^kernel=//p' "$BUILD/kernel.txt" 2>/dev/null || true)
    for f in ${k:+"$BUILD/$k"} "$BUILD/vmlinux" "$BUILD/vmlinuz"; do
        if [ -s "$f" ]; then KERNEL=$f; break; fi
    done
    [ -n "$KERNEL" ] || die "no kernel in $BUILD: run vm-images/build.sh first"
fi
INITRD=${INITRD:-$BUILD/initramfs.gz}
[ -s "$KERNEL" ] || die "kernel $KERNEL not found"
[ -s "$INITRD" ] || die "initramfs $INITRD not found: run vm-images/build.sh first"

QEMU=${QEMU:-qemu-system-x86_64}
command -v "$QEMU" >/dev/null || die "$QEMU not found: run vm-images/build.sh (it installs qemu-system-x86)"

# The vhost-user vsock backend; installed with cargo when missing.
find_backend() {
    local c
    for c in "${VHOST_DEVICE_VSOCK:-}" "$(command -v vhost-device-vsock || true)" \
             "${CARGO_HOME:-$HOME/.cargo}/bin/vhost-device-vsock"; do
        if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
    done
    return 1
}
if ! BACKEND=$(find_backend); then
    echo "boot.sh: installing vhost-device-vsock with cargo (a minute or more)" >&2
    CARGO=$(command -v cargo || echo "${CARGO_HOME:-$HOME/.cargo}/bin/cargo")
    "$CARGO" install --locked vhost-device-vsock >&2
    BACKEND=$(find_backend) || die "vhost-device-vsock is still missing after cargo install"
fi

# Guest TSC frequency: microvm under TCG sometimes hangs calibrating without it.
if [ -z "${TSC_KHZ:-}" ]; then
    mhz=$(awk -F': *' '/^cpu MHz/ { print $2; exit }' /proc/cpuinfo)
    TSC_KHZ=$(awk -v m="${mhz:-0}" 'BEGIN { printf "%d", m * 1000 }')
fi

# Memory size for the memfd backend: QEMU wants the same size as -m.
case "$MEMORY" in
    *[0-9]) MEMORY=${MEMORY}M ;;
esac

RUN=$(mktemp -d "${TMPDIR:-/tmp}/volumefs-vm.XXXXXX")
SOCK=$RUN/vhost-vsock.sock
# A monitor on a pair of FIFOs, for the orderly stop (plain shell, no socket client needed).
mkfifo "$RUN/ctl.in" "$RUN/ctl.out"
BACKEND_PID= QEMU_PID=
cleanup() {
    trap - EXIT INT TERM HUP
    if [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null; then
        kill -TERM "$QEMU_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
    fi
    if [ -n "$BACKEND_PID" ] && kill -0 "$BACKEND_PID" 2>/dev/null; then
        kill -TERM "$BACKEND_PID" 2>/dev/null || true
        for _ in $(seq 20); do kill -0 "$BACKEND_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$BACKEND_PID" 2>/dev/null || true
        wait "$BACKEND_PID" 2>/dev/null || true
    fi
    # The backend's host-side listener would make the next backend for this sandbox fail.
    [ -S "$UDS" ] && rm -f "$UDS"
    [ -n "$PIDFILE" ] && rm -f "$PIDFILE"
    rm -rf "$RUN"
}
# SIGTERM/SIGINT/SIGHUP: first ask the guest to power off in order (ACPI power button: the agent
# flushes and unmounts its volumes), then stop QEMU if it is still running after
# BOOT_STOP_TIMEOUT seconds (default 15). A second signal stops it at once.
graceful_stop() {
    trap 'cleanup; exit $1' TERM INT HUP
    if [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null && [ -p "$RUN/ctl.in" ]; then
        echo system_powerdown >"$RUN/ctl.in" 2>/dev/null || true
        local n=$(( ${BOOT_STOP_TIMEOUT:-15} * 10 ))
        while [ $n -gt 0 ] && kill -0 "$QEMU_PID" 2>/dev/null; do sleep 0.1; n=$((n - 1)); done
        kill -0 "$QEMU_PID" 2>/dev/null && echo "boot.sh: the guest did not power off in time; stopping QEMU" >&2
    fi
    cleanup
    exit "$1"
}
trap cleanup EXIT
trap 'graceful_stop 143' TERM
trap 'graceful_stop 130' INT
trap 'graceful_stop 129' HUP

# A stale listener from a previous run would make the backend fail to bind.
mkdir -p "$(dirname "$UDS")"
[ -S "$UDS" ] && rm -f "$UDS"
"$BACKEND" --guest-cid="$CID" --socket="$SOCK" --uds-path="$UDS" >"$RUN/backend.log" 2>&1 </dev/null &
BACKEND_PID=$!
for _ in $(seq 200); do
    [ -S "$SOCK" ] && break
    kill -0 "$BACKEND_PID" 2>/dev/null || { cat "$RUN/backend.log" >&2; die "vhost-device-vsock exited"; }
    sleep 0.05
done
[ -S "$SOCK" ] || { cat "$RUN/backend.log" >&2; die "vhost-device-vsock did not create $SOCK in 10 s"; }

CMDLINE="console=ttyS0 panic=-1 quiet tsc_early_khz=$TSC_KHZ$EXTRA"

ARGS=(-M "microvm,memory-backend=mem,${MICROVM_OPTS:-rtc=on}"
      -accel "$ACCEL" -cpu "${QEMU_CPU:-qemu64}" -smp "$CPUS" -m "$MEMORY"
      -object "memory-backend-memfd,id=mem,size=$MEMORY,share=on"
      -kernel "$KERNEL" -initrd "$INITRD" -append "$CMDLINE"
      -nographic -no-reboot -nodefaults -no-user-config
      -chardev "socket,id=vsock0,path=$SOCK"
      -device "vhost-user-vsock-device,chardev=vsock0"
      -chardev "pipe,id=ctl,path=$RUN/ctl" -mon "chardev=ctl,mode=readline")
if [ -n "$CONSOLE" ]; then
    ARGS+=(-serial "file:$CONSOLE" -monitor none)
else
    ARGS+=(-serial mon:stdio)
fi
[ -z "$QMP" ] || ARGS+=(-qmp "unix:$QMP,server=on,wait=off")
[ -z "$PIDFILE" ] || ARGS+=(-pidfile "$PIDFILE")
ARGS+=("${QEMU_EXTRA[@]}")

[ "${BOOT_DEBUG:-0}" = 1 ] && { echo "+ $BACKEND --guest-cid=$CID --socket=$SOCK --uds-path=$UDS" >&2; echo "+ $QEMU ${ARGS[*]}" >&2; }

# QEMU runs as a background job so that a signal to this script is handled at once; it keeps
# this script's stdin (a background job would otherwise get /dev/null).
"$QEMU" "${ARGS[@]}" <&0 &
QEMU_PID=$!
set +e
wait "$QEMU_PID"
status=$?
# `wait` returns early (>128) when a trapped signal arrives; the trap then exits.
while kill -0 "$QEMU_PID" 2>/dev/null; do wait "$QEMU_PID"; status=$?; done
QEMU_PID=
if [ $status != 0 ] && [ -s "$RUN/backend.log" ]; then
    echo "boot.sh: qemu exited with status $status; vhost-device-vsock said:" >&2
    tail -n 20 "$RUN/backend.log" >&2
fi
exit $status

#!/usr/bin/env bash
# Benchmarks a volumefs mount against the plain disk it lives on, in the same run, and prints
# each result with its ratio to the baseline. Not a test: nothing here passes or fails on speed.
#
#   scripts/bench.sh [SIZE_MIB]      (as root; default 256 MiB per data test)
#
# Uses fio (installed with apt when missing) and a release build of volumefs.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-256}
[ "$(id -u)" = 0 ] || { echo "bench.sh needs root (FUSE mounts)" >&2; exit 2; }
command -v fio >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends fio >/dev/null; }
cargo build --release --locked --bins >&2
B=$PWD/target/release

W=$(mktemp -d /var/tmp/volumefs-bench.XXXXXX)
SERVER= AGENT=
cleanup() {
    [ -n "$AGENT" ] && kill -TERM "$AGENT" 2>/dev/null && wait "$AGENT" 2>/dev/null || true
    grep -q " $W/mnt " /proc/mounts && umount -l "$W/mnt" || true
    [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT

"$B/volumefs" server --data "$W/data" --http 127.0.0.1:0 2>"$W/server.log" &
SERVER=$!
for _ in $(seq 100); do [ -s "$W/data/http-addr" ] && break; sleep 0.05; done
export VOLUMEFS_SERVER=http://$(cat "$W/data/http-addr") VOLUMEFS_TOKEN=$(cat "$W/data/api-token")
"$B/volumefs" volume create bench --cap 8GiB >/dev/null
"$B/volumefs" sandbox create bench >/dev/null
"$B/volumefs" attach bench bench --at "$W/mnt" >/dev/null
"$B/volumefs-guest" agent --server "unix:$W/data/sandboxes/bench/vsock_1024" >"$W/agent.log" 2>&1 &
AGENT=$!
for _ in $(seq 100); do grep -q " $W/mnt " /proc/mounts && break; sleep 0.05; done
mkdir -p "$W/plain"

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
fio_bw() { # dir rw bs -> MiB/s or IOPS
    local dir=$1 rw=$2 bs=$3 out
    out=$(fio --name=b --directory="$dir" --rw="$rw" --bs="$bs" --size="${SIZE}M" --ioengine=psync \
        --end_fsync=1 --numjobs=1 --output-format=terse --terse-version=3 2>/dev/null)
    case $rw in
        *write) echo "$out" | awk -F';' '{ printf "%.0f", $48/1024 }' ;;
        randread) echo "$out" | awk -F';' '{ printf "%.0f", $8 }' ;;
        *) echo "$out" | awk -F';' '{ printf "%.0f", $7/1024 }' ;;
    esac
}
files_create() { local d=$1/files; mkdir -p "$d"; local t0=$(date +%s.%N); for i in $(seq 2000); do echo "$i" > "$d/f$i"; done; echo "$(date +%s.%N) - $t0" | bc; }
files_cat() { local d=$1/files; drop; local t0=$(date +%s.%N); cat "$d"/f* >/dev/null; echo "$(date +%s.%N) - $t0" | bc; }

row() { printf '%-28s %12s %12s %8s\n' "$@"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
row test "plain disk" volumefs ratio
for t in "seq write 1M MiB/s:write:1M" "seq read 1M cold MiB/s:read:1M" "rand read 4k IOPS:randread:4k"; do
    IFS=: read -r name rw bs <<<"$t"
    [ "$rw" = write ] || { fio_bw "$W/plain" write 1M >/dev/null; fio_bw "$W/mnt" write 1M >/dev/null; }
    drop; p=$(fio_bw "$W/plain" "$rw" "$bs"); drop; v=$(fio_bw "$W/mnt" "$rw" "$bs")
    row "$name" "$p" "$v" "$(ratio "$v" "$p")"
    rm -f "$W/plain"/b.* "$W/mnt"/b.*
done
command -v bc >/dev/null || { apt-get install -y -qq bc >/dev/null; }
p=$(files_create "$W/plain"); v=$(files_create "$W/mnt"); row "create 2000 files s" "$p" "$v" "$(ratio "$v" "$p")"
p=$(files_cat "$W/plain"); v=$(files_cat "$W/mnt"); row "cat 2000 files cold s" "$p" "$v" "$(ratio "$v" "$p")"

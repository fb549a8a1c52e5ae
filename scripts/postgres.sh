#!/usr/bin/env bash
# A throwaway PostgreSQL 15 for tests and benchmarks, started as the postgres user (it refuses
# to run as root), listening on 127.0.0.1 only, in a directory of its own: the package's own
# cluster, if any, is left alone.
#
#   scripts/postgres.sh start DIR [PORT]   installs postgresql-15 if missing (root), starts a
#                                          cluster in DIR, creates database volumefs and prints
#                                          its URL, postgres://postgres@127.0.0.1:PORT/volumefs
#   scripts/postgres.sh stop DIR           stops it (fast shutdown)
#
# fsync is off: the cluster holds test data only. PORT defaults to a free one.
set -euo pipefail
cmd=${1:?usage: postgres.sh start|stop DIR [PORT]}
dir=${2:?usage: postgres.sh start|stop DIR [PORT]}
port=${3:-$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}
bin=/usr/lib/postgresql/15/bin
case "$cmd" in
start)
    if [ ! -x "$bin/initdb" ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15 >/dev/null
    fi
    mkdir -p "$dir/sock"
    chown -R postgres: "$dir"
    runuser -u postgres -- "$bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-sync >"$dir/initdb.log"
    runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir/sock -c fsync=off -c max_connections=300" start >/dev/null
    "$bin/psql" -q -h "$dir/sock" -p "$port" -U postgres -c 'CREATE DATABASE volumefs' >/dev/null
    echo "postgres://postgres@127.0.0.1:$port/volumefs"
    ;;
stop)
    runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null
    ;;
*)
    echo "usage: postgres.sh start|stop DIR [PORT]" >&2
    exit 2
    ;;
esac

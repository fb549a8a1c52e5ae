#!/usr/bin/env bash
# Runs every test tier that this machine can run, installing what the tiers need.
#
#   scripts/test.sh            all tiers (FUSE tiers need root and /dev/fuse)
#
# Tier 1: engine and protocol (cargo test --lib), no root needed.
# Tier 2: fuse-tests/, real FUSE mounts through the real server over unix sockets (root).
# Tier 2b: tiers 1 and 2 again with metadata on PostgreSQL 15 and blocks on SeaweedFS S3
#          (scripts/postgres.sh, scripts/seaweedfs.sh; root).
# Tier 3: fuse-tests/vm.rs, real microVMs (QEMU, software CPU) booting the guest image, with
#         vsock through vhost-device-vsock (root; installed here when missing).
# Tier 4: sdk/python/tests, the Python SDK against the real server (pytest; its FUSE guest and
#         microVM tests follow the same rules as tiers 2 and 3).
# Also checked: formatting (cargo fmt --check), lints (cargo clippy -D warnings), licences and
# duplicate crates (cargo deny, deny.toml), and that the guest binary builds static without any
# host-only dependency.
#
# VOLUMEFS_SKIP_VM=1 leaves out tier 3 (and its installs).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n=== %s\n' "$*"; }

if [ "$(id -u)" = 0 ] && [ -e /dev/fuse ]; then
    # Root with FUSE: a FUSE test that cannot run is a failure, not a skip.
    export VOLUMEFS_REQUIRE_FUSE=1
else
    echo "*** not root or no /dev/fuse: the FUSE tiers will be SKIPPED" >&2
fi

log "format, lints, licences and duplicate crates"
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
if ! command -v cargo-deny >/dev/null && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo-deny" ]; then
    cargo install --locked cargo-deny@0.20.2
fi
cargo deny check licenses bans

# Tools the tests drive (fuse-tests/http_api.rs, api_cli.rs, attrs.rs): curl, GNU tar, unzip,
# setfacl/getfacl (package acl), and tuspy, a stock tus client. As root they are installed when
# missing.
log "tools the tests drive: curl, GNU tar, unzip, acl, tuspy"
missing=""
for tool in curl tar unzip python3; do command -v "$tool" >/dev/null || missing="$missing $tool"; done
command -v setfacl >/dev/null || missing="$missing acl"
# pip installs tuspy and the Python SDK; minimal images ship python3 without it.
python3 -m pip --version >/dev/null 2>&1 || missing="$missing python3-pip"
if [ -n "$missing" ] && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
if ! python3 -c "import tusclient" 2>/dev/null; then
    python3 -m pip install --quiet tuspy || python3 -m pip install --quiet --break-system-packages tuspy
fi

log "build"
cargo build --locked --all-targets

log "static guest binary (no host-only dependencies)"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --locked --release \
    --bin volumefs-guest --no-default-features --features guest \
    --target x86_64-unknown-linux-gnu --target-dir target/guest
if ! ldd target/guest/x86_64-unknown-linux-gnu/release/volumefs-guest 2>&1 | grep -qE "not a dynamic executable|statically linked"; then
    echo "volumefs-guest is not static" >&2
    exit 1
fi

if [ "${VOLUMEFS_SKIP_VM:-0}" != 1 ] && [ "$(id -u)" = 0 ]; then
    log "guest image and VM tools"
    # Installs QEMU and busybox with apt, downloads the Debian kernel, builds the initramfs.
    vm-images/build.sh
    if ! command -v vhost-device-vsock >/dev/null && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/vhost-device-vsock" ]; then
        cargo install --locked vhost-device-vsock
    fi
    export VOLUMEFS_REQUIRE_VM=1
fi

log "tests"
# The FUSE suite starts a server and agents per test; two at a time suits a 2-core machine.
# The microVM tier runs after it, one VM test at a time: a software-emulated guest wants a core.
cargo test --locked -- --test-threads=2 --skip vm::
log "the engine and FUSE tiers again: metadata on PostgreSQL, file data as blocks in S3"
# One set of semantics: the engine's tests, the reference model and the whole FUSE suite
# (control plane included) run on (PostgreSQL 15, SeaweedFS S3) too, each test in a schema and
# under a bucket prefix of its own, and on (PostgreSQL, local blocks) for the engine.
if [ "$(id -u)" = 0 ]; then
    pgdir=$(mktemp -d /tmp/volumefs-pg.XXXXXX)
    s3dir=$(mktemp -d /tmp/volumefs-s3.XXXXXX)
    trap 'scripts/postgres.sh stop "$pgdir" || true; scripts/seaweedfs.sh stop "$s3dir" || true; rm -rf "$pgdir" "$s3dir"' EXIT
    export AWS_ACCESS_KEY_ID=vfs AWS_SECRET_ACCESS_KEY=vfs-secret
    VOLUMEFS_TEST_PG=$(scripts/postgres.sh start "$pgdir")
    export VOLUMEFS_TEST_PG
    VOLUMEFS_TEST_BLOCKS=file:///per-test cargo test --locked --lib engine:: -- --test-threads=2
    VOLUMEFS_TEST_BLOCKS=$(scripts/seaweedfs.sh start "$s3dir")
    export VOLUMEFS_TEST_BLOCKS
    cargo test --locked --lib engine:: -- --test-threads=2
    cargo test --locked --test fuse -- --test-threads=2 --skip vm::
    unset VOLUMEFS_TEST_PG VOLUMEFS_TEST_BLOCKS
else
    echo "*** not root: the PostgreSQL + S3 tier is SKIPPED (PostgreSQL must be started as its own user)" >&2
fi

log "microVM tier"
cargo test --locked --test fuse vm:: -- --test-threads=1

log "Python SDK (sdk/python) against the server just built"
python3 -m pip install --quiet -e 'sdk/python[test]' \
    || python3 -m pip install --quiet --break-system-packages -e 'sdk/python[test]'
# pytest exits 5 when it collected no test: for this suite that is a broken setup, not a pass.
status=0
VOLUMEFS_BIN="$PWD/target/debug/volumefs" python3 -m pytest -q -rs sdk/python/tests || status=$?
if [ "$status" = 5 ]; then
    echo "pytest collected no tests in sdk/python/tests" >&2
fi
exit "$status"

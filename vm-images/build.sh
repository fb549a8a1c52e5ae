#!/usr/bin/env bash
# Builds the volumefs guest microVM image: a Debian kernel and an initramfs holding busybox, the
# virtio/vsock/fuse modules, the static `volumefs-guest` agent and /init (vm-images/init.sh).
#
#   vm-images/build.sh [OUT]        OUT defaults to vm-images/build
#
# Outputs:
#   OUT/vmlinux        uncompressed ELF kernel, PVH-bootable (fast under TCG); when it cannot be
#                      extracted, OUT/vmlinuz only. OUT/kernel.txt names the one to boot.
#   OUT/vmlinuz        the Debian bzImage (fallback)
#   OUT/initramfs.gz   the initramfs
#   OUT/README         what is where
#
# Also installs what is missing on the host (as root): qemu-system-x86 and busybox-static with
# apt-get, vhost-device-vsock with `cargo install --locked`.
#
# Incremental: the kernel packages are downloaded once (OUT/cache; REFRESH_KERNEL=1 fetches the
# current version again); the guest binary is rebuilt only when it is older than the sources;
# the initramfs only when one of its inputs changed.
#
# Environment:
#   VOLUMEFS_GUEST_BIN=PATH   use this static volumefs-guest instead of building one
#   REFRESH_KERNEL=1          download the kernel again (the Debian version moves)
#   KERNEL_PACKAGE=NAME       kernel metapackage (default linux-image-amd64)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
OUT=${1:-$HERE/build}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
CACHE=$OUT/cache
mkdir -p "$CACHE"

KERNEL_PACKAGE=${KERNEL_PACKAGE:-linux-image-amd64}
# Load order matters: each module only needs ones listed before it (or built in).
# evdev + button: the ACPI power button, so that the host can ask for an orderly power-off
# (QEMU system_powerdown; boot.sh does it on SIGTERM) and the agent flushes its volumes first.
MODULES=(virtio_ring virtio virtio_mmio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
         vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport fuse evdev button)

log() { printf 'build.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Host tools
# ---------------------------------------------------------------------------------------------
APT_UPDATED=0
apt_install() {
    [ "$(id -u)" = 0 ] || die "missing packages ($*) and not root: install them with apt-get"
    log "installing $*"
    if [ $APT_UPDATED = 0 ] && ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
        apt-get update -qq; APT_UPDATED=1
    fi
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2; then
        [ $APT_UPDATED = 0 ] || die "apt-get install $* failed"
        apt-get update -qq; APT_UPDATED=1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
    fi
}

# Statically linked (plain or static-pie): no program interpreter to load.
is_static() {
    case "$(LC_ALL=C ldd "$1" 2>&1)" in
        *"not a dynamic executable"*|*"statically linked"*) return 0 ;;
    esac
    return 1
}

busybox_static() {
    local b
    for b in /bin/busybox /usr/bin/busybox; do
        if [ -x "$b" ] && is_static "$b"; then echo "$b"; return 0; fi
    done
    return 1
}

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
busybox_static >/dev/null || need+=(busybox-static)
command -v dpkg-deb >/dev/null || need+=(dpkg)
command -v xz >/dev/null || need+=(xz-utils)
command -v gzip >/dev/null || need+=(gzip)
[ ${#need[@]} = 0 ] || apt_install "${need[@]}"
BUSYBOX=$(busybox_static) || die "no static busybox after installing busybox-static"

# The userspace vhost-user vsock backend that boot.sh (and `volumefs sandbox run`) start.
CARGO_BIN=${CARGO_HOME:-$HOME/.cargo}/bin
if ! command -v vhost-device-vsock >/dev/null && [ ! -x "$CARGO_BIN/vhost-device-vsock" ]; then
    command -v cargo >/dev/null || PATH=$CARGO_BIN:$PATH
    log "installing vhost-device-vsock with cargo (a minute or more)"
    cargo install --locked vhost-device-vsock >&2
fi

# ---------------------------------------------------------------------------------------------
# Kernel: vmlinuz, vmlinux, modules
# ---------------------------------------------------------------------------------------------
KDIR=$CACHE/kernel
DL=$CACHE/debs
# 1. Download the kernel packages (kept in OUT/cache/debs: about 70 MB).
if [ "${REFRESH_KERNEL:-0}" = 1 ] || [ ! -e "$DL/.done" ]; then
    rm -rf "$DL"
    mkdir -p "$DL"
    (
        cd "$DL"
        # apt's sandbox user cannot write here; we are root anyway.
        dl() { apt-get download -q -o APT::Sandbox::User=root "$@" >&2; }
        if ! dl "$KERNEL_PACKAGE"; then
            [ "$(id -u)" = 0 ] || die "apt-get download $KERNEL_PACKAGE failed"
            apt-get update -qq
            dl "$KERNEL_PACKAGE"
        fi
        meta=$(ls "$KERNEL_PACKAGE"_*.deb | head -n1)
        # Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2) — the versioned image package.
        dep=$(dpkg-deb -f "$meta" Depends | tr ',|' '\n\n' | sed 's/(.*//; s/ //g' |
              grep -E '^linux-image-[0-9]+\.[0-9.]+-[0-9]+-amd64(-unsigned)?$' | head -n1)
        [ -n "$dep" ] || die "cannot find the versioned kernel package in: $(dpkg-deb -f "$meta" Depends)"
        log "kernel package $dep"
        dl "$dep"
    )
    touch "$DL/.done"
fi
# 2. Unpack vmlinuz and the modules; extract vmlinux. Again when the module list changes.
if [ ! -e "$KDIR/.done" ] || [ "$DL/.done" -nt "$KDIR/.done" ] ||
   [ "$(cat "$KDIR/module-list" 2>/dev/null)" != "${MODULES[*]}" ]; then
    rm -rf "$KDIR.new"
    mkdir -p "$KDIR.new/modules"
    deb=$(ls "$DL"/linux-image-[0-9]*.deb | head -n1)
    X=$CACHE/extract
    rm -rf "$X"; mkdir -p "$X"
    patterns=('./boot/vmlinuz-*' './lib/modules/*/modules.builtin' './lib/modules/*/modules.dep')
    for m in "${MODULES[@]}"; do patterns+=("./lib/modules/*/$m.ko*"); done
    # Module file names use '_' or '-' interchangeably: match both.
    for m in "${MODULES[@]}"; do
        alt=${m//_/-}; [ "$alt" = "$m" ] || patterns+=("./lib/modules/*/$alt.ko*")
    done
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$X" --wildcards "${patterns[@]}" 2>/dev/null || true   # absent patterns (built-in modules) are fine
    vmlinuz=$(ls "$X"/boot/vmlinuz-* | head -n1)
    [ -s "$vmlinuz" ] || die "no vmlinuz in $deb"
    kver=${vmlinuz##*/vmlinuz-}
    cp "$vmlinuz" "$KDIR.new/vmlinuz"
    echo "$kver" >"$KDIR.new/version"
    builtin=$X/lib/modules/$kver/modules.builtin

    # Modules: decompress (.xz/.zst/.gz) here, since busybox insmod may not handle them.
    : >"$KDIR.new/modules/load-order"
    for m in "${MODULES[@]}"; do
        f=$(find "$X/lib/modules/$kver" \( -name "$m.ko*" -o -name "${m//_/-}.ko*" \) | head -n1)
        if [ -z "$f" ]; then
            if grep -Eq "/(${m}|${m//_/-})\.ko$" "$builtin" 2>/dev/null; then
                log "module $m is built in"; continue
            fi
            die "module $m is neither in $deb nor built in"
        fi
        dst=$KDIR.new/modules/$m.ko
        case "$f" in
            *.ko) cp "$f" "$dst" ;;
            *.ko.xz) xz -dc "$f" >"$dst" ;;
            *.ko.zst) command -v zstd >/dev/null || apt_install zstd; zstd -qdc "$f" >"$dst" ;;
            *.ko.gz) gzip -dc "$f" >"$dst" ;;
            *) die "unknown module format: $f" ;;
        esac
        echo "$m" >>"$KDIR.new/modules/load-order"
    done
    # Check that every dependency is loaded earlier (or built in).
    loaded=" "
    while read -r m; do
        deps=$(tr '\0' '\n' <"$KDIR.new/modules/$m.ko" | sed -n 's/^depends=//p' | head -n1 | tr ',' ' ')
        for d in $deps; do
            case "$loaded" in *" $d "*) ;; *) die "module $m needs $d, which is not loaded before it" ;; esac
        done
        loaded="$loaded$m "
    done <"$KDIR.new/modules/load-order"

    # vmlinux: find the compressed payload inside the bzImage by its magic, decompress it and
    # keep it if it is an ELF with the PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY = 0x12).
    # Byte offsets at which the hex string $2 occurs in file $1.
    magic_offsets() {
        local pat
        pat=$(echo "$2" | sed 's/../\\x&/g')
        if echo | LC_ALL=C grep -qP 'x' 2>/dev/null || [ $? = 1 ]; then
            LC_ALL=C grep -obUaP "$pat" "$1" | cut -d: -f1
        elif command -v python3 >/dev/null; then
            python3 -c 'import sys
d = open(sys.argv[1], "rb").read(); m = bytes.fromhex(sys.argv[2]); i = d.find(m)
while i >= 0: print(i); i = d.find(m, i + 1)' "$1" "$2"
        fi
    }
    extract_vmlinux() {
        local img=$1 out=$2 magic tool off
        for magic in 'FD377A585A00:xz -dc --single-stream' '28B52FFD:zstd -qdc' '1F8B0800:gzip -dc' \
                     '425A68:bzip2 -dc' '02214C18:lz4 -dc' '5D000000:xz -dc --format=lzma'; do
            tool=${magic#*:}; magic=${magic%%:*}
            command -v "${tool%% *}" >/dev/null || continue
            for off in $(magic_offsets "$img" "$magic" | head -n5); do
                tail -c +$((off + 1)) "$img" | $tool >"$out" 2>/dev/null || true
                if [ "$(head -c4 "$out" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] &&
                   { ! command -v readelf >/dev/null || readelf -n "$out" 2>/dev/null | grep -q 'type: (0x00000012)'; }; then
                    log "vmlinux extracted (${tool%% *} payload at offset $off)"
                    return 0
                fi
            done
        done
        rm -f "$out"
        return 1
    }
    if extract_vmlinux "$KDIR.new/vmlinuz" "$KDIR.new/vmlinux"; then
        echo vmlinux >"$KDIR.new/kernel"
    else
        log "could not extract an ELF vmlinux; falling back to vmlinuz (slower boot under TCG)"
        echo vmlinuz >"$KDIR.new/kernel"
    fi
    echo "${MODULES[*]}" >"$KDIR.new/module-list"
    rm -rf "$KDIR" "$X"
    mv "$KDIR.new" "$KDIR"
    touch "$KDIR/.done"
    log "kernel $kver ready"
fi
KVER=$(cat "$KDIR/version")
KERNEL=$(cat "$KDIR/kernel")

# Publish the kernel(s) into OUT (hard links when possible; only when changed).
publish() { # src dst
    [ "$1" -ef "$2" ] && return 0
    if [ ! -e "$2" ] || ! cmp -s "$1" "$2"; then ln -f "$1" "$2" 2>/dev/null || cp -f "$1" "$2"; fi
}
publish "$KDIR/vmlinuz" "$OUT/vmlinuz"
if [ "$KERNEL" = vmlinux ]; then publish "$KDIR/vmlinux" "$OUT/vmlinux"; else rm -f "$OUT/vmlinux"; fi

# ---------------------------------------------------------------------------------------------
# The static guest binary
# ---------------------------------------------------------------------------------------------
if [ -n "${VOLUMEFS_GUEST_BIN:-}" ]; then
    GUEST=$VOLUMEFS_GUEST_BIN
    [ -x "$GUEST" ] || die "VOLUMEFS_GUEST_BIN=$GUEST is not an executable"
else
    GUEST=$ROOT/target/guest/x86_64-unknown-linux-gnu/release/volumefs-guest
    stale=0
    if [ ! -x "$GUEST" ]; then
        stale=1
    elif [ -n "$(find "$ROOT/src" "$ROOT/Cargo.toml" "$ROOT/Cargo.lock" -newer "$GUEST" -print -quit 2>/dev/null)" ]; then
        stale=1
    fi
    if [ $stale = 1 ]; then
        log "building the static guest binary"
        command -v cargo >/dev/null || PATH=$CARGO_BIN:$PATH
        (cd "$ROOT" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --locked --release \
            --bin volumefs-guest --no-default-features --features guest \
            --target x86_64-unknown-linux-gnu --target-dir target/guest)
    fi
fi
if ! is_static "$GUEST"; then die "$GUEST is dynamically linked; the initramfs needs a static binary"; fi

# ---------------------------------------------------------------------------------------------
# initramfs
# ---------------------------------------------------------------------------------------------
INITRD=$OUT/initramfs.gz
inputs=("$GUEST" "$HERE/init.sh" "$HERE/build.sh" "$BUSYBOX" "$KDIR/.done")
rebuild=0
[ -s "$INITRD" ] || rebuild=1
for f in "${inputs[@]}"; do [ "$f" -nt "$INITRD" ] && rebuild=1; done
if [ $rebuild = 1 ]; then
    log "building the initramfs"
    R=$OUT/rootfs
    rm -rf "$R"
    mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,root,mnt,etc,lib/modules}
    chmod 1777 "$R/tmp"
    cp "$BUSYBOX" "$R/bin/busybox"
    "$BUSYBOX" --list-full | while read -r p; do
        [ "$p" = bin/busybox ] || [ -e "$R/$p" ] || ln -s /bin/busybox "$R/$p"
    done
    cp "$KDIR"/modules/*.ko "$KDIR/modules/load-order" "$R/lib/modules/"
    cp "$GUEST" "$R/bin/volumefs-guest"
    install -m 0755 "$HERE/init.sh" "$R/init"
    # Two unprivileged users, for permission and ACL checks as someone other than root
    # (`su -s /bin/sh u1001 -c ...`; busybox's setpriv cannot change uids).
    printf '%s\n' "root:x:0:0:root:/root:/bin/sh" "u1001:x:1001:1001::/tmp:/bin/sh" "u1002:x:1002:1002::/tmp:/bin/sh" >"$R/etc/passwd"
    printf '%s\n' "root:x:0:" "u1001:x:1001:" "u1002:x:1002:" >"$R/etc/group"
    echo "volumefs-guest" >"$R/etc/hostname"
    # The kernel's built-in initramfs already has /dev/console; add it too when we may.
    [ "$(id -u)" = 0 ] && mknod -m 600 "$R/dev/console" c 5 1 2>/dev/null || true
    (cd "$R" && find . -mindepth 1 | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc -R 0:0 2>/dev/null) |
        gzip -6 >"$INITRD.tmp"
    mv "$INITRD.tmp" "$INITRD"
    rm -rf "$R"
fi

cat >"$OUT/kernel.txt" <<EOF
kernel=$KERNEL
version=$KVER
# vmlinux: the uncompressed ELF from vmlinuz, booted through its PVH entry (3-4 s faster a boot
# under TCG than vmlinuz; both were seen to boot). vmlinuz is kept as the fallback.
fallback=vmlinuz
EOF
cat >"$OUT/README" <<EOF
volumefs guest image (built by vm-images/build.sh)

kernel     $OUT/$KERNEL   (Debian $KVER; $([ "$KERNEL" = vmlinux ] && echo "uncompressed ELF, PVH boot" || echo "bzImage"))
initramfs  $INITRD
agent      /bin/volumefs-guest agent --server vsock:2:1024 (from $GUEST)
modules    $(tr '\n' ' ' <"$KDIR/modules/load-order")

boot:      vm-images/boot.sh --uds PATH [--memory 256M] [--cmdline-extra '...']
EOF
log "done"
printf '  kernel:    %s\n  initramfs: %s (%s bytes)\n' "$OUT/$KERNEL" "$INITRD" "$(stat -c %s "$INITRD")"

//! The corners of Linux that real programs use, through a real mount: sparse files and what they
//! cost, fallocate and SEEK_DATA/SEEK_HOLE, copy_file_range, atime, execute-only binaries, the
//! largest xattr value, file handles (name_to_handle_at / open_by_handle_at), listings during
//! renames, and RENAME_WHITEOUT under an overlayfs.

use crate::harness::*;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

fn blocks(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks()
}

/// Runs a Python snippet (python3 is installed by the test command) and returns its stdout.
fn python(script: &str) -> String {
    sh(&format!("python3 - <<'EOF'\n{script}\nEOF"))
}

/// A byte at 1 GiB costs a byte: `st_blocks` and the volume's usage say so, SEEK_DATA finds it,
/// and hole-aware tools (`cp --sparse=always`, `du`) keep the holes.
#[test]
fn sparse_files_cost_what_they_store_and_show_their_holes() {
    require_fuse!();
    let s = Single::with_cap(Some("64MiB"));
    let p = s.p("sparse");
    let f = OpenOptions::new().write(true).create(true).truncate(false).open(&p).unwrap();
    f.write_all_at(b"x", 1 << 30).unwrap();
    drop(f);
    assert_eq!(fs::metadata(&p).unwrap().len(), (1 << 30) + 1);
    assert!(blocks(&p) <= 8, "st_blocks of a 1-byte sparse file: {}", blocks(&p));
    assert!(s.used() < 64 * KIB, "a sparse GiB fits a 64 MiB volume: used {}", s.used());
    let out = python(&format!(
        "import os\nfd = os.open('{}', os.O_RDONLY)\nprint(os.lseek(fd, 0, os.SEEK_DATA), os.lseek(fd, 0, os.SEEK_HOLE))",
        p.display()
    ));
    assert_eq!(out.trim(), format!("{} 0", 1u64 << 30), "SEEK_DATA, SEEK_HOLE from 0");
    sh(&format!("cp --sparse=always '{}' '{}'", p.display(), s.p("copy").display()));
    assert!(blocks(&s.p("copy")) <= 8, "cp --sparse=always kept the hole: {} blocks", blocks(&s.p("copy")));
    assert_eq!(fs::read(s.p("copy")).unwrap().len() as u64, (1 << 30) + 1);
    // A file grown by truncate is all hole.
    OpenOptions::new().write(true).create(true).truncate(false).open(s.p("grown")).unwrap().set_len(32 * MIB).unwrap();
    assert_eq!(blocks(&s.p("grown")), 0);
    assert!(s.used() < 64 * KIB, "used {}", s.used());
}

/// fallocate(1): preallocation charges the cap and grows the file (or not, with --keep-size),
/// --punch-hole frees and zeroes, --zero-range zeroes; past the cap it is EDQUOT.
#[test]
fn fallocate_preallocates_punches_and_zeroes() {
    require_fuse!();
    let s = Single::with_cap(Some("16MiB"));
    let p = s.p("pre");
    let fa = |args: &str| sh(&format!("fallocate {args} '{}'", p.display()));
    fa("-l 4MiB");
    assert_eq!((fs::metadata(&p).unwrap().len(), blocks(&p)), (4 * MIB, 4 * MIB / 512));
    assert!(eventually(Duration::from_secs(3), || s.used() == 4 * MIB).is_some(), "used {}", s.used());
    fa("--keep-size -o 4MiB -l 4MiB");
    assert_eq!((fs::metadata(&p).unwrap().len(), blocks(&p)), (4 * MIB, 8 * MIB / 512), "space kept past the end");
    // Past the cap: EDQUOT, nothing changed.
    let out = std::process::Command::new("fallocate").args(["-l", "64MiB"]).arg(&p).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("quota"), "{out:?}");
    assert_eq!(fs::metadata(&p).unwrap().len(), 4 * MIB);
    // Data, then a hole punched in it: zeros there, the size stays, the space returns.
    write(&p, &[0xabu8; 64 * KIB as usize]);
    fa("--punch-hole -o 8KiB -l 16KiB");
    let data = read(&p);
    assert_eq!(data.len(), 64 * KIB as usize);
    assert!(
        data[..8192].iter().all(|b| *b == 0xab) && data[8192..24576].iter().all(|b| *b == 0) && data[24576..].iter().all(|b| *b == 0xab)
    );
    assert_eq!(blocks(&p), (64 - 16) * KIB / 512);
    let out = python(&format!(
        "import os\nfd = os.open('{}', os.O_RDONLY)\nprint(os.lseek(fd, 0, os.SEEK_HOLE), os.lseek(fd, 8192, os.SEEK_DATA))",
        p.display()
    ));
    assert_eq!(out.trim(), "8192 24576");
    // Zero a range: zeros, still stored.
    fa("--zero-range -o 0 -l 4KiB");
    let data = read(&p);
    assert!(data[..4096].iter().all(|b| *b == 0) && data[4096..8192].iter().all(|b| *b == 0xab));
    assert_eq!(blocks(&p), (64 - 16) * KIB / 512);
    // collapse-range is not supported: a clear errno, nothing changed.
    let out = std::process::Command::new("fallocate").args(["--collapse-range", "-o", "0", "-l", "4KiB"]).arg(&p).output().unwrap();
    assert!(!out.status.success(), "collapse-range: {out:?}");
    assert_eq!(read(&p).len(), 64 * KIB as usize);
}

/// copy_file_range(2) copies on the host: bytes and holes arrive, in pieces of at most 8 MiB
/// that the caller loops over.
#[test]
fn copy_file_range_copies_data_and_holes() {
    require_fuse!();
    let s = Single::with_cap(Some("256MiB"));
    let src = s.p("src");
    let body = pattern(20 * MIB as usize, 7);
    write(&src, &body);
    let f = OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(b"far", 100 * MIB).unwrap();
    drop(f);
    let out = python(&format!(
        "import os\ns = os.open('{}', os.O_RDONLY)\nd = os.open('{}', os.O_WRONLY | os.O_CREAT, 0o644)\n\
         total = 0\ncalls = 0\nwhile True:\n    n = os.copy_file_range(s, d, 1 << 30)\n    if n == 0: break\n    total += n\n    calls += 1\n\
         print(total, calls)",
        src.display(),
        s.p("dst").display()
    ));
    let (total, calls) = out.trim().split_once(' ').unwrap();
    assert_eq!(total.parse::<u64>().unwrap(), 100 * MIB + 3);
    assert!(calls.parse::<u64>().unwrap() >= 13, "at most 8 MiB per call: {out}");
    drop_cache(&s.p("dst"));
    let got = read(&s.p("dst"));
    assert_bytes_eq("copied data", &got[..body.len()], &body);
    assert!(got[body.len()..100 * MIB as usize].iter().all(|b| *b == 0));
    assert_eq!(&got[100 * MIB as usize..], b"far");
    assert!(blocks(&s.p("dst")) < 21 * MIB / 512, "the hole was not filled: {} blocks", blocks(&s.p("dst")));
}

/// relatime: reading a file whose atime is old moves it to now, once; a second read within the
/// day leaves it.
#[test]
fn atime_follows_relatime() {
    require_fuse!();
    let s = Single::new();
    let p = s.p("f");
    write(&p, b"read me");
    let old = (1_600_000_000, 0);
    set_times(&p, old, old).unwrap();
    drop_cache(&p);
    assert_eq!(fs::read(&p).unwrap(), b"read me");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let moved = eventually(Duration::from_secs(3), || fs::metadata(&p).unwrap().atime() >= now - 5);
    assert!(moved.is_some(), "atime after a read: {}", fs::metadata(&p).unwrap().atime());
    let first = fs::metadata(&p).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    drop_cache(&p);
    fs::read(&p).unwrap();
    std::thread::sleep(Duration::from_millis(1100)); // past the attribute TTL
    let second = fs::metadata(&p).unwrap();
    assert_eq!((second.atime(), second.atime_nsec()), (first.atime(), first.atime_nsec()), "relatime: once per day");
    assert_eq!(second.mtime(), old.0, "a read changes no mtime");
    // A directory's listing is a read of it too.
    fs::create_dir(s.p("d")).unwrap();
    set_times(&s.p("d"), old, old).unwrap();
    assert_eq!(list(&s.p("d")), Vec::<String>::new());
    let listed = eventually(Duration::from_secs(3), || fs::metadata(s.p("d")).unwrap().atime() >= now - 5);
    assert!(listed.is_some(), "directory atime after a listing: {}", fs::metadata(s.p("d")).unwrap().atime());
}

/// A 0711 program runs for users who may not read it (execve opens for execution, not reading).
#[test]
fn execute_only_programs_run_for_everyone() {
    require_fuse!();
    let s = Single::new();
    fs::set_permissions(&s.mnt, fs::Permissions::from_mode(0o755)).unwrap();
    let prog = s.p("prog");
    write(&prog, b"#!/bin/sh\necho ran\n");
    fs::set_permissions(&prog, fs::Permissions::from_mode(0o711)).unwrap();
    // A script needs reading by its interpreter; a binary does not. Copy a real one.
    let bin = s.p("true-bin");
    fs::copy("/bin/true", &bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o711)).unwrap();
    run_as_ok(1000, 1000, &[], &format!("'{}' && echo ok", bin.display()));
    run_as_denied(1000, 1000, &[], &format!("cat '{}'", bin.display()), "Permission denied");
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o700)).unwrap();
    run_as_denied(1000, 1000, &[], &format!("'{}'", bin.display()), "Permission denied");
}

/// Linux's largest xattr value (XATTR_SIZE_MAX, 65 536 bytes) is stored and read back.
#[test]
fn largest_xattr_value_round_trips() {
    require_fuse!();
    let s = Single::new();
    let p = s.p("x");
    write(&p, b"");
    let value = pattern(65536, 3);
    setxattr(&p, "user.big", &value, 0).unwrap();
    assert_eq!(getxattr(&p, "user.big").unwrap(), value);
    assert_errno("a value over 64 KiB", setxattr(&p, "user.bigger", &pattern(65537, 1), 0), libc::E2BIG);
}

/// name_to_handle_at / open_by_handle_at find files and directories again after the kernel's
/// caches are dropped and after a remount.
#[test]
fn file_handles_survive_cache_drops_and_remounts() {
    require_fuse!();
    let mut s = Single::new();
    fs::create_dir(s.p("dir")).unwrap();
    write(&s.p("dir/file"), b"by handle");
    let handles = s.c.path("handles");
    let script = |body: &str| {
        format!(
            "import ctypes, os, sys\n\
             libc = ctypes.CDLL(None, use_errno=True)\n\
             class FH(ctypes.Structure):\n    _fields_ = [('n', ctypes.c_uint), ('t', ctypes.c_int), ('h', ctypes.c_ubyte * 128)]\n\
             def check(r):\n    if r < 0:\n        e = ctypes.get_errno(); raise OSError(e, os.strerror(e))\n    return r\n\
             mnt = '{}'\nstore = '{}'\n{body}",
            s.mnt.display(),
            handles.display()
        )
    };
    python(&script(
        "out = []\nfor p in ['dir/file', 'dir']:\n    fh = FH(); fh.n = 128; mid = ctypes.c_int()\n    \
         check(libc.name_to_handle_at(-100, os.path.join(mnt, p).encode(), ctypes.byref(fh), ctypes.byref(mid), 0))\n    \
         out.append(bytes(fh)[:8 + fh.n].hex())\nopen(store, 'w').write(' '.join(out))",
    ));
    let reopen = script(
        "hs = open(store).read().split()\nm = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)\n\
         fh = FH.from_buffer_copy(bytes.fromhex(hs[0]).ljust(ctypes.sizeof(FH), b'\\0'))\n\
         fd = check(libc.open_by_handle_at(m, ctypes.byref(fh), os.O_RDONLY))\nprint(os.read(fd, 100).decode())\n\
         dh = FH.from_buffer_copy(bytes.fromhex(hs[1]).ljust(ctypes.sizeof(FH), b'\\0'))\n\
         dfd = check(libc.open_by_handle_at(m, ctypes.byref(dh), os.O_RDONLY | os.O_DIRECTORY))\nprint(sorted(os.listdir(dfd)))",
    );
    sh("echo 3 > /proc/sys/vm/drop_caches");
    assert_eq!(python(&reopen), "by handle\n['file']\n", "after dropping the caches");
    s.restart_agent();
    assert_eq!(python(&reopen), "by handle\n['file']\n", "after a remount");
    // A removed file's handle is stale, not another file.
    fs::remove_file(s.p("dir/file")).unwrap();
    let out = std::process::Command::new("python3").arg("-c").arg(&reopen).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("Stale file handle"), "{out:?}");
}

/// Regression: reading a directory while its files were renamed listed one of them twice
/// (15 001 names for 15 000 files). Each file is listed once, under one of its names.
#[test]
fn a_listing_during_renames_lists_each_file_once() {
    require_fuse!();
    let s = Single::new();
    let d = s.p("d");
    fs::create_dir(&d).unwrap();
    for i in 0..3000 {
        write(&d.join(format!("f{i:05}")), b"");
    }
    // Python reads the listing in kernel-sized batches; halfway through, every file is renamed.
    let out = python(&format!(
        "import os\nd = '{}'\nit = os.scandir(d)\nseen = []\nfor e in it:\n    seen.append(e.inode())\n    if len(seen) == 1000:\n        \
         for n in os.listdir(d):\n            os.rename(os.path.join(d, n), os.path.join(d, 'g' + n[1:]))\n\
         print(len(seen), len(set(seen)))",
        d.display()
    ));
    assert_eq!(out.trim(), "3000 3000", "names listed, distinct files");
}

/// overlayfs (container runtimes in a sandbox) with its upper layer on a volume: deleting a
/// lower file leaves a whiteout (RENAME_WHITEOUT / 0:0 device) and the file stays gone.
#[test]
fn rename_whiteout_and_an_overlayfs_upper_layer() {
    require_fuse!();
    let s = Single::new();
    write(&s.p("a"), b"a");
    renameat2(&s.p("a"), &s.p("b"), 4 /* RENAME_WHITEOUT */).unwrap();
    let w = fs::metadata(s.p("a")).unwrap();
    assert!(w.file_type().is_char_device() && w.rdev() == 0, "whiteout at the old name: {w:?}");
    assert_eq!(read(&s.p("b")), b"a");

    let lower = s.c.path("lower");
    let merged = s.c.path("merged");
    fs::create_dir_all(lower.join("etc")).unwrap();
    fs::write(lower.join("etc/gone"), b"lower").unwrap();
    fs::write(lower.join("etc/kept"), b"lower").unwrap();
    fs::create_dir_all(&merged).unwrap();
    fs::create_dir(s.p("upper")).unwrap();
    fs::create_dir(s.p("work")).unwrap();
    let opts = format!("lowerdir={},upperdir={},workdir={}", lower.display(), s.p("upper").display(), s.p("work").display());
    sh(&format!("mount -t overlay overlay -o '{opts}' '{}'", merged.display()));
    let result = std::panic::catch_unwind(|| {
        fs::remove_file(merged.join("etc/gone")).unwrap();
        fs::write(merged.join("etc/new"), b"upper").unwrap();
        let mut names = list(&merged.join("etc"));
        names.sort();
        assert_eq!(names, ["kept", "new"]);
        let wh = fs::metadata(s.p("upper/etc/gone")).unwrap();
        assert!(wh.file_type().is_char_device() && wh.rdev() == 0, "whiteout in the upper layer: {wh:?}");
        assert_eq!(fs::read(s.p("upper/etc/new")).unwrap(), b"upper");
    });
    sh(&format!("umount '{}'", merged.display()));
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    // Mounted again, the deletion holds.
    sh(&format!("mount -t overlay overlay -o '{opts}' '{}'", merged.display()));
    let gone = !merged.join("etc/gone").exists();
    sh(&format!("umount '{}'", merged.display()));
    assert!(gone, "the whiteout hides the lower file after a remount");
}

/// O_TMPFILE is refused with EOPNOTSUPP (fuser 0.18, the newest release, cannot receive
/// FUSE_TMPFILE; see docs/semantics.md), which is the errno programs expect from a filesystem
/// without it: Python's tempfile falls back to a named file and works.
#[test]
fn o_tmpfile_is_refused_cleanly_and_tempfile_falls_back() {
    require_fuse!();
    let s = Single::new();
    let out = python(&format!(
        "import os, errno, tempfile\ntry:\n    os.open('{m}', os.O_TMPFILE | os.O_RDWR, 0o600)\n    print('opened')\n\
         except OSError as e:\n    print(e.errno == errno.EOPNOTSUPP)\n\
         with tempfile.TemporaryFile(dir='{m}') as f:\n    f.write(b'temp'); f.seek(0); print(f.read().decode())\n\
         print(len(os.listdir('{m}')))",
        m = s.mnt.display()
    ));
    assert_eq!(out, "True\ntemp\n0\n", "EOPNOTSUPP, then a working fallback");
}

/// A guest answers "no such xattr" itself for inodes the host said have none (every `ls -l`
/// asks for `security.selinux`; what that saves is measured by scripts/bench, not here). This
/// test pins what the shortcut must not break: an xattr set or removed in another sandbox is
/// seen within the attribute TTL, because the host's push drops what the guest remembered.
#[test]
fn absent_xattrs_stay_coherent_across_sandboxes() {
    require_fuse!();
    let p = Pair::new("64MiB");
    write(&p.ma.join("f"), b"x");
    let (a, b) = (p.ma.join("f"), p.mb.join("f"));
    for _ in 0..3 {
        assert_errno("absent, asked again and again", getxattr(&a, "security.selinux"), libc::ENODATA);
    }
    assert_eq!(listxattr(&a).unwrap(), Vec::<String>::new());
    setxattr(&b, "user.k", b"from b", 0).unwrap();
    let seen = eventually(Duration::from_millis(900), || getxattr(&a, "user.k").ok().as_deref() == Some(&b"from b"[..]));
    assert!(seen.is_some(), "sandbox a sees b's xattr within the attribute TTL");
    assert_eq!(listxattr(&a).unwrap(), ["user.k"]);
    removexattr(&b, "user.k").unwrap();
    let gone =
        eventually(Duration::from_millis(900), || getxattr(&a, "user.k").err().and_then(|e| e.raw_os_error()) == Some(libc::ENODATA));
    assert!(gone.is_some(), "and its removal");
    // Its own changes, at once.
    setxattr(&a, "user.own", b"1", 0).unwrap();
    assert_eq!(getxattr(&a, "user.own").unwrap(), b"1");
}

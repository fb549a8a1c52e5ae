//! Attributes: mode, owner and nanosecond times; extended attributes; and the permission rules a
//! non-root caller meets (`default_permissions`: the kernel checks, using what the server
//! reports, so these tests prove the server stores and reports owners and modes right, and that
//! it applies the setgid-directory rule on create).
//!
//! Non-root callers run through `setpriv` (see [`run_as`]); uid 1000/1001 and gid 2000 need no
//! passwd entries.

use crate::harness::*;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", p.display()));
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("chown {uid}:{gid} {}: {e}", p.display()));
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().mode() & 0o7777
}

/// Shell-quotes a path for the scripts run through `setpriv`.
fn q(p: &Path) -> String {
    format!("'{}'", p.display())
}

/// A single mount whose root anyone may traverse.
fn open_single() -> Single {
    let s = Single::new();
    chmod(&s.mnt, 0o755);
    s
}

#[test]
fn chmod_chown_utimens_nanoseconds() {
    require_fuse!();
    let s = Single::new();
    let p = s.p("f");
    write(&p, b"attrs");
    chmod(&p, 0o640);
    assert_eq!(mode(&p), 0o640);
    chmod(&p, 0o4755);
    assert_eq!(mode(&p), 0o4755, "setuid bit set by root");
    chmod(&p, 0o644);
    chown(&p, 1234, 5678);
    let md = fs::metadata(&p).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 5678));

    let atime = (1_500_000_000, 987_654_321);
    let mtime = (1_600_000_000, 123_456_789);
    set_times(&p, atime, mtime).unwrap();
    let md = fs::metadata(&p).unwrap();
    assert_eq!((md.mtime(), md.mtime_nsec()), mtime, "mtime");
    assert_eq!((md.atime(), md.atime_nsec()), atime, "atime");

    // Directories too, and the values survive a cache drop: restart the agent, stat again.
    fs::create_dir(s.p("d")).unwrap();
    chmod(&s.p("d"), 0o711);
    chown(&s.p("d"), 42, 43);
    set_times(&s.p("d"), atime, (1_700_000_000, 1)).unwrap();
    let mut s = s;
    s.restart_agent();
    let md = fs::metadata(s.p("f")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o644);
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    assert_eq!((md.mtime(), md.mtime_nsec()), mtime, "mtime after agent restart");
    assert_eq!((md.atime(), md.atime_nsec()), atime, "atime after agent restart");
    let md = fs::metadata(s.p("d")).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o711);
    assert_eq!((md.uid(), md.gid()), (42, 43));
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_700_000_000, 1));
}

#[test]
fn mtime_and_ctime_move_on_write() {
    require_fuse!();
    let s = Single::new();
    let p = s.p("f");
    write(&p, b"1");
    set_times(&p, (1_000_000_000, 0), (1_000_000_000, 0)).unwrap();
    let before = fs::metadata(&p).unwrap();
    {
        use std::io::Write;
        fs::OpenOptions::new().append(true).open(&p).unwrap().write_all(b"2").unwrap();
    }
    let after = fs::metadata(&p).unwrap();
    assert!(after.mtime() > before.mtime(), "mtime did not move on write: {} -> {}", before.mtime(), after.mtime());
    assert!(after.ctime() >= before.ctime());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((after.mtime() - now).abs() < 60, "mtime {} is not now ({now})", after.mtime());
}

#[test]
fn xattr_set_get_list_remove() {
    require_fuse!();
    let s = Single::new();
    let p = s.p("f");
    write(&p, b"x");
    setxattr(&p, "user.test", b"value-1", 0).unwrap();
    setxattr(&p, "user.other", b"", 0).unwrap();
    assert_eq!(getxattr(&p, "user.test").unwrap(), b"value-1");
    assert_eq!(getxattr_len(&p, "user.test").unwrap(), 7);
    assert_eq!(getxattr(&p, "user.other").unwrap(), b"");
    let mut names = listxattr(&p).unwrap();
    names.sort();
    assert!(names.contains(&"user.test".to_string()), "listxattr: {names:?}");
    assert!(names.contains(&"user.other".to_string()), "listxattr: {names:?}");
    assert_errno("getxattr of a missing name", getxattr(&p, "user.missing"), libc::ENODATA);

    // Replace, and the create/replace flags.
    setxattr(&p, "user.test", b"a longer second value", 0).unwrap();
    assert_eq!(getxattr(&p, "user.test").unwrap(), b"a longer second value");
    assert_errno("XATTR_CREATE on an existing name", setxattr(&p, "user.test", b"v", libc::XATTR_CREATE), libc::EEXIST);
    assert_errno("XATTR_REPLACE on a missing name", setxattr(&p, "user.nope", b"v", libc::XATTR_REPLACE), libc::ENODATA);
    // Binary values round-trip.
    let bin: Vec<u8> = (0..=255u8).collect();
    setxattr(&p, "user.bin", &bin, 0).unwrap();
    assert_eq!(getxattr(&p, "user.bin").unwrap(), bin);

    removexattr(&p, "user.test").unwrap();
    assert_errno("getxattr after remove", getxattr(&p, "user.test"), libc::ENODATA);
    assert_errno("removexattr of a missing name", removexattr(&p, "user.test"), libc::ENODATA);
    let names = listxattr(&p).unwrap();
    assert!(!names.contains(&"user.test".to_string()), "listxattr after remove: {names:?}");
    assert!(names.contains(&"user.other".to_string()), "listxattr after remove: {names:?}");

    // On directories as well.
    fs::create_dir(s.p("d")).unwrap();
    setxattr(&s.p("d"), "user.dir", b"on a dir", 0).unwrap();
    assert_eq!(getxattr(&s.p("d"), "user.dir").unwrap(), b"on a dir");
}

#[test]
fn nonroot_cannot_write_root_file() {
    require_fuse!();
    let s = open_single();
    let p = s.p("rootfile");
    write(&p, b"root's");
    chmod(&p, 0o644);
    run_as_denied(1000, 1000, &[], &format!("echo evil > {}", q(&p)), "Permission denied");
    run_as_denied(1000, 1000, &[], &format!("echo evil >> {}", q(&p)), "Permission denied");
    assert_eq!(read(&p), b"root's");
    // Reading is allowed by 0644.
    assert_eq!(run_as_ok(1000, 1000, &[], &format!("cat {}", q(&p))), "root's");
    // A 0600 file is not even readable.
    chmod(&p, 0o600);
    run_as_denied(1000, 1000, &[], &format!("cat {}", q(&p)), "Permission denied");
    // And creating in the root-owned 0755 root is refused.
    run_as_denied(1000, 1000, &[], &format!("echo x > {}", q(&s.p("new"))), "Permission denied");
    assert_errno("stat of the refused file", fs::metadata(s.p("new")), libc::ENOENT);
}

#[test]
fn nonroot_writes_in_world_writable_dir() {
    require_fuse!();
    let s = open_single();
    let d = s.p("pub");
    fs::create_dir(&d).unwrap();
    chmod(&d, 0o777);
    let f = d.join("mine");
    run_as_ok(1000, 1000, &[], &format!("echo hello > {0} && mkdir {1}", q(&f), q(&d.join("mydir"))));
    let md = fs::metadata(&f).unwrap();
    assert_eq!((md.uid(), md.gid()), (1000, 1000), "owner of a file created by uid 1000");
    assert_eq!(md.mode() & 0o7777, 0o644);
    assert_eq!(read(&f), b"hello\n");
    let md = fs::metadata(d.join("mydir")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1000, 1000), "owner of a dir created by uid 1000");
    // The owner can chmod its own file; then another user cannot read it.
    run_as_ok(1000, 1000, &[], &format!("chmod 600 {}", q(&f)));
    assert_eq!(mode(&f), 0o600);
    run_as_denied(1001, 1001, &[], &format!("cat {}", q(&f)), "Permission denied");
}

#[test]
fn sticky_dir_protects_other_users_files() {
    require_fuse!();
    let s = open_single();
    let d = s.p("tmp");
    fs::create_dir(&d).unwrap();
    chmod(&d, 0o1777);
    assert_eq!(mode(&d), 0o1777);
    let f = d.join("owned-by-1000");
    run_as_ok(1000, 1000, &[], &format!("echo data > {}", q(&f)));
    run_as_denied(1001, 1001, &[], &format!("rm -f {}", q(&f)), "Operation not permitted");
    run_as_denied(1001, 1001, &[], &format!("mv {} {}", q(&f), q(&d.join("stolen"))), "Operation not permitted");
    assert_eq!(read(&f), b"data\n");
    // uid 1001 may still create and delete its own files there.
    run_as_ok(1001, 1001, &[], &format!("echo x > {0} && rm {0}", q(&d.join("own-1001"))));
    run_as_ok(1000, 1000, &[], &format!("rm {}", q(&f)));
    assert_errno("stat after the owner deleted it", fs::metadata(&f), libc::ENOENT);
}

#[test]
fn group_write_through_supplementary_group() {
    require_fuse!();
    let s = open_single();
    let p = s.p("shared");
    write(&p, b"v1\n");
    chown(&p, 0, 2000);
    chmod(&p, 0o664);
    run_as_ok(1000, 1000, &[2000], &format!("echo v2 >> {}", q(&p)));
    assert_eq!(read(&p), b"v1\nv2\n");
    // Without the supplementary group: denied.
    run_as_denied(1000, 1000, &[], &format!("echo v3 >> {}", q(&p)), "Permission denied");
    assert_eq!(read(&p), b"v1\nv2\n");
}

#[test]
fn setgid_dir_inherits_group() {
    require_fuse!();
    let s = open_single();
    let d = s.p("team");
    fs::create_dir(&d).unwrap();
    chown(&d, 0, 2000);
    chmod(&d, 0o2775);
    assert_eq!(mode(&d), 0o2775);
    let (f, sub) = (d.join("file"), d.join("sub"));
    run_as_ok(1000, 1000, &[2000], &format!("echo hi > {} && mkdir {}", q(&f), q(&sub)));
    let md = fs::metadata(&f).unwrap();
    assert_eq!(md.uid(), 1000);
    assert_eq!(md.gid(), 2000, "a file created in a setgid dir takes the dir's group");
    let md = fs::metadata(&sub).unwrap();
    assert_eq!(md.gid(), 2000, "a dir created in a setgid dir takes the dir's group");
    assert_eq!(md.mode() & 0o2000, 0o2000, "a dir created in a setgid dir inherits the setgid bit (mode {:o})", md.mode() & 0o7777);
}

#[test]
fn nonowner_chmod_is_eperm() {
    require_fuse!();
    let s = open_single();
    let d = s.p("pub");
    fs::create_dir(&d).unwrap();
    chmod(&d, 0o777);
    let p = d.join("f");
    write(&p, b"x");
    chmod(&p, 0o666);
    run_as_denied(1000, 1000, &[], &format!("chmod 777 {}", q(&p)), "Operation not permitted");
    run_as_denied(1000, 1000, &[], &format!("chown 1000 {}", q(&p)), "Operation not permitted");
    run_as_denied(1000, 1000, &[], &format!("touch -d @1000000000 {}", q(&p)), "Operation not permitted");
    assert_eq!(mode(&p), 0o666);
    assert_eq!(fs::metadata(&p).unwrap().uid(), 0);
}

#[test]
fn nonowner_with_write_permission_can_truncate_and_touch() {
    // POSIX: truncation (O_TRUNC, ftruncate) and setting the times to "now" (utimensat with
    // NULL) need write permission, not ownership.
    require_fuse!();
    let s = open_single();
    let d = s.p("pub");
    fs::create_dir(&d).unwrap();
    chmod(&d, 0o777);
    let p = d.join("f");
    write(&p, b"0123456789");
    chmod(&p, 0o666);
    set_times(&p, (1_000_000_000, 0), (1_000_000_000, 0)).unwrap();
    run_as_ok(1000, 1000, &[], &format!("echo appended >> {}", q(&p)));
    assert_eq!(read(&p), b"0123456789appended\n");
    run_as_ok(1000, 1000, &[], &format!("truncate -s 4 {}", q(&p)));
    assert_eq!(read(&p), b"0123");
    run_as_ok(1000, 1000, &[], &format!("touch {}", q(&p)));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let mtime = fs::metadata(&p).unwrap().mtime();
    assert!((mtime - now).abs() < 60, "mtime {mtime} after touch by a writer, now {now}");
    run_as_ok(1000, 1000, &[], &format!("echo y > {}", q(&p)));
    assert_eq!(read(&p), b"y\n");
    // Ownership and mode are untouched by all of that.
    let md = fs::metadata(&p).unwrap();
    assert_eq!((md.uid(), md.gid(), md.mode() & 0o7777), (0, 0, 0o666));
}

#[test]
fn dir_mtime_moves_on_create_and_unlink() {
    require_fuse!();
    let s = Single::new();
    let d = s.p("d");
    fs::create_dir(&d).unwrap();
    set_times(&d, (1_000_000_000, 0), (1_000_000_000, 0)).unwrap();
    write(&d.join("f"), b"x");
    let m1 = fs::metadata(&d).unwrap().mtime();
    assert!(m1 > 1_000_000_000, "dir mtime did not move when a file was created in it");
    set_times(&d, (1_000_000_000, 0), (1_000_000_000, 0)).unwrap();
    fs::remove_file(d.join("f")).unwrap();
    let m2 = fs::metadata(&d).unwrap().mtime();
    assert!(m2 > 1_000_000_000, "dir mtime did not move when a file was deleted from it");
}

/// `setfacl`/`getfacl` come from the `acl` package (scripts/test.sh installs it).
fn require_setfacl() {
    let found = std::process::Command::new("sh").arg("-c").arg("command -v setfacl && command -v getfacl").output().unwrap();
    assert!(found.status.success(), "setfacl/getfacl not found: install the `acl` package (scripts/test.sh does)");
}

/// What `getfacl` prints for `p` (numeric ids, no header).
fn getfacl(p: &Path) -> String {
    sh(&format!("getfacl -cn {}", q(p)))
}

#[test]
fn acl_named_user_group_and_mask_through_the_kernel() {
    require_fuse!();
    require_setfacl();
    let s = open_single();
    let p = s.p("f");
    write(&p, b"secret\n");
    chown(&p, 1000, 1000);
    chmod(&p, 0o600);
    run_as_denied(1001, 1001, &[], &format!("cat {}", q(&p)), "Permission denied");
    // The owner grants uid 1001 read.
    run_as_ok(1000, 1000, &[], &format!("setfacl -m u:1001:r {}", q(&p)));
    assert_eq!(run_as_ok(1001, 1001, &[], &format!("cat {}", q(&p))), "secret\n");
    run_as_denied(1001, 1001, &[], &format!("echo x >> {}", q(&p)), "Permission denied");
    run_as_denied(1002, 1002, &[], &format!("cat {}", q(&p)), "Permission denied");
    // Only the owner (or root) sets ACLs.
    run_as_denied(1001, 1001, &[], &format!("setfacl -m u:1001:rw {}", q(&p)), "Operation not permitted");
    let acl = getfacl(&p);
    for want in ["user::rw-", "user:1001:r--", "group::---", "mask::r--", "other::---"] {
        assert!(acl.lines().any(|l| l.starts_with(want)), "getfacl lacks {want}:\n{acl}");
    }
    assert_eq!(mode(&p), 0o640, "the mask shows as the group bits");
    assert!(listxattr(&p).unwrap().contains(&"system.posix_acl_access".to_string()));

    // A named group, through a supplementary group: read and write.
    sh(&format!("setfacl -m g:2000:rw {}", q(&p)));
    run_as_ok(1003, 1003, &[2000], &format!("echo more >> {}", q(&p)));
    assert_eq!(read(&p), b"secret\nmore\n");
    assert_eq!(mode(&p), 0o660);
    // chmod g-w rewrites the mask, which now limits the named group to read.
    chmod(&p, 0o640);
    let acl = getfacl(&p);
    assert!(acl.lines().any(|l| l.starts_with("mask::r--")), "chmod g-w left the mask:\n{acl}");
    assert!(acl.lines().any(|l| l.starts_with("group:2000:rw-")), "named entries stay:\n{acl}");
    run_as_denied(1003, 1003, &[2000], &format!("echo x >> {}", q(&p)), "Permission denied");
    run_as_ok(1003, 1003, &[2000], &format!("cat {}", q(&p)));
    // An empty mask shuts the named user out too.
    sh(&format!("setfacl -m m::- {}", q(&p)));
    assert_eq!(mode(&p), 0o600);
    run_as_denied(1001, 1001, &[], &format!("cat {}", q(&p)), "Permission denied");
    // Removing the ACL leaves plain mode bits.
    sh(&format!("setfacl -b {}", q(&p)));
    assert!(!listxattr(&p).unwrap().iter().any(|n| n.starts_with("system.posix_acl")), "setfacl -b left an ACL");
    run_as_denied(1003, 1003, &[2000], &format!("cat {}", q(&p)), "Permission denied");
    run_as_ok(1000, 1000, &[], &format!("cat {}", q(&p)));
}

#[test]
fn default_acl_is_inherited_instead_of_the_umask() {
    require_fuse!();
    require_setfacl();
    let s = open_single();
    let d = s.p("shared");
    fs::create_dir(&d).unwrap();
    chown(&d, 1000, 1000);
    chmod(&d, 0o750);
    run_as_ok(1000, 1000, &[], &format!("setfacl -m u:1001:rwx {0} && setfacl -d -m u:1001:rwx {0}", q(&d)));
    let def = sh(&format!("getfacl -cnd {}", q(&d)));
    assert!(def.lines().any(|l| l == "user:1001:rwx"), "default ACL:\n{def}");
    // The owner creates with a umask of 077: the default ACL replaces it.
    let (f, sub) = (d.join("new"), d.join("sub"));
    run_as_ok(1000, 1000, &[], &format!("umask 077; echo hi > {} && mkdir {}", q(&f), q(&sub)));
    assert_eq!(mode(&f), 0o660, "file: 0666 masked by the inherited ACL, not by the umask");
    assert_eq!(mode(&sub), 0o770, "directory: 0777 masked by the inherited ACL");
    let facl = getfacl(&f);
    assert!(facl.lines().any(|l| l.starts_with("user:1001:rwx")), "file ACL:\n{facl}");
    assert!(!sh(&format!("getfacl -cnd {}", q(&f))).contains("default"), "a file has no default ACL");
    let sdef = sh(&format!("getfacl -cnd {}", q(&sub)));
    assert!(sdef.lines().any(|l| l == "user:1001:rwx"), "subdirectory default ACL:\n{sdef}");
    // uid 1001 may use both, where the plain modes (0600/0700 by the umask) would refuse.
    run_as_ok(1001, 1001, &[], &format!("echo more >> {} && echo x > {}", q(&f), q(&sub.join("x"))));
    assert_eq!(read(&f), b"hi\nmore\n");
    assert_eq!(fs::metadata(sub.join("x")).unwrap().mode() & 0o777, 0o660, "inherited twice");
    run_as_denied(1002, 1002, &[], &format!("cat {}", q(&f)), "Permission denied");
    // Without a default ACL the umask applies (the host applies it: the kernel passes it on).
    let plain = s.p("plain");
    chmod(&s.mnt, 0o777);
    run_as_ok(1000, 1000, &[], &format!("umask 027; echo x > {0}f && mkdir {0}d", q(&plain)));
    assert_eq!(mode(&s.p("plainf")), 0o640);
    assert_eq!(mode(&s.p("plaind")), 0o750);
    assert!(!listxattr(&s.p("plainf")).unwrap().iter().any(|n| n.starts_with("system.")));
}

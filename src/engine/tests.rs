//! Engine semantics without FUSE: each test drives the engine the way the server does and checks
//! bytes, attributes and errnos.

use super::*;

struct Fixture {
    engine: Engine,
    vol: VolId,
    dir: std::path::PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fixture(cap: u64) -> Fixture {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "volumefs-engine-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let engine = Engine::open_dir(&dir).unwrap();
    let vol = engine.create_volume("v", cap).unwrap().id;
    Fixture { engine, vol, dir }
}

fn root() -> Caller {
    Caller::root()
}

fn user(uid: u32) -> Caller {
    Caller { uid, gid: uid, groups: vec![] }
}

fn errno<T: std::fmt::Debug>(r: FsResult<T>) -> i32 {
    r.expect_err("expected an error").errno
}

fn names(e: &Engine, vol: VolId, dir: Ino) -> Vec<String> {
    e.readdir(vol, dir, 0, 4096, false).unwrap().into_iter().map(|d| String::from_utf8(d.name).unwrap()).collect()
}

#[test]
fn write_read_sparse_truncate() {
    let f = fixture(DEFAULT_CAP);
    let (e, v) = (&f.engine, f.vol);
    let a = e.create(v, ROOT_INO, b"f", 0o644, 0o022, &root()).unwrap();
    assert_eq!(a.perm, 0o644);
    e.write(v, a.ino, 0, b"hello world", false, &root()).unwrap();
    e.write(v, a.ino, 6, b"WORLD", false, &root()).unwrap();
    assert_eq!(e.read(v, a.ino, 0, 100).unwrap(), b"hello WORLD");
    // A write past the end leaves a hole that reads as zeros.
    e.write(v, a.ino, 1 << 20, b"x", false, &root()).unwrap();
    let attr = e.getattr(v, a.ino).unwrap();
    assert_eq!(attr.size, (1 << 20) + 1);
    assert!(e.read(v, a.ino, 100, 4096).unwrap().iter().all(|b| *b == 0));
    // Append writes at the end whatever the offset.
    assert_eq!(e.write(v, a.ino, 0, b"y", true, &root()).unwrap().0, (1 << 20) + 1);
    // Shrink, then grow again: the regrown part is zeros.
    e.setattr(v, a.ino, &SetAttr { size: Some(5), ..Default::default() }, &root()).unwrap();
    e.setattr(v, a.ino, &SetAttr { size: Some(10), ..Default::default() }, &root()).unwrap();
    assert_eq!(e.read(v, a.ino, 0, 100).unwrap(), b"hello\0\0\0\0\0");
    e.release(v, a.ino).unwrap();
}

#[test]
fn quota_is_exact_and_returns_on_delete() {
    let f = fixture(10_000);
    let (e, v) = (&f.engine, f.vol);
    let a = e.create(v, ROOT_INO, b"a", 0o644, 0, &root()).unwrap();
    e.write(v, a.ino, 0, &[1u8; 6000], false, &root()).unwrap();
    assert_eq!(errno(e.write(v, a.ino, 6000, &[2u8; 4001], false, &root())), libc::EDQUOT);
    // Nothing already stored is lost, and usage did not move.
    assert_eq!(e.read(v, a.ino, 0, 10_000).unwrap(), vec![1u8; 6000]);
    assert_eq!(e.volume("v").unwrap().used, 6000);
    // Exactly filling the volume works; one more byte does not, by truncate either.
    e.write(v, a.ino, 6000, &[2u8; 4000], false, &root()).unwrap();
    assert_eq!(errno(e.setattr(v, a.ino, &SetAttr { size: Some(10_001), ..Default::default() }, &root())), libc::EDQUOT);
    assert_eq!(e.statfs(v).unwrap().bfree, 0);
    e.release(v, a.ino).unwrap();
    e.unlink(v, ROOT_INO, b"a", &root()).unwrap();
    assert_eq!(e.volume("v").unwrap().used, 0);
}

/// Regression: xattrs were not charged, so a 1 MiB volume accepted megabytes of xattr values
/// with `used` still 0. Xattrs and symlink targets count against the cap and return on delete.
#[test]
fn xattrs_and_symlink_targets_count_against_the_cap() {
    let f = fixture(10_000);
    let (e, v) = (&f.engine, f.vol);
    let a = e.create(v, ROOT_INO, b"a", 0o644, 0, &root()).unwrap();
    e.setxattr(v, a.ino, b"user.k", &[7u8; 4000], 0, &root()).unwrap();
    assert_eq!(e.volume("v").unwrap().used, 4006);
    // Replacing a value charges the difference only.
    e.setxattr(v, a.ino, b"user.k", &[7u8; 1000], 0, &root()).unwrap();
    assert_eq!(e.volume("v").unwrap().used, 1006);
    let b = e.create(v, ROOT_INO, b"b", 0o644, 0, &root()).unwrap();
    e.setxattr(v, b.ino, b"user.big", &[1u8; 8000], 0, &root()).unwrap();
    assert_eq!(errno(e.setxattr(v, a.ino, b"user.more", &[1u8; 1000], 0, &root())), libc::EDQUOT);
    assert_eq!(errno(e.symlink(v, ROOT_INO, b"l", &[b'x'; 2000], &root())), libc::EDQUOT);
    e.removexattr(v, b.ino, b"user.big", &root()).unwrap();
    assert_eq!(e.volume("v").unwrap().used, 1006);
    e.symlink(v, ROOT_INO, b"l", &[b'x'; 2000], &root()).unwrap();
    assert_eq!(e.volume("v").unwrap().used, 3006);
    e.unlink(v, ROOT_INO, b"l", &root()).unwrap();
    e.release(v, a.ino).unwrap();
    e.release(v, b.ino).unwrap();
    e.unlink(v, ROOT_INO, b"a", &root()).unwrap();
    assert_eq!(e.volume("v").unwrap().used, 0, "usage returns when the inodes go");
}

/// A volume holds at most one inode per BYTES_PER_INODE of cap (at least MIN_INODES); statfs
/// reports that as its file count.
#[test]
fn inodes_are_bounded_per_volume() {
    let f = fixture(1 << 20);
    let (e, v) = (&f.engine, f.vol);
    let max = max_inodes(1 << 20);
    assert_eq!(e.statfs(v).unwrap().files, max);
    for i in 1..max {
        e.mknod(v, ROOT_INO, format!("n{i}").as_bytes(), libc::S_IFIFO | 0o644, 0, 0, &root()).unwrap();
    }
    assert_eq!(e.statfs(v).unwrap().ffree, 0);
    assert_eq!(errno(e.mkdir(v, ROOT_INO, b"one-more", 0o755, 0, &root())), libc::ENOSPC);
    e.unlink(v, ROOT_INO, b"n1", &root()).unwrap();
    e.mkdir(v, ROOT_INO, b"one-more", 0o755, 0, &root()).unwrap();
}

#[test]
fn unlinked_open_file_lives_until_release() {
    let f = fixture(DEFAULT_CAP);
    let (e, v) = (&f.engine, f.vol);
    let a = e.create(v, ROOT_INO, b"tmp", 0o600, 0, &root()).unwrap();
    e.write(v, a.ino, 0, b"still here", false, &root()).unwrap();
    e.unlink(v, ROOT_INO, b"tmp", &root()).unwrap();
    assert_eq!(errno(e.lookup(v, ROOT_INO, b"tmp", &root())), libc::ENOENT);
    assert_eq!(e.read(v, a.ino, 0, 100).unwrap(), b"still here");
    e.write(v, a.ino, 10, b"!", false, &root()).unwrap();
    assert_eq!(e.volume("v").unwrap().used, 11);
    e.release(v, a.ino).unwrap();
    assert_eq!(errno(e.getattr(v, a.ino)), libc::ESTALE);
    assert_eq!(e.volume("v").unwrap().used, 0);
}

#[test]
fn rename_semantics() {
    let f = fixture(DEFAULT_CAP);
    let (e, v, c) = (&f.engine, f.vol, root());
    let d1 = e.mkdir(v, ROOT_INO, b"d1", 0o755, 0, &c).unwrap();
    let d2 = e.mkdir(v, ROOT_INO, b"d2", 0o755, 0, &c).unwrap();
    assert_eq!(e.getattr(v, ROOT_INO).unwrap().nlink, 4);
    let a = e.create(v, d1.ino, b"a", 0o644, 0, &c).unwrap();
    e.write(v, a.ino, 0, b"AAA", false, &c).unwrap();
    e.release(v, a.ino).unwrap();
    let b = e.create(v, d2.ino, b"b", 0o644, 0, &c).unwrap();
    e.write(v, b.ino, 0, b"BB", false, &c).unwrap();
    e.release(v, b.ino).unwrap();
    // Replace over an existing file across directories: the victim is freed.
    e.rename(v, d1.ino, b"a", d2.ino, b"b", 0, &c).unwrap();
    assert_eq!(e.lookup(v, d2.ino, b"b", &c).unwrap().ino, a.ino);
    assert_eq!(errno(e.getattr(v, b.ino)), libc::ESTALE);
    assert_eq!(e.volume("v").unwrap().used, 3);
    // NOREPLACE and EXCHANGE.
    let x = e.create(v, d1.ino, b"x", 0o644, 0, &c).unwrap();
    e.release(v, x.ino).unwrap();
    assert_eq!(errno(e.rename(v, d1.ino, b"x", d2.ino, b"b", RENAME_NOREPLACE, &c)), libc::EEXIST);
    e.rename(v, d1.ino, b"x", d2.ino, b"b", RENAME_EXCHANGE, &c).unwrap();
    assert_eq!(e.lookup(v, d2.ino, b"b", &c).unwrap().ino, x.ino);
    assert_eq!(e.lookup(v, d1.ino, b"x", &c).unwrap().ino, a.ino);
    // Directories: into itself, over a non-empty directory, over a file.
    let sub = e.mkdir(v, d1.ino, b"sub", 0o755, 0, &c).unwrap();
    assert_eq!(errno(e.rename(v, ROOT_INO, b"d1", sub.ino, b"loop", 0, &c)), libc::EINVAL);
    assert_eq!(errno(e.rename(v, ROOT_INO, b"d2", ROOT_INO, b"d1", 0, &c)), libc::ENOTEMPTY);
    assert_eq!(errno(e.rename(v, d1.ino, b"sub", d2.ino, b"b", 0, &c)), libc::ENOTDIR);
    assert_eq!(errno(e.rename(v, d2.ino, b"b", d1.ino, b"sub", 0, &c)), libc::EISDIR);
    // Moving a directory across parents fixes both link counts.
    e.rename(v, d1.ino, b"sub", d2.ino, b"sub", 0, &c).unwrap();
    assert_eq!(e.getattr(v, d1.ino).unwrap().nlink, 2);
    assert_eq!(e.getattr(v, d2.ino).unwrap().nlink, 3);
    assert_eq!(e.dir_parent(v, sub.ino).unwrap(), d2.ino);
    // Replacing an empty directory in the same parent.
    let empty = e.mkdir(v, ROOT_INO, b"empty", 0o755, 0, &c).unwrap();
    let n = e.getattr(v, ROOT_INO).unwrap().nlink;
    e.rename(v, ROOT_INO, b"d1", ROOT_INO, b"empty", 0, &c).unwrap();
    assert_eq!(e.getattr(v, ROOT_INO).unwrap().nlink, n - 1);
    assert_eq!(errno(e.getattr(v, empty.ino)), libc::ESTALE);
}

#[test]
fn links_symlinks_and_listing() {
    let f = fixture(DEFAULT_CAP);
    let (e, v, c) = (&f.engine, f.vol, root());
    let a = e.create(v, ROOT_INO, b"a", 0o644, 0, &c).unwrap();
    e.release(v, a.ino).unwrap();
    let l = e.link(v, a.ino, ROOT_INO, b"b", &c).unwrap();
    assert_eq!((l.ino, l.nlink), (a.ino, 2));
    let s = e.symlink(v, ROOT_INO, b"s", b"a", &c).unwrap();
    assert_eq!(e.readlink(v, s.ino).unwrap(), b"a");
    assert_eq!(s.size, 1);
    e.unlink(v, ROOT_INO, b"a", &c).unwrap();
    assert_eq!(e.getattr(v, a.ino).unwrap().nlink, 1);
    let mut listed = names(e, v, ROOT_INO);
    listed.sort();
    assert_eq!(listed, [".", "..", "b", "s"]);
    // Listing resumes from a cookie without repeating or skipping.
    for i in 0..50 {
        e.mknod(v, ROOT_INO, format!("n{i}").as_bytes(), libc::S_IFIFO | 0o644, 0, 0, &c).unwrap();
    }
    let mut seen = Vec::new();
    let mut cookie = 0;
    loop {
        let page = e.readdir(v, ROOT_INO, cookie, 7, true).unwrap();
        if page.is_empty() {
            break;
        }
        cookie = page.last().unwrap().cookie;
        seen.extend(page.into_iter().map(|d| d.name));
    }
    assert_eq!(seen.len(), 54);
    assert_eq!(errno(e.rmdir(v, ROOT_INO, b"b", &c)), libc::ENOTDIR);
    assert_eq!(errno(e.unlink(v, ROOT_INO, b"nope", &c)), libc::ENOENT);
    assert_eq!(errno(e.mkdir(v, ROOT_INO, b"b", 0o755, 0, &c)), libc::EEXIST);
    assert_eq!(errno(e.lookup(v, ROOT_INO, b"..", &c)), libc::EINVAL);
    assert_eq!(errno(e.lookup(v, ROOT_INO, &[b'x'; 256], &c)), libc::ENAMETOOLONG);
}

#[test]
fn permissions_for_non_root_callers() {
    let f = fixture(DEFAULT_CAP);
    let (e, v) = (&f.engine, f.vol);
    let r = root();
    let alice = Caller { uid: 1000, gid: 1000, groups: vec![2000] };
    let bob = user(1001);
    let tmp = e.mkdir(v, ROOT_INO, b"tmp", 0o1777, 0, &r).unwrap();
    // Root-owned 0644 file: others may read but not write.
    let rf = e.create(v, ROOT_INO, b"rootfile", 0o644, 0, &r).unwrap();
    e.release(v, rf.ino).unwrap();
    assert_eq!(errno(e.open(v, rf.ino, libc::O_WRONLY, &alice)), libc::EACCES);
    e.open(v, rf.ino, libc::O_RDONLY, &alice).unwrap();
    e.release(v, rf.ino).unwrap();
    // Creating in a root-owned 0755 directory is refused.
    assert_eq!(errno(e.create(v, ROOT_INO, b"x", 0o644, 0, &alice)), libc::EACCES);
    // Sticky directory: bob cannot remove alice's file, alice can.
    let af = e.create(v, tmp.ino, b"alice", 0o666, 0, &alice).unwrap();
    e.release(v, af.ino).unwrap();
    assert_eq!((af.uid, af.gid), (1000, 1000));
    assert_eq!(errno(e.unlink(v, tmp.ino, b"alice", &bob)), libc::EPERM);
    assert_eq!(errno(e.rename(v, tmp.ino, b"alice", tmp.ino, b"bob", 0, &bob)), libc::EPERM);
    // chmod by a non-owner, chown by a non-root.
    assert_eq!(errno(e.setattr(v, af.ino, &SetAttr { mode: Some(0o600), ..Default::default() }, &bob)), libc::EPERM);
    assert_eq!(errno(e.setattr(v, af.ino, &SetAttr { uid: Some(1001), ..Default::default() }, &alice)), libc::EPERM);
    // The owner may give the file to a group she is in, not to another.
    e.setattr(v, af.ino, &SetAttr { gid: Some(2000), ..Default::default() }, &alice).unwrap();
    assert_eq!(errno(e.setattr(v, af.ino, &SetAttr { gid: Some(3000), ..Default::default() }, &alice)), libc::EPERM);
    // Explicit times need the owner; "now" needs write permission.
    let t = Timespec { sec: 1_600_000_000, nsec: 123_456_789 };
    assert_eq!(errno(e.setattr(v, af.ino, &SetAttr { mtime: Some(SetTime::At(t)), ..Default::default() }, &bob)), libc::EPERM);
    let set =
        e.setattr(v, af.ino, &SetAttr { mtime: Some(SetTime::At(t)), atime: Some(SetTime::At(t)), ..Default::default() }, &alice).unwrap();
    assert_eq!((set.mtime, set.atime), (t, t));
    e.setattr(v, af.ino, &SetAttr { mtime: Some(SetTime::Now), ..Default::default() }, &bob).unwrap();
    e.unlink(v, tmp.ino, b"alice", &alice).unwrap();
    // Supplementary groups grant group permissions.
    let shared = e.mkdir(v, ROOT_INO, b"shared", 0o2775, 0, &r).unwrap();
    e.setattr(v, shared.ino, &SetAttr { gid: Some(2000), ..Default::default() }, &r).unwrap();
    let g = e.create(v, shared.ino, b"g", 0o664, 0, &alice).unwrap();
    e.release(v, g.ino).unwrap();
    assert_eq!(g.gid, 2000, "setgid directory hands down its group");
    let sub = e.mkdir(v, shared.ino, b"sub", 0o755, 0, &alice).unwrap();
    assert_eq!((sub.gid, sub.perm & libc::S_ISGID), (2000, libc::S_ISGID));
    assert_eq!(errno(e.create(v, shared.ino, b"b", 0o644, 0, &bob)), libc::EACCES);
}

#[test]
fn xattrs() {
    let f = fixture(DEFAULT_CAP);
    let (e, v, c) = (&f.engine, f.vol, root());
    let a = e.create(v, ROOT_INO, b"a", 0o644, 0, &c).unwrap();
    e.setxattr(v, a.ino, b"user.k", b"v1", 0, &c).unwrap();
    assert_eq!(errno(e.setxattr(v, a.ino, b"user.k", b"v2", XATTR_CREATE, &c)), libc::EEXIST);
    e.setxattr(v, a.ino, b"user.k", b"v2", XATTR_REPLACE, &c).unwrap();
    assert_eq!(e.getxattr(v, a.ino, b"user.k", &c).unwrap(), b"v2");
    assert_eq!(e.listxattr(v, a.ino, &c).unwrap(), b"user.k\0");
    e.removexattr(v, a.ino, b"user.k", &c).unwrap();
    assert_eq!(errno(e.getxattr(v, a.ino, b"user.k", &c)), libc::ENODATA);
    assert_eq!(errno(e.setxattr(v, a.ino, b"user.new", b"x", XATTR_REPLACE, &c)), libc::ENODATA);
    assert_eq!(errno(e.setxattr(v, a.ino, b"trusted.x", b"x", 0, &user(5))), libc::EPERM);
    e.release(v, a.ino).unwrap();
}

#[test]
fn state_survives_reopen_and_orphans_are_reclaimed() {
    let dir = std::env::temp_dir().join(format!("volumefs-engine-reopen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (ino, orphan) = {
        let e = Engine::open_dir(&dir).unwrap();
        let v = e.create_volume("keep", 1 << 20).unwrap().id;
        let a = e.create(v, ROOT_INO, b"a", 0o644, 0, &root()).unwrap();
        e.write(v, a.ino, 0, b"durable", false, &root()).unwrap();
        e.fsync(v, a.ino, false).unwrap();
        e.release(v, a.ino).unwrap();
        let o = e.create(v, ROOT_INO, b"o", 0o644, 0, &root()).unwrap();
        e.write(v, o.ino, 0, b"orphan", false, &root()).unwrap();
        e.unlink(v, ROOT_INO, b"o", &root()).unwrap();
        (a.ino, o.ino)
        // Dropped with `o` still open, as a crashed server would.
    };
    let e = Engine::open_dir(&dir).unwrap();
    let v = e.volume("keep").unwrap();
    assert_eq!(e.read(v.id, ino, 0, 100).unwrap(), b"durable");
    // The orphan outlives the restart, so that a reconnecting guest can reopen it...
    assert_eq!(v.used, 13, "the orphan still holds its bytes until reclaimed");
    e.open(v.id, orphan, libc::O_RDONLY, &root()).unwrap();
    assert_eq!(e.reclaim_orphans().unwrap(), 0, "a reopened orphan is not reclaimed");
    assert_eq!(e.read(v.id, orphan, 0, 100).unwrap(), b"orphan");
    // ...and its last release frees it.
    e.release(v.id, orphan).unwrap();
    assert_eq!(errno(e.getattr(v.id, orphan)), libc::ESTALE);
    assert_eq!(e.volume("keep").unwrap().used, 7, "the orphan's bytes were given back");
    drop(e);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn volume_names_and_sizes() {
    let f = fixture(DEFAULT_CAP);
    assert_eq!(errno(f.engine.create_volume("v", 1)), libc::EEXIST);
    assert_eq!(errno(f.engine.create_volume("../x", 1)), libc::EINVAL);
    assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
    assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
    assert_eq!(parse_size("10MB").unwrap(), 10_000_000);
    assert_eq!(parse_size("4096").unwrap(), 4096);
    assert!(parse_size("12parsecs").is_err());
    assert!(parse_size("0").is_err());
    assert!(parse_size("").is_err());
}

/// Found by the reference model: RENAME_EXCHANGE of a name with itself (or with another name
/// of the same inode) failed with EIO; Linux does nothing and succeeds. RENAME_NOREPLACE onto
/// another name of the same inode is EEXIST, as Linux checks it first.
#[test]
fn rename_exchange_with_itself_is_a_no_op() {
    let f = fixture(DEFAULT_CAP);
    let (e, v) = (&f.engine, f.vol);
    let a = e.create(v, ROOT_INO, b"a", 0o644, 0, &root()).unwrap();
    e.release(v, a.ino).unwrap();
    e.rename(v, ROOT_INO, b"a", ROOT_INO, b"a", RENAME_EXCHANGE, &root()).unwrap();
    e.link(v, a.ino, ROOT_INO, b"b", &root()).unwrap();
    e.rename(v, ROOT_INO, b"a", ROOT_INO, b"b", RENAME_EXCHANGE, &root()).unwrap();
    assert_eq!(errno(e.rename(v, ROOT_INO, b"a", ROOT_INO, b"b", RENAME_NOREPLACE, &root())), libc::EEXIST);
    e.rename(v, ROOT_INO, b"a", ROOT_INO, b"b", 0, &root()).unwrap();
    assert_eq!(names(e, v, ROOT_INO), vec![".", "..", "a", "b"], "a plain rename between two names of one inode changes nothing");
    assert_eq!(e.getattr(v, a.ino).unwrap().nlink, 2);
}

/// An orphan that nobody reopens after a restart is reclaimed when the server says the grace
/// period is over.
#[test]
fn unheld_orphans_are_reclaimed_after_a_restart() {
    let dir = std::env::temp_dir().join(format!("volumefs-engine-orphans-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let orphan = {
        let e = Engine::open_dir(&dir).unwrap();
        let v = e.create_volume("keep", 1 << 20).unwrap().id;
        let o = e.create(v, ROOT_INO, b"o", 0o644, 0, &root()).unwrap();
        e.write(v, o.ino, 0, b"orphan", false, &root()).unwrap();
        e.unlink(v, ROOT_INO, b"o", &root()).unwrap();
        o.ino
    };
    let e = Engine::open_dir(&dir).unwrap();
    let v = e.volume("keep").unwrap();
    assert_eq!(e.reclaim_orphans().unwrap(), 1);
    assert_eq!(errno(e.getattr(v.id, orphan)), libc::ESTALE);
    assert_eq!(e.volume("keep").unwrap().used, 0);
    drop(e);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The volume's changes after `*at`, each as "kind [from -> ]path node", checking that ids
/// increase; moves `*at` to the newest.
fn log_since(e: &Engine, v: VolId, at: &mut u64) -> Vec<String> {
    let page = e.changes(v, *at, changelog::MAX_CHANGES_PAGE).unwrap();
    assert!(!page.truncated);
    page.events
        .into_iter()
        .map(|c| {
            assert!(c.id > *at, "ids increase: {} after {}", c.id, *at);
            *at = c.id;
            let from = c.from.map(|f| format!("{f} -> ")).unwrap_or_default();
            format!("{} {from}{} {:?}", c.kind.name(), c.path, c.node)
        })
        .collect()
}

#[test]
fn each_mutation_logs_its_events() {
    let f = fixture(DEFAULT_CAP);
    let (e, v, c) = (&f.engine, f.vol, root());
    let mut at = 0;
    assert_eq!(e.last_change_id(v).unwrap(), 0);
    let d = e.mkdir(v, ROOT_INO, b"d", 0o755, 0, &c).unwrap();
    assert_eq!(log_since(e, v, &mut at), ["create /d Dir"]);
    assert_eq!(e.last_change_id(v).unwrap(), at);
    let a = e.create(v, d.ino, b"f", 0o644, 0, &c).unwrap();
    e.release(v, a.ino).unwrap();
    assert_eq!(log_since(e, v, &mut at), ["create /d/f File"]);
    e.write(v, a.ino, 0, b"data", false, &c).unwrap();
    assert_eq!(log_since(e, v, &mut at), ["modify /d/f File"]);
    e.mknod(v, d.ino, b"p", libc::S_IFIFO | 0o644, 0, 0, &c).unwrap();
    assert_eq!(log_since(e, v, &mut at), ["create /d/p Fifo"]);
    e.symlink(v, ROOT_INO, b"s", b"d/f", &c).unwrap();
    assert_eq!(log_since(e, v, &mut at), ["create /s Symlink"]);
    e.link(v, a.ino, ROOT_INO, b"l", &c).unwrap();
    assert_eq!(log_since(e, v, &mut at), ["create /l File"]);
    for set in [
        SetAttr { mode: Some(0o600), ..Default::default() },
        SetAttr { uid: Some(7), gid: Some(7), ..Default::default() },
        SetAttr { size: Some(1), ..Default::default() },
        SetAttr { mtime: Some(SetTime::Now), ..Default::default() },
    ] {
        e.setattr(v, a.ino, &set, &c).unwrap();
        assert_eq!(log_since(e, v, &mut at), ["modify /d/f File"], "{set:?}");
    }
    e.setattr(v, ROOT_INO, &SetAttr { mode: Some(0o777), ..Default::default() }, &c).unwrap();
    assert_eq!(log_since(e, v, &mut at), ["modify / Dir"]);
    e.setxattr(v, d.ino, b"user.k", b"v", 0, &c).unwrap();
    assert_eq!(log_since(e, v, &mut at), ["modify /d Dir"]);
    e.removexattr(v, d.ino, b"user.k", &c).unwrap();
    assert_eq!(log_since(e, v, &mut at), ["modify /d Dir"]);
    e.unlink(v, ROOT_INO, b"l", &c).unwrap();
    assert_eq!(log_since(e, v, &mut at), ["delete /l File"]);
    e.unlink(v, d.ino, b"p", &c).unwrap();
    assert_eq!(log_since(e, v, &mut at), ["delete /d/p Fifo"]);
    e.mkdir(v, d.ino, b"e", 0o755, 0, &c).unwrap();
    e.rmdir(v, d.ino, b"e", &c).unwrap();
    assert_eq!(log_since(e, v, &mut at), ["create /d/e Dir", "delete /d/e Dir"]);
    // Names that are not UTF-8 are converted lossily.
    let bad = e.create(v, d.ino, b"\xffbad", 0o644, 0, &c).unwrap();
    e.release(v, bad.ino).unwrap();
    assert_eq!(log_since(e, v, &mut at), ["create /d/\u{fffd}bad File"]);
    // Failures and requests that change nothing log nothing.
    assert_eq!(errno(e.mkdir(v, ROOT_INO, b"d", 0o755, 0, &c)), libc::EEXIST);
    assert_eq!(errno(e.unlink(v, ROOT_INO, b"nope", &c)), libc::ENOENT);
    assert_eq!(errno(e.rmdir(v, ROOT_INO, b"d", &c)), libc::ENOTEMPTY);
    assert_eq!(errno(e.setxattr(v, a.ino, b"user.x", b"v", XATTR_REPLACE, &c)), libc::ENODATA);
    assert_eq!(errno(e.create(v, d.ino, b"x", 0o644, 0, &user(5))), libc::EACCES);
    e.setattr(v, a.ino, &SetAttr::default(), &c).unwrap();
    e.getattr(v, a.ino).unwrap();
    e.readdir(v, d.ino, 0, 100, true).unwrap();
    e.read(v, a.ino, 0, 10).unwrap();
    assert_eq!(log_since(e, v, &mut at), Vec::<String>::new());
}

#[test]
fn renames_log_old_and_new_paths() {
    let f = fixture(DEFAULT_CAP);
    let (e, v, c) = (&f.engine, f.vol, root());
    let a = e.mkdir(v, ROOT_INO, b"a", 0o755, 0, &c).unwrap();
    let b = e.mkdir(v, ROOT_INO, b"b", 0o755, 0, &c).unwrap();
    for (dir, name) in [(a.ino, b"x"), (b.ino, b"y"), (a.ino, b"z")] {
        let x = e.create(v, dir, name, 0o644, 0, &c).unwrap();
        e.release(v, x.ino).unwrap();
    }
    let mut at = e.last_change_id(v).unwrap();
    e.rename(v, a.ino, b"x", b.ino, b"x", 0, &c).unwrap();
    assert_eq!(log_since(e, v, &mut at), ["move /a/x -> /b/x File"]);
    // Replacing a name logs its deletion first.
    e.rename(v, b.ino, b"x", b.ino, b"y", 0, &c).unwrap();
    assert_eq!(log_since(e, v, &mut at), ["delete /b/y File", "move /b/x -> /b/y File"]);
    assert_eq!(errno(e.rename(v, a.ino, b"z", b.ino, b"y", RENAME_NOREPLACE, &c)), libc::EEXIST);
    assert_eq!(log_since(e, v, &mut at), Vec::<String>::new());
    // An exchange is two moves, with consecutive ids.
    e.rename(v, a.ino, b"z", b.ino, b"y", RENAME_EXCHANGE, &c).unwrap();
    let before = at;
    assert_eq!(log_since(e, v, &mut at), ["move /a/z -> /b/y File", "move /b/y -> /a/z File"]);
    assert_eq!(at, before + 2);
    // Renames that change nothing log nothing.
    e.rename(v, a.ino, b"z", a.ino, b"z", RENAME_EXCHANGE, &c).unwrap();
    let z = e.lookup(v, a.ino, b"z", &c).unwrap();
    e.link(v, z.ino, a.ino, b"z2", &c).unwrap();
    log_since(e, v, &mut at);
    e.rename(v, a.ino, b"z", a.ino, b"z2", 0, &c).unwrap();
    assert_eq!(log_since(e, v, &mut at), Vec::<String>::new());
    // A directory moves with its contents; what was logged before keeps the paths of then.
    e.rename(v, ROOT_INO, b"a", ROOT_INO, b"c", 0, &c).unwrap();
    e.mkdir(v, a.ino, b"sub", 0o755, 0, &c).unwrap();
    assert_eq!(log_since(e, v, &mut at), ["move /a -> /c Dir", "create /c/sub Dir"]);
    let all = log_since(e, v, &mut 0);
    assert!(all.contains(&"create /a/x File".to_string()), "{all:?}");
    // An empty directory replaced by another.
    e.mkdir(v, ROOT_INO, b"e", 0o755, 0, &c).unwrap();
    log_since(e, v, &mut at);
    e.rename(v, a.ino, b"sub", ROOT_INO, b"e", 0, &c).unwrap();
    assert_eq!(log_since(e, v, &mut at), ["delete /e Dir", "move /c/sub -> /e Dir"]);
}

/// A file written in many chunks occupies one row, yet a watcher that has read that row hears
/// of the next write.
#[test]
fn writes_coalesce_but_watchers_hear_each() {
    let f = fixture(DEFAULT_CAP);
    let (e, v, c) = (&f.engine, f.vol, root());
    let a = e.create(v, ROOT_INO, b"a", 0o644, 0, &c).unwrap();
    let b = e.create(v, ROOT_INO, b"b", 0o644, 0, &c).unwrap();
    let at = e.last_change_id(v).unwrap();
    for i in 0..100u64 {
        e.write(v, a.ino, i * 10, b"0123456789", false, &c).unwrap();
    }
    e.setattr(v, a.ino, &SetAttr { size: Some(500), ..Default::default() }, &c).unwrap();
    // Nobody has read the row yet: the run is folded into it without writing anything.
    let head = e.tx(|t| t.last_change(v)).unwrap().unwrap();
    e.write(v, a.ino, 0, b"0", false, &c).unwrap();
    assert_eq!(e.tx(|t| t.last_change(v)).unwrap().unwrap(), head);
    // A caller resuming from that row's id has it: the next write must get a newer one.
    assert_eq!(e.changes(v, head.id, 10).unwrap().events, vec![]);
    e.write(v, a.ino, 0, b"1", false, &c).unwrap();
    assert_eq!(log_since(e, v, &mut { head.id }), ["modify /a File"]);
    let mut seen = at;
    assert_eq!(log_since(e, v, &mut seen), ["modify /a File"]);
    // The watcher has seen that row: the next write gets a newer one, and the old one goes.
    e.write(v, a.ino, 0, b"x", false, &c).unwrap();
    assert_eq!(log_since(e, v, &mut seen), ["modify /a File"]);
    assert_eq!(log_since(e, v, &mut { at }), ["modify /a File"], "one row for the whole run");
    // Interleaved writers get a row per switch.
    for ino in [b.ino, a.ino, b.ino] {
        e.write(v, ino, 0, b"y", false, &c).unwrap();
    }
    assert_eq!(log_since(e, v, &mut seen), ["modify /b File", "modify /a File", "modify /b File"]);
    // A hard-linked file is reported under its oldest name.
    e.link(v, b.ino, ROOT_INO, b"b2", &c).unwrap();
    e.write(v, b.ino, 0, b"z", false, &c).unwrap();
    e.unlink(v, ROOT_INO, b"b", &c).unwrap();
    e.write(v, b.ino, 0, b"z", false, &c).unwrap();
    assert_eq!(log_since(e, v, &mut seen), ["create /b2 File", "modify /b File", "delete /b File", "modify /b2 File"]);
    // A file with no name left is visible to nobody: its writes are not logged.
    e.unlink(v, ROOT_INO, b"a", &c).unwrap();
    log_since(e, v, &mut seen);
    e.write(v, a.ino, 0, b"z", false, &c).unwrap();
    e.setxattr(v, a.ino, b"user.k", b"v", 0, &c).unwrap();
    assert_eq!(log_since(e, v, &mut seen), Vec::<String>::new());
    e.release(v, a.ino).unwrap();
    e.release(v, b.ino).unwrap();
    assert_eq!(e.last_change_id(v).unwrap(), seen);
}

#[test]
fn change_pages_resume_after_an_id() {
    let f = fixture(DEFAULT_CAP);
    let (e, v, c) = (&f.engine, f.vol, root());
    // Another volume's changes interleave: ids of one volume have gaps.
    let other = e.create_volume("other", 1 << 20).unwrap().id;
    for i in 0..25 {
        e.mkdir(v, ROOT_INO, format!("d{i}").as_bytes(), 0o755, 0, &c).unwrap();
        e.mkdir(other, ROOT_INO, format!("o{i}").as_bytes(), 0o755, 0, &c).unwrap();
    }
    let all = e.changes(v, 0, 1000).unwrap().events;
    assert_eq!(all.len(), 25);
    let (mut after, mut paged) = (0, Vec::new());
    loop {
        let page = e.changes(v, after, 7).unwrap();
        assert!(page.events.len() <= 7 && !page.truncated);
        let Some(last) = page.events.last() else { break };
        after = last.id;
        paged.extend(page.events);
    }
    assert_eq!(paged, all);
    assert!(paged.iter().enumerate().all(|(i, c)| c.path == format!("/d{i}") && c.kind == meta::ChangeKind::Create));
    assert_eq!(e.changes(v, 0, 0).unwrap().events.len(), 1, "a limit of 0 means 1");
    assert_eq!(e.changes(v, after, 10).unwrap().events, vec![]);
    assert_eq!(e.last_change_id(v).unwrap(), after);
    assert_eq!(errno(e.changes(99, 0, 10)), libc::ENOENT);
}

/// Ids are never reused: not after a restart, not after the newest rows went with their volume.
#[test]
fn change_ids_keep_increasing_across_restarts_and_deletions() {
    let dir = std::env::temp_dir().join(format!("volumefs-engine-changelog-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (v, last, f, written) = {
        let e = Engine::open_dir(&dir).unwrap();
        let v = e.create_volume("keep", 1 << 20).unwrap().id;
        e.mkdir(v, ROOT_INO, b"d", 0o755, 0, &root()).unwrap();
        let f = e.create(v, ROOT_INO, b"f", 0o644, 0, &root()).unwrap().ino;
        e.write(v, f, 0, b"x", false, &root()).unwrap();
        let written = e.tx(|t| t.last_change(v)).unwrap().unwrap().id;
        let gone = e.create_volume("gone", 1 << 20).unwrap().id;
        e.mkdir(gone, ROOT_INO, b"d", 0o755, 0, &root()).unwrap();
        let last = e.last_change_id(gone).unwrap();
        e.delete_volume(gone).unwrap();
        assert_eq!(errno(e.changes(gone, 0, 10)), libc::ENOENT);
        assert_eq!(e.tx(|t| t.list_changes(gone, 0, 10)).unwrap(), vec![], "the log went with its volume");
        (v, last, f, written)
        // Dropped without any shutdown, as a crashed server would be.
    };
    let e = Engine::open_dir(&dir).unwrap();
    // A reader may have seen the last row before the restart: a write gets a new one.
    e.write(v, f, 0, b"y", false, &root()).unwrap();
    assert!(e.tx(|t| t.last_change(v)).unwrap().unwrap().id > written);
    assert_eq!(
        e.changes(v, 0, 10).unwrap().events.iter().map(|c| format!("{} {}", c.kind.name(), c.path)).collect::<Vec<_>>(),
        ["create /d", "create /f", "modify /f"]
    );
    e.mkdir(v, ROOT_INO, b"after", 0o755, 0, &root()).unwrap();
    let id = e.last_change_id(v).unwrap();
    assert!(id > last, "id {id} after a restart, {last} before");
    drop(e);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_log_is_bounded_and_says_when_events_were_missed() {
    let dir = std::env::temp_dir().join(format!("volumefs-engine-retention-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let open = |keep| Engine::open_dir(&dir).unwrap().with_change_retention(ChangeRetention { keep, prune_every: 5 });
    let e = open(10);
    let v = e.create_volume("v", 1 << 20).unwrap().id;
    let quiet = e.create_volume("quiet", 1 << 20).unwrap().id;
    e.mkdir(quiet, ROOT_INO, b"q", 0o755, 0, &root()).unwrap();
    assert!(!e.changes(v, 0, 10).unwrap().truncated);
    for i in 0..100 {
        e.mkdir(v, ROOT_INO, format!("d{i}").as_bytes(), 0o755, 0, &root()).unwrap();
        let n = e.changes(v, 0, 1000).unwrap().events.len();
        assert!(n <= 10 + 5, "{n} rows after {} changes", i + 1);
    }
    let page = e.changes(v, 0, 1000).unwrap();
    assert!(page.truncated, "changes from the start are gone");
    assert_eq!(page.events.last().unwrap().path, "/d99");
    // Resuming just before the oldest row kept misses nothing; one earlier misses something.
    let oldest = page.events[0].id;
    assert!(!e.changes(v, oldest - 1, 1000).unwrap().truncated);
    assert!(e.changes(v, oldest - 2, 1000).unwrap().truncated);
    assert!(!e.changes(v, e.last_change_id(v).unwrap(), 1000).unwrap().truncated);
    // Other volumes keep theirs.
    let q = e.changes(quiet, 0, 10).unwrap();
    assert!(!q.truncated && q.events.len() == 1);
    // The first change after a restart prunes to the (new) bound.
    drop(e);
    let e = open(3);
    e.mkdir(v, ROOT_INO, b"x", 0o755, 0, &root()).unwrap();
    assert_eq!(e.changes(v, 0, 1000).unwrap().events.len(), 3);
    drop(e);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_notifier_wakes_a_waiting_thread() {
    let f = fixture(DEFAULT_CAP);
    let (e, v, c) = (&f.engine, f.vol, root());
    let n = e.change_notifier();
    let g = n.generation();
    assert_eq!(n.wait_newer_than(g, std::time::Duration::from_millis(20)), g, "nothing happened: a timeout");
    // Reads and failures do not wake anyone.
    e.getattr(v, ROOT_INO).unwrap();
    assert_eq!(errno(e.unlink(v, ROOT_INO, b"nope", &c)), libc::ENOENT);
    assert_eq!(n.generation(), g);
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let t = std::time::Instant::now();
            (n.clone().wait_newer_than(g, std::time::Duration::from_secs(30)), t.elapsed())
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        e.mkdir(v, ROOT_INO, b"d", 0o755, 0, &c).unwrap();
        let (got, waited) = waiter.join().unwrap();
        assert!(got > g);
        assert!(waited < std::time::Duration::from_secs(10), "woken by the change, not the timeout: {waited:?}");
    });
    // A waiter that read the generation before the change does not sleep through it.
    let g = n.generation();
    e.mkdir(v, ROOT_INO, b"e", 0o755, 0, &c).unwrap();
    assert!(n.wait_newer_than(g, std::time::Duration::from_secs(30)) > g);
}

/// A data directory made before the change log existed opens, keeps its data and logs from
/// then on.
#[test]
fn a_data_directory_from_before_the_change_log_opens() {
    let dir = std::env::temp_dir().join(format!("volumefs-engine-oldschema-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (v, ino) = {
        let e = Engine::open_dir(&dir).unwrap();
        let v = e.create_volume("old", 1 << 20).unwrap().id;
        let a = e.create(v, ROOT_INO, b"a", 0o644, 0, &root()).unwrap();
        e.write(v, a.ino, 0, b"old", false, &root()).unwrap();
        (v, a.ino)
    };
    let db = rusqlite::Connection::open(dir.join("meta.db")).unwrap();
    db.execute_batch("DROP TABLE changes; DROP TABLE changes_pruned; DELETE FROM sqlite_sequence WHERE name = 'changes';").unwrap();
    drop(db);
    let e = Engine::open_dir(&dir).unwrap();
    assert_eq!(e.read(v, ino, 0, 10).unwrap(), b"old");
    assert_eq!(e.last_change_id(v).unwrap(), 0);
    e.write(v, ino, 3, b"!", false, &root()).unwrap();
    assert_eq!(log_since(&e, v, &mut 0), ["modify /a File"]);
    drop(e);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// CPU time of the calling thread: less disturbed than wall time by other work on the machine.
fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Not a check: what the metadata path costs per operation, to compare before and after a change
/// (times are printed, never asserted): wall time, and CPU time of the thread in brackets. Run
/// with `cargo test -j 1 --lib engine::tests::bench_create_write_unlink -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_create_write_unlink() {
    const N: usize = 5000;
    let f = fixture(DEFAULT_CAP);
    let (e, v, c) = (&f.engine, f.vol, root());
    let a = e.mkdir(v, ROOT_INO, b"bench", 0o755, 0, &c).unwrap();
    let d = e.mkdir(v, a.ino, b"sub", 0o755, 0, &c).unwrap();
    let block = [7u8; 4096];
    let big = e.create(v, d.ino, b"big", 0o644, 0, &c).unwrap();
    let mut report = Vec::new();
    let mut phase = |what: &str, op: &mut dyn FnMut(usize)| {
        let (wall, cpu) = (std::time::Instant::now(), thread_cpu());
        (0..N).for_each(&mut *op);
        let per_op = |t: std::time::Duration| t.as_secs_f64() * 1e6 / N as f64;
        report.push(format!("{what}: {:.1} µs [{:.1}]", per_op(wall.elapsed()), per_op(thread_cpu() - cpu)));
    };
    phase("create+release", &mut |i| {
        let x = e.create(v, d.ino, format!("f{i}").as_bytes(), 0o644, 0, &c).unwrap();
        e.release(v, x.ino).unwrap();
    });
    phase("write 4 KiB to a new file", &mut |i| {
        let x = e.lookup(v, d.ino, format!("f{i}").as_bytes(), &c).unwrap();
        e.write(v, x.ino, 0, &block, false, &c).unwrap();
    });
    phase("4 KiB chunk of one file", &mut |i| {
        e.write(v, big.ino, (i * block.len()) as u64, &block, false, &c).unwrap();
    });
    phase("rename", &mut |i| {
        e.rename(v, d.ino, format!("f{i}").as_bytes(), d.ino, format!("g{i}").as_bytes(), 0, &c).unwrap();
    });
    phase("unlink", &mut |i| e.unlink(v, d.ino, format!("g{i}").as_bytes(), &c).unwrap());
    e.release(v, big.ino).unwrap();
    eprintln!("{N} × each, per op: {}", report.join("; "));
}

/// Not a check: what pruning a full change log costs (the scan for the cut-off id walks `keep`
/// index entries). Run with
/// `cargo test -j 1 --lib engine::tests::bench_change_log_prune -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_change_log_prune() {
    let f = fixture(DEFAULT_CAP);
    let (e, v) = (&f.engine, f.vol);
    let keep = ChangeRetention::default().keep;
    let every = ChangeRetention::default().prune_every;
    let row = |i: u64| meta::ChangeRow {
        id: 0,
        kind: meta::ChangeKind::Modify,
        node: Kind::File,
        ino: i,
        path: format!("/some/dir/file{i}").into_bytes(),
        from: None,
        time: Timespec::now(),
    };
    e.tx(|t| (0..keep + every).try_for_each(|i| t.insert_change(v, &row(i)).map(drop))).unwrap();
    let t = std::time::Instant::now();
    let n = e.tx(|t| t.prune_changes(v, keep)).unwrap();
    let full = t.elapsed();
    let t = std::time::Instant::now();
    assert_eq!(e.tx(|t| t.prune_changes(v, keep)).unwrap(), 0);
    let nothing = t.elapsed();
    eprintln!("pruning {n} of {} rows: {full:?}; finding nothing to prune in {keep} rows: {nothing:?}", keep + every);
}

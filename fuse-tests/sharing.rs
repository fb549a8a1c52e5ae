//! One volume, several mounts: coherence between sandboxes (close-to-open, new and deleted names
//! in listings), read-only attachments (EROFS for every mutation) and subpath attachments (only
//! the subtree is reachable).
//!
//! Coherence assertions are immediate (no polling): close-to-open means that once the writer's
//! close (or unlink, create...) has returned, the other mount's next open or lookup sees it.
//! When one fails, the message says whether and when the other mount caught up, to tell
//! "stale for a TTL" from "never".

use crate::harness::*;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long the other mount had to catch up, for failure messages.
fn caught_up(mut f: impl FnMut() -> bool) -> String {
    match eventually(Duration::from_secs(5), &mut f) {
        Some(d) => format!("it caught up after {d:?}"),
        None => "it had not caught up after 5 s".to_string(),
    }
}

#[test]
fn two_sandboxes_close_to_open() {
    require_fuse!();
    let p = Pair::new("256MiB");
    let (fa, fb) = (p.ma.join("f.bin"), p.mb.join("f.bin"));

    // Written and closed in A: B reads the same bytes.
    let v1 = pattern(300 * KIB as usize, 1);
    write(&fa, &v1);
    assert_bytes_eq("B reads what A wrote and closed", &read(&fb), &v1);

    // Overwrite in A, same size, new content: a fresh open in B sees it although B has the
    // old content in its page cache.
    let v2 = pattern(300 * KIB as usize, 2);
    write(&fa, &v2);
    let got = read(&fb);
    if got != v2 {
        let why = caught_up(|| read(&fb) == v2);
        assert_bytes_eq(&format!("B after A overwrote the file ({why})"), &got, &v2);
    }

    // In-place overwrite of a few bytes without a size change.
    let f = OpenOptions::new().write(true).open(&fa).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"PATCHED", 1000).unwrap();
    drop(f);
    let mut v3 = v2.clone();
    v3[1000..1007].copy_from_slice(b"PATCHED");
    let got = read(&fb);
    if got != v3 {
        let why = caught_up(|| read(&fb) == v3);
        assert_bytes_eq(&format!("B after A patched 7 bytes in place ({why})"), &got, &v3);
    }

    // And the other direction: B overwrites in place, A sees it.
    let f = OpenOptions::new().write(true).open(&fb).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"FROM-B", 0).unwrap();
    drop(f);
    let mut v4 = v3.clone();
    v4[..6].copy_from_slice(b"FROM-B");
    let got = read(&fa);
    if got != v4 {
        let why = caught_up(|| read(&fa) == v4);
        assert_bytes_eq(&format!("A after B patched 6 bytes in place ({why})"), &got, &v4);
    }
}

/// Size as seen by stat in one mount, for failure messages.
fn size(p: &Path) -> String {
    match fs::metadata(p) {
        Ok(md) => md.len().to_string(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn two_sandboxes_see_size_changes() {
    require_fuse!();
    let p = Pair::new("256MiB");
    let (fa, fb) = (p.ma.join("grow"), p.mb.join("grow"));
    let v1 = pattern(100 * KIB as usize, 1);
    write(&fa, &v1);
    assert_bytes_eq("B reads what A wrote", &read(&fb), &v1);

    // B appends (the file grows); A, which has the inode cached, opens it afresh.
    let mut f = OpenOptions::new().append(true).open(&fb).unwrap();
    f.write_all(b"appended by B").unwrap();
    drop(f);
    let mut v2 = v1.clone();
    v2.extend_from_slice(b"appended by B");
    let got = read(&fa);
    if got != v2 {
        let (sa, sb) = (size(&fa), size(&fb));
        let why = caught_up(|| read(&fa) == v2);
        assert_bytes_eq(&format!("A after B appended (stat size in A {sa}, in B {sb}; {why})"), &got, &v2);
    }

    // A truncates (the file shrinks); B sees the shorter file.
    OpenOptions::new().write(true).open(&fa).unwrap().set_len(1000).unwrap();
    let got = read(&fb);
    if got != v1[..1000] {
        let (sa, sb) = (size(&fa), size(&fb));
        let why = caught_up(|| read(&fb) == v1[..1000]);
        assert_bytes_eq(&format!("B after A truncated to 1000 (stat size in A {sa}, in B {sb}; {why})"), &got, &v1[..1000]);
    }

    // A rewrites the whole file with a different size (O_TRUNC + write); B sees the new bytes.
    let v3 = pattern(50 * KIB as usize, 3);
    write(&fa, &v3);
    let got = read(&fb);
    if got != v3 {
        let (sa, sb) = (size(&fa), size(&fb));
        let why = caught_up(|| read(&fb) == v3);
        assert_bytes_eq(&format!("B after A rewrote the file at 50 KiB (stat size in A {sa}, in B {sb}; {why})"), &got, &v3);
    }
}

#[test]
fn two_sandboxes_see_new_and_deleted_names() {
    require_fuse!();
    let p = Pair::new("256MiB");
    fs::create_dir(p.ma.join("d")).unwrap();
    write(&p.ma.join("d/one"), b"1");
    // B lists (and so caches) the directory first.
    assert_eq!(list(&p.mb.join("d")), ["one"]);
    assert_eq!(list(&p.mb), ["d"]);

    // A new file in A appears in B's listing and resolves by name.
    write(&p.ma.join("d/two"), b"22");
    let got = list(&p.mb.join("d"));
    if got != ["one", "two"] {
        let why = caught_up(|| list(&p.mb.join("d")) == ["one", "two"]);
        panic!("B lists {got:?} after A created d/two ({why})");
    }
    assert_eq!(read(&p.mb.join("d/two")), b"22");

    // A delete in A disappears from B: listing and lookup.
    assert_eq!(read(&p.mb.join("d/one")), b"1"); // B has the dentry cached now
    fs::remove_file(p.ma.join("d/one")).unwrap();
    let got = list(&p.mb.join("d"));
    if got != ["two"] {
        let why = caught_up(|| list(&p.mb.join("d")) == ["two"]);
        panic!("B lists {got:?} after A deleted d/one ({why})");
    }
    // A cached name is gone once the push of the deletion lands, normally within milliseconds
    // (docs/semantics.md), not at once: give it 2 s.
    let within_ttl = |f: &mut dyn FnMut() -> bool| eventually(Duration::from_secs(2), f).is_some();
    assert!(within_ttl(&mut || fs::metadata(p.mb.join("d/one")).is_err()), "B can still stat d/one 2 s after A deleted it");
    assert_errno("B stat of the name A deleted", fs::metadata(p.mb.join("d/one")), libc::ENOENT);

    // A rename in A: the old name goes, the new one comes, in B (a name B never looked up is
    // always asked of the host, so the new one is there at once).
    fs::rename(p.ma.join("d/two"), p.ma.join("moved")).unwrap();
    assert!(fs::metadata(p.mb.join("moved")).is_ok(), "B cannot see `moved` right after A's rename");
    assert!(within_ttl(&mut || fs::metadata(p.mb.join("d/two")).is_err()), "B still sees d/two 2 s after A renamed it");
    assert_eq!(read(&p.mb.join("moved")), b"22");
    assert_eq!(list(&p.mb), ["d", "moved"]);
}

#[test]
fn one_sandbox_two_attachments_of_one_volume() {
    require_fuse!();
    let c = Cluster::new();
    c.create_volume("vol", Some("64MiB"));
    let sock = c.sandbox("sb");
    let (m1, m2) = (c.path("m1"), c.path("m2"));
    c.attach("sb", "vol", &m1, &[]);
    c.attach("sb", "vol", &m2, &[]);
    let _agent = c.start_agent(&sock, &[&m1, &m2]);
    write(&m1.join("x"), b"via m1");
    assert_eq!(read(&m2.join("x")), b"via m1");
    write(&m2.join("x"), b"via m2");
    assert_eq!(read(&m1.join("x")), b"via m2");
    assert_eq!(list(&m2), ["x"]);
}

/// Asserts `r` failed with EROFS.
#[track_caller]
fn erofs<T: std::fmt::Debug>(what: &str, r: std::io::Result<T>) {
    assert_errno(&format!("{what} on a read-only attachment"), r, libc::EROFS);
}

#[test]
fn read_only_attachment_refuses_every_mutation() {
    require_fuse!();
    let c = Cluster::new();
    c.create_volume("vol", Some("64MiB"));
    let sock = c.sandbox("sb");
    let (rw, ro) = (c.path("rw"), c.path("ro"));
    c.attach("sb", "vol", &rw, &[]);
    c.attach("sb", "vol", &ro, &["--read-only"]);
    let _agent = c.start_agent(&sock, &[&rw, &ro]);
    let opts = mount_options(&ro).unwrap();
    assert!(opts.split(',').any(|o| o == "ro"), "read-only attachment mounted with {opts}");
    let st = statvfs(&ro).unwrap();
    assert_ne!(st.f_flag & libc::ST_RDONLY, 0, "statvfs f_flag lacks ST_RDONLY");

    write(&rw.join("file"), b"readable");
    fs::create_dir(rw.join("dir")).unwrap();
    setxattr(&rw.join("file"), "user.k", b"v", 0).unwrap();

    // Reading works.
    assert_eq!(read(&ro.join("file")), b"readable");
    assert_eq!(list(&ro), ["dir", "file"]);
    assert_eq!(getxattr(&ro.join("file"), "user.k").unwrap(), b"v");

    let f = ro.join("file");
    erofs("create", OpenOptions::new().write(true).create(true).truncate(false).open(ro.join("new")));
    erofs("open for write", OpenOptions::new().write(true).open(&f));
    erofs("open O_TRUNC", OpenOptions::new().write(true).truncate(true).open(&f));
    erofs("mkdir", fs::create_dir(ro.join("newdir")));
    erofs("unlink", fs::remove_file(&f));
    erofs("rmdir", fs::remove_dir(ro.join("dir")));
    erofs("rename", fs::rename(&f, ro.join("renamed")));
    erofs("chmod", fs::set_permissions(&f, fs::Permissions::from_mode(0o600)));
    erofs("chown", std::os::unix::fs::chown(&f, Some(1), Some(1)));
    erofs("utimensat", set_times(&f, (1, 0), (1, 0)));
    erofs("truncate", {
        let p = cpath(&f);
        cvt(unsafe { libc::truncate(p.as_ptr(), 0) })
    });
    erofs("setxattr", setxattr(&f, "user.test", b"x", 0));
    erofs("removexattr", removexattr(&f, "user.k"));
    erofs("symlink", std::os::unix::fs::symlink("file", ro.join("link")));
    erofs("link", fs::hard_link(&f, ro.join("hard")));
    erofs("mkfifo", mkfifo(&ro.join("fifo"), 0o644));

    // Nothing changed, as seen from the read-write mount.
    assert_eq!(read(&rw.join("file")), b"readable");
    assert_eq!(list(&rw), ["dir", "file"]);
}

/// A volume with `/sub` (a, inner/c, an escaping symlink) and `/outside.txt`, mounted whole in
/// sandbox `full`, plus sandbox `scoped` with `--subpath /sub`.
struct Scoped {
    _scoped: Agent,
    _full: Agent,
    full: PathBuf,
    sub: PathBuf,
    _c: Cluster,
}

const SECRET: &[u8] = b"SECRET-OUTSIDE-THE-SUBPATH";

fn scoped() -> Scoped {
    let c = Cluster::new();
    c.create_volume("vol", Some("64MiB"));
    let (sf, ss) = (c.sandbox("full"), c.sandbox("scoped"));
    let full = c.path("full");
    c.attach("full", "vol", &full, &[]);
    let full_agent = c.start_agent(&sf, &[&full]);
    write(&full.join("outside.txt"), SECRET);
    fs::create_dir_all(full.join("sub/inner")).unwrap();
    write(&full.join("sub/a.txt"), b"in sub");
    write(&full.join("sub/inner/c.txt"), b"deeper");
    std::os::unix::fs::symlink("../outside.txt", full.join("sub/escape")).unwrap();
    assert_eq!(read(&full.join("sub/escape")), SECRET, "the link resolves in the full mount");

    let sub = c.path("sub-mnt");
    c.attach("scoped", "vol", &sub, &["--subpath", "/sub"]);
    let scoped_agent = c.start_agent(&ss, &[&sub]);
    Scoped { _scoped: scoped_agent, _full: full_agent, full, sub, _c: c }
}

#[test]
fn subpath_attachment_shows_only_its_subtree() {
    require_fuse!();
    let s = scoped();
    assert_eq!(list(&s.sub), ["a.txt", "escape", "inner"]);
    assert_eq!(read(&s.sub.join("a.txt")), b"in sub");
    assert_eq!(read(&s.sub.join("inner/c.txt")), b"deeper");
    assert_errno("outside.txt through the subpath mount", fs::metadata(s.sub.join("outside.txt")), libc::ENOENT);
    assert_errno("sub/ nested again", fs::metadata(s.sub.join("sub")), libc::ENOENT);

    // Created on the subpath mount, it lands under /sub of the volume.
    write(&s.sub.join("new.txt"), b"made in the scoped mount");
    fs::create_dir(s.sub.join("newdir")).unwrap();
    assert_eq!(read(&s.full.join("sub/new.txt")), b"made in the scoped mount");
    assert!(fs::metadata(s.full.join("sub/newdir")).unwrap().is_dir());
    assert_errno("new.txt at the volume root", fs::metadata(s.full.join("new.txt")), libc::ENOENT);
    let root = list(&s.full);
    assert_eq!(root, ["outside.txt", "sub"], "the volume root after writes through the subpath");

    // statfs of a subpath mount is the volume's.
    let st = statvfs(&s.sub).unwrap();
    let total = st.f_blocks as u64 * st.f_frsize as u64;
    assert!(total.abs_diff(64 * MIB) <= st.f_frsize as u64, "statfs total {total} on the subpath mount");
}

#[test]
fn subpath_symlink_does_not_escape() {
    require_fuse!();
    let s = scoped();
    let link = s.sub.join("escape");
    assert_eq!(fs::read_link(&link).unwrap(), Path::new("../outside.txt"));
    // The kernel resolves `..` of the mount root to the mount's parent directory, outside the
    // volume, where there is no outside.txt: the volume's file must not be reachable.
    match fs::read(&link) {
        Ok(bytes) => assert_ne!(bytes, SECRET, "the subpath mount revealed /outside.txt through a symlink"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "reading the link: {e}"),
    }
    // The volume's outside.txt is still there, so the check above was not vacuous.
    assert_eq!(read(&s.full.join("outside.txt")), SECRET);
}

#[test]
fn exclusive_create_across_mounts_has_one_winner() {
    require_fuse!();
    let p = Pair::new("256MiB");
    let run = |mnt: PathBuf| {
        std::thread::spawn(move || {
            (0..60)
                .map(|i| OpenOptions::new().write(true).create_new(true).open(mnt.join(format!("race-{i}"))).is_ok())
                .collect::<Vec<bool>>()
        })
    };
    let (ta, tb) = (run(p.ma.clone()), run(p.mb.clone()));
    let (wa, wb) = (ta.join().unwrap(), tb.join().unwrap());
    for i in 0..60 {
        assert!(wa[i] ^ wb[i], "O_EXCL create of race-{i} from two mounts: A won {}, B won {}", wa[i], wb[i]);
    }
    assert_eq!(list(&p.ma).len(), 60);
}

#[test]
fn unlink_in_one_mount_while_open_in_another() {
    // Data lives until the last handle closes, whichever sandbox holds it.
    require_fuse!();
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::io::AsRawFd;
    let p = Pair::new("256MiB");
    let data = pattern(2 * MIB as usize, 8);
    write(&p.ma.join("f"), &data);
    let mut fb = OpenOptions::new().read(true).write(true).open(p.mb.join("f")).unwrap();
    fs::remove_file(p.ma.join("f")).unwrap();
    assert_errno("stat in A after unlink", fs::metadata(p.ma.join("f")), libc::ENOENT);
    // B's handle still reads everything, from the server (page cache dropped).
    assert_eq!(unsafe { libc::posix_fadvise(fb.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
    let mut got = Vec::new();
    fb.read_to_end(&mut got).expect("read in B after A unlinked the file");
    assert_bytes_eq("B's open handle after A unlinked the file", &got, &data);
    fb.write_all(b"tail").expect("write in B after A unlinked the file");
    fb.sync_all().expect("fsync in B after A unlinked the file");
    fb.seek(SeekFrom::Start(2 * MIB)).unwrap();
    let mut tail = Vec::new();
    fb.read_to_end(&mut tail).unwrap();
    assert_eq!(tail, b"tail");
    drop(fb);
    let c = &p.c;
    let freed = eventually(Duration::from_secs(5), || c.volume_used("vol") < 64 * KIB);
    assert!(freed.is_some(), "space not freed after the last handle closed: used {}", c.volume_used("vol"));
}

#[test]
fn read_only_subpath_attachment() {
    require_fuse!();
    let c = Cluster::new();
    c.create_volume("vol", Some("64MiB"));
    let sock = c.sandbox("sb");
    let rw = c.path("rw");
    c.attach("sb", "vol", &rw, &[]);
    let _agent = c.start_agent(&sock, &[&rw]);
    fs::create_dir(rw.join("sub")).unwrap();
    write(&rw.join("sub/in.txt"), b"inside");
    write(&rw.join("out.txt"), b"outside");
    let sock2 = c.sandbox("sb2");
    let ro = c.path("ro-sub");
    c.attach("sb2", "vol", &ro, &["--read-only", "--subpath", "/sub"]);
    let _agent2 = c.start_agent(&sock2, &[&ro]);
    assert_eq!(list(&ro), ["in.txt"]);
    assert_eq!(read(&ro.join("in.txt")), b"inside");
    erofs("create on a read-only subpath", fs::write(ro.join("new"), b"x"));
    erofs("unlink on a read-only subpath", fs::remove_file(ro.join("in.txt")));
}

/// Names and attributes are cached for a minute and kept current by pushes; pushes to a
/// sandbox whose link is down (hibernated here) are lost, so its reconnection drops everything
/// its kernel cached: what another sandbox changed meanwhile shows at once after the resume,
/// not when the cache would have expired.
#[test]
fn a_resumed_sandbox_sees_at_once_what_changed_while_it_slept() {
    require_fuse!();
    let p = Pair::new("256MiB");
    fs::create_dir(p.ma.join("d")).unwrap();
    write(&p.ma.join("f"), b"1234");
    write(&p.ma.join("d/old"), b"x");
    // A caches all of it: names, attributes, pages.
    assert_eq!(fs::metadata(p.ma.join("f")).unwrap().len(), 4);
    assert_eq!(read(&p.ma.join("f")), b"1234");
    assert_eq!(list(&p.ma.join("d")), ["old"]);
    assert!(fs::metadata(p.ma.join("d/old")).is_ok());

    p.c.cli(&["sandbox", "hibernate", "sb-a"]);
    write(&p.mb.join("f"), b"changed while A slept");
    write(&p.mb.join("d/new"), b"y");
    fs::remove_file(p.mb.join("d/old")).unwrap();
    p.c.cli(&["sandbox", "resume", "sb-a"]);

    let seen = || {
        fs::metadata(p.ma.join("f")).map(|m| m.len()).ok() == Some(21)
            && fs::metadata(p.ma.join("d/old")).is_err()
            && list(&p.ma.join("d")) == ["new"]
    };
    let took = eventually(Duration::from_secs(5), seen);
    assert!(
        took.is_some(),
        "A after resume: f {:?} bytes, d/old {}, d lists {:?} (cached from before the hibernation)",
        fs::metadata(p.ma.join("f")).map(|m| m.len()),
        if fs::metadata(p.ma.join("d/old")).is_ok() { "still there" } else { "gone" },
        list(&p.ma.join("d"))
    );
    assert_eq!(read(&p.ma.join("f")), b"changed while A slept");
}

/// The copy of a small file sent with A's open is retired by the push of B's write, like A's
/// cached pages: a read of A's that reaches FUSE afterwards sees B's bytes.
#[test]
fn another_sandboxs_write_retires_the_copy_sent_with_an_open() {
    require_fuse!();
    let p = Pair::new("256MiB");
    write(&p.ma.join("f"), b"old old old");
    let mut reader = fs::File::open(p.ma.join("f")).unwrap();
    let mut w = OpenOptions::new().write(true).open(p.mb.join("f")).unwrap();
    w.write_all(b"new").unwrap();
    drop(w);
    let fresh = || {
        drop_cache(&p.ma.join("f"));
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut fs::File::open(p.ma.join("f")).unwrap(), &mut got).unwrap();
        got == b"new old old"
    };
    assert!(eventually(Duration::from_secs(5), fresh).is_some(), "A never saw B's write");
    drop_cache(&p.ma.join("f"));
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut reader, &mut got).unwrap();
    assert_eq!(String::from_utf8_lossy(&got), "new old old", "A's descriptor opened before B's write, read after it");
}

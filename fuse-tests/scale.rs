//! Several servers, one store: two servers sharing one PostgreSQL and one block store serve the
//! same volume to sandboxes attached to each. Needs PostgreSQL (`VOLUMEFS_TEST_PG`, set by the
//! PostgreSQL + S3 tier of scripts/test.sh); blocks go to that tier's S3 bucket, or to a local
//! directory both servers share.

use crate::harness::*;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

/// Removes the shared block directory when the test ends.
struct Shared(PathBuf);

impl Drop for Shared {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The `--meta` and `--blocks` of a store of its own, for servers to share; `None` (the test
/// skips) without PostgreSQL.
fn shared_store(name: &str) -> Option<(String, String, Shared)> {
    let Some(pg) = std::env::var("VOLUMEFS_TEST_PG").ok().filter(|s| !s.is_empty()) else {
        eprintln!("SKIPPED: needs PostgreSQL (VOLUMEFS_TEST_PG; scripts/test.sh starts one as root)");
        return None;
    };
    let unique = format!(
        "{name}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos()
    );
    let meta = format!("{pg}{}schema={unique}", if pg.contains('?') { '&' } else { '?' });
    let dir = PathBuf::from(format!("/tmp/vfs-shared-{unique}"));
    let blocks = match std::env::var("VOLUMEFS_TEST_BLOCKS") {
        Ok(b) if b.starts_with("s3://") => format!("{b}{}prefix={unique}", if b.contains('?') { '&' } else { '?' }),
        _ => format!("file://{}", dir.display()),
    };
    Some((meta, blocks, Shared(dir)))
}

/// Two servers on one store (`extra` arguments for both), volume `shared` made through the
/// first, a sandbox on each with it mounted at `m1` and `m2`. The agents stop before the
/// servers.
struct Two {
    a1: Option<Agent>,
    a2: Option<Agent>,
    m1: PathBuf,
    m2: PathBuf,
    c1: Cluster,
    c2: Cluster,
}

fn two_servers(meta: &str, blocks: &str, extra: &[&str]) -> Two {
    let mut args = vec!["--meta", meta, "--blocks", blocks];
    args.extend_from_slice(extra);
    let c1 = Cluster::with_server_args(&args);
    let c2 = Cluster::with_server_args(&args);
    c1.create_volume("shared", Some("256MiB"));
    assert!(c2.volume("shared").is_some(), "a volume made through one server is there through the other");
    let (s1, s2) = (c1.sandbox("sb-one"), c2.sandbox("sb-two"));
    let (m1, m2) = (c1.path("m1"), c2.path("m2"));
    c1.attach("sb-one", "shared", &m1, &[]);
    c2.attach("sb-two", "shared", &m2, &[]);
    let a1 = Some(c1.start_agent(&s1, &[&m1]));
    let a2 = Some(c2.start_agent(&s2, &[&m2]));
    Two { a1, a2, m1, m2, c1, c2 }
}

fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    (0..n).map(|_| r.next() as u8).collect()
}

#[test]
fn two_servers_one_store_serve_the_same_volume() {
    require_fuse!();
    let Some((meta, blocks, _shared)) = shared_store("two") else { return };
    let mut t = two_servers(&meta, &blocks, &[]);
    let (m1, m2) = (t.m1.clone(), t.m2.clone());

    // A write through a sandbox on one server reads back exactly through the other.
    let data = pattern(5 << 20, 11);
    fs::write(m1.join("f"), &data).unwrap();
    assert_bytes_eq("read through the other server", &fs::read(m2.join("f")).unwrap(), &data);
    // Sandbox one reads it too: its kernel now holds the file's pages.
    assert_bytes_eq("read through the first server", &fs::read(m1.join("f")).unwrap(), &data);

    // And back: a change made on the second is seen by the first at its next open (its cached
    // pages of the file go at the open), though no push crosses between servers.
    let f = fs::OpenOptions::new().write(true).open(m2.join("f")).unwrap();
    f.write_all_at(b"changed on two", 4096).unwrap();
    drop(f);
    let mut want = data.clone();
    want[4096..4096 + 14].copy_from_slice(b"changed on two");
    assert_bytes_eq("read back on one", &fs::read(m1.join("f")).unwrap(), &want);
    fs::create_dir(m2.join("made-on-two")).unwrap();
    assert!(eventually(Duration::from_secs(5), || m1.join("made-on-two").is_dir()).is_some(), "a new name shows on one");

    // What one's guest holds for a minute (attributes, names) is pushed out within seconds when
    // the other server changes it: servers announce their commits to each other.
    let len = fs::metadata(m1.join("f")).unwrap().len();
    let mut g = fs::OpenOptions::new().append(true).open(m2.join("f")).unwrap();
    g.write_all(b"more").unwrap();
    drop(g);
    assert!(
        eventually(Duration::from_secs(5), || fs::metadata(m1.join("f")).map(|m| m.len()).ok() == Some(len + 4)).is_some(),
        "one's cached size of f was not updated"
    );
    fs::remove_dir(m2.join("made-on-two")).unwrap();
    assert!(eventually(Duration::from_secs(5), || !m1.join("made-on-two").exists()).is_some(), "one still sees a removed name");

    // A file open through a sandbox on one server outlives its unlink through the other: the
    // handle reads (from the store: its cached pages are dropped first) and writes it, it
    // counts against the cap while open, and its bytes are given back when it closes.
    let held = pattern(4 << 20, 23);
    fs::write(m1.join("held"), &held).unwrap();
    let used = t.c1.volume_used("shared");
    let mut h = fs::OpenOptions::new().read(true).write(true).open(m2.join("held")).unwrap();
    fs::remove_file(m1.join("held")).unwrap();
    assert!(eventually(Duration::from_secs(5), || !m2.join("held").exists()).is_some(), "the name is gone on two too");
    h.write_all_at(b"still mine", 1 << 20).unwrap();
    h.sync_all().unwrap();
    let r = unsafe { libc::posix_fadvise(std::os::unix::io::AsRawFd::as_raw_fd(&h), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0);
    let mut want = held.clone();
    want[1 << 20..(1 << 20) + 10].copy_from_slice(b"still mine");
    let mut got = vec![0; want.len()];
    h.read_exact_at(&mut got, 0).expect("read an unlinked file through a handle on the other server");
    assert_bytes_eq("the unlinked file through its handle", &got, &want);
    assert!(t.c1.volume_used("shared") >= used, "the open file still counts");
    h.flush().unwrap();
    drop(h);
    assert!(
        eventually(Duration::from_secs(5), || t.c1.volume_used("shared") + (4 << 20) <= used).is_some(),
        "the closed orphan's bytes are given back: {} of {used}",
        t.c1.volume_used("shared")
    );

    // Server one dies (-9) in the middle of a stream of writes: every byte fsync'd before is
    // there, through server two.
    let mut log = fs::OpenOptions::new().create(true).write(true).truncate(true).open(m1.join("log")).unwrap();
    let synced = pattern(3 << 20, 5);
    log.write_all(&synced).unwrap();
    log.sync_all().unwrap();
    let writer = {
        let path = m1.join("log");
        std::thread::spawn(move || {
            let mut f = fs::OpenOptions::new().write(true).open(path).unwrap();
            f.seek(SeekFrom::End(0)).unwrap();
            for _ in 0..256 {
                if f.write_all(&[b'x'; 64 << 10]).is_err() {
                    break;
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(150));
    t.c1.kill_server();
    let seen = fs::read(m2.join("log")).unwrap();
    assert!(seen.len() >= synced.len(), "the log lost fsync'd bytes: {} < {}", seen.len(), synced.len());
    assert_bytes_eq("fsync'd bytes through the surviving server", &seen[..synced.len()], &synced);
    assert!(seen[synced.len()..].iter().all(|b| *b == b'x'), "what came after is what was written");
    // Server one comes back and its sandbox's writer carries on where it was held.
    t.c1.start_server();
    writer.join().expect("the writer on the restarted server");
    drop(log);
    let total = fs::read(m2.join("log")).unwrap();
    assert_bytes_eq("the log's fsync'd start", &total[..synced.len()], &synced);
    t.a1.take();
    t.a2.take();
    assert!(t.c2.fsck_problems().is_empty(), "{:?}", t.c2.fsck_problems());
}

/// fcntl(F_SETLK) on `f`: `typ` over `[start, start+len)`.
fn setlk(f: &fs::File, typ: i32, start: i64, len: i64) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a zeroed flock is valid; the fields are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = len;
    // SAFETY: fcntl on a descriptor we own with a valid flock.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &fl) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn flock_nb(f: &fs::File) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn locks_exclude_across_servers_and_a_dead_servers_locks_expire() {
    require_fuse!();
    let Some((meta, blocks, _shared)) = shared_store("locks") else { return };
    let mut t = two_servers(&meta, &blocks, &["--lease-ttl", "3"]);
    let (m1, m2) = (t.m1.clone(), t.m2.clone());
    fs::write(m1.join("lockme"), b"data").unwrap();
    let rw = |p: &std::path::Path| fs::OpenOptions::new().read(true).write(true).open(p).unwrap();
    let f1 = rw(&m1.join("lockme"));
    let f2 = rw(&m2.join("lockme"));

    // fcntl: a write lock through one server excludes through the other; other bytes are free.
    setlk(&f1, libc::F_WRLCK, 0, 100).unwrap();
    assert_errno("a conflicting lock through the other server", setlk(&f2, libc::F_WRLCK, 50, 10), libc::EAGAIN);
    assert_errno("a read lock too", setlk(&f2, libc::F_RDLCK, 0, 1), libc::EAGAIN);
    setlk(&f2, libc::F_RDLCK, 200, 100).unwrap();
    assert_errno("and the other way round", setlk(&f1, libc::F_WRLCK, 250, 1), libc::EAGAIN);
    setlk(&f1, libc::F_UNLCK, 0, 100).unwrap();
    setlk(&f2, libc::F_WRLCK, 50, 10).expect("free once released through the first server");
    setlk(&f2, libc::F_UNLCK, 0, 0).unwrap();

    // flock: the same, whole file.
    let g1 = rw(&m1.join("lockme"));
    let g2 = rw(&m2.join("lockme"));
    flock_nb(&g1).unwrap();
    assert_errno("flock through the other server", flock_nb(&g2), libc::EWOULDBLOCK);
    drop(g1);
    assert!(eventually(Duration::from_secs(5), || flock_nb(&g2).is_ok()).is_some(), "free once the first closes");
    drop(g2);

    // A server that dies holds nothing once its heartbeat is a lease TTL old.
    // (The flock's release reaches the store just after the close returns.)
    assert!(eventually(Duration::from_secs(5), || setlk(&f1, libc::F_WRLCK, 1000, 100).is_ok()).is_some());
    t.c1.kill_server();
    assert_errno("held while the server may live", setlk(&f2, libc::F_WRLCK, 1000, 10), libc::EAGAIN);
    assert!(
        eventually(Duration::from_secs(15), || setlk(&f2, libc::F_WRLCK, 1000, 10).is_ok()).is_some(),
        "the dead server's lock expired"
    );
    t.c1.start_server();
    drop(f1);
    drop(f2);
    t.a1.take();
    t.a2.take();
}

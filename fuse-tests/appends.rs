//! Appends and locks across sandboxes: the promises a log file, a mailbox or a job queue on a
//! shared volume depends on.
//!
//! - An `O_APPEND` write is placed by the host at its own end of file, in the transaction that
//!   extends the size, so appenders in any number of sandboxes never overwrite one another, with
//!   `flock`, `fcntl`, OFD locks or no lock at all. Checked record by record: every fsync'd
//!   record is in the file exactly once and whole.
//! - Taking a lock revalidates: after the lock is granted, a read or an `fstat` sees everything
//!   another sandbox committed before it released the lock.
//! - A guest whose server is gone does not hang: stopping its agent returns within a bound.
//!
//! Writers are forked processes that make only raw system calls (open, fcntl/flock, write,
//! fsync, _exit), so each is its own lock owner as separate programs in separate VMs would be.

use crate::harness::*;
use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Locking {
    Flock,
    Fcntl,
    Ofd,
    NoLock,
}

const ALL: [Locking; 4] = [Locking::Flock, Locking::Fcntl, Locking::Ofd, Locking::NoLock];

/// `n` sandboxes, each with the whole volume `vol` mounted; agents stop before the cluster.
pub struct Fleet {
    pub agents: Vec<Agent>,
    pub mounts: Vec<PathBuf>,
    pub c: Cluster,
}

impl Fleet {
    pub fn new(n: usize) -> Fleet {
        let c = Cluster::new();
        c.create_volume("vol", Some("1GiB"));
        let mut agents = Vec::new();
        let mut mounts = Vec::new();
        for i in 0..n {
            let sb = format!("sb{i:02}");
            let socket = c.sandbox(&sb);
            let m = c.path(&format!("m{i:02}"));
            c.attach(&sb, "vol", &m, &[]);
            agents.push(c.start_agent(&socket, &[&m]));
            mounts.push(m);
        }
        Fleet { agents, mounts, c }
    }
}

/// One record: fixed width, names its writer and its number, ends in a newline.
pub fn record(writer: usize, i: usize, how: Locking) -> Vec<u8> {
    let mut r = format!("w{writer:02} r{i:04} {how:?}").into_bytes();
    r.resize(39, b'.');
    r.push(b'\n');
    r
}

/// Takes (`on`) or releases a whole-file lock of kind `how` on `fd`, blocking; the raw return
/// value. Allocates nothing and cannot panic, so a forked child may call it.
fn lock_raw(fd: libc::c_int, how: Locking, on: bool) -> libc::c_int {
    let fl = flock_struct(if on { libc::F_WRLCK } else { libc::F_UNLCK }, 0, 0);
    unsafe {
        match how {
            Locking::Flock => libc::flock(fd, if on { libc::LOCK_EX } else { libc::LOCK_UN }),
            Locking::Fcntl => libc::fcntl(fd, if on { libc::F_SETLKW } else { libc::F_SETLK }, &fl),
            Locking::Ofd => libc::fcntl(fd, if on { libc::F_OFD_SETLKW } else { libc::F_OFD_SETLK }, &fl),
            Locking::NoLock => 0,
        }
    }
}

/// Forks a process that appends `records` to `path` (opened `O_WRONLY | O_APPEND`), each under
/// the lock `how` and followed by `fsync`. Exit status 0, or the step that failed (10 + errno
/// class). Everything the child needs is prepared before the fork.
fn spawn_appender(path: &Path, how: Locking, records: Vec<Vec<u8>>) -> libc::pid_t {
    let cpath = CString::new(path.as_os_str().to_str().unwrap()).unwrap();
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid > 0 {
        return pid;
    }
    // In the child: raw system calls only.
    unsafe {
        let fd = libc::open(cpath.as_ptr(), libc::O_WRONLY | libc::O_APPEND);
        if fd < 0 {
            libc::_exit(10);
        }
        for r in &records {
            if lock_raw(fd, how, true) != 0 {
                libc::_exit(11);
            }
            if libc::write(fd, r.as_ptr().cast(), r.len()) != r.len() as isize {
                libc::_exit(12);
            }
            if libc::fsync(fd) != 0 {
                libc::_exit(13);
            }
            if lock_raw(fd, how, false) != 0 {
                libc::_exit(14);
            }
        }
        libc::close(fd);
        libc::_exit(0);
    }
}

fn wait_child(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid");
    assert!(libc::WIFEXITED(status), "appender {pid} did not exit normally (status {status:#x})");
    libc::WEXITSTATUS(status)
}

/// Checks `data` record by record against what each writer wrote: every record exactly once,
/// whole, and each writer's records in the order it wrote them. Returns the number of records.
pub fn check_records(what: &str, data: &[u8], writers: usize, per_writer: usize, how: Locking) -> usize {
    let mut seen: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
    let mut next = vec![0usize; writers];
    assert_eq!(data.len() % 40, 0, "{what}: {} bytes is not a whole number of 40-byte records", data.len());
    for (k, line) in data.chunks(40).enumerate() {
        *seen.entry(line.to_vec()).or_default() += 1;
        let w: usize = std::str::from_utf8(&line[1..3]).ok().and_then(|s| s.parse().ok()).unwrap_or(usize::MAX);
        assert!(w < writers, "{what}: record {k} is torn or foreign: {:?}", String::from_utf8_lossy(line));
        assert_eq!(line, record(w, next[w], how), "{what}: record {k} (writer {w}) out of order, torn or overwritten");
        next[w] += 1;
    }
    for w in 0..writers {
        for i in 0..per_writer {
            let r = record(w, i, how);
            let n = seen.get(&r).copied().unwrap_or(0);
            assert_eq!(n, 1, "{what}: record {:?} appears {n} times", String::from_utf8_lossy(&r));
        }
    }
    data.len() / 40
}

/// Every writer in its own sandbox appends `per_writer` records to one file per locking mode.
fn appenders(mounts: &[PathBuf], c: &Cluster, per_writer: usize) {
    for how in ALL {
        let name = format!("log-{how:?}");
        write(&mounts[0].join(&name), b"");
        let pids: Vec<libc::pid_t> = mounts
            .iter()
            .enumerate()
            .map(|(w, m)| spawn_appender(&m.join(&name), how, (0..per_writer).map(|i| record(w, i, how)).collect()))
            .collect();
        for pid in pids {
            assert_eq!(wait_child(pid), 0, "appender with {how:?} failed (exit code = failing step)");
        }
        // The host's copy, and each sandbox's view after a fresh open.
        let host = c.cli_output(&["file", "read", "vol", &format!("/{name}")]);
        assert!(host.status.success(), "file read: {}", String::from_utf8_lossy(&host.stderr));
        let n = check_records(&format!("{how:?}, host copy"), &host.stdout, mounts.len(), per_writer, how);
        for m in mounts {
            check_records(&format!("{how:?}, read in {}", m.display()), &read(&m.join(&name)), mounts.len(), per_writer, how);
        }
        let size = fs::metadata(mounts[mounts.len() - 1].join(&name)).unwrap().len();
        assert_eq!(size, (n * 40) as u64, "{how:?}: stat size in the last sandbox");
        eprintln!("appends: {} sandboxes, {how:?}: {n} of {} fsync'd records, each exactly once", mounts.len(), mounts.len() * per_writer);
    }
}

#[test]
fn appends_from_two_sandboxes_keep_every_record() {
    require_fuse!();
    let f = Fleet::new(2);
    appenders(&f.mounts, &f.c, 100);
}

#[test]
fn appends_from_sixteen_sandboxes_keep_every_record() {
    require_fuse!();
    let f = Fleet::new(16);
    appenders(&f.mounts, &f.c, 20);
}

/// The case from the bug report: strict turns under flock, O_APPEND, three records each.
#[test]
fn alternating_appends_under_flock_lose_nothing() {
    require_fuse!();
    let p = Pair::new("64MiB");
    write(&p.ma.join("log"), b"");
    let open = |m: &Path| fs::OpenOptions::new().append(true).open(m.join("log")).unwrap();
    let (a, b) = (open(&p.ma), open(&p.mb));
    let mut want = Vec::new();
    for i in 0..3 {
        for (w, f) in [(0, &a), (1, &b)] {
            cvt(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }).unwrap();
            let r = record(w, i, Locking::Flock);
            std::io::Write::write_all(&mut &*f, &r).unwrap();
            f.sync_all().unwrap();
            cvt(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) }).unwrap();
            want.extend_from_slice(&r);
        }
    }
    assert_bytes_eq("log after alternating appends", &read(&p.mb.join("log")), &want);
    assert_bytes_eq("log seen from A", &read(&p.ma.join("log")), &want);
    // The writer's own descriptor reports the host's size.
    assert_eq!(a.metadata().unwrap().len(), want.len() as u64, "fstat of A's append descriptor");
}

/// Takes a lock of kind `how` on `f` (blocking) or releases it.
fn lock(f: &fs::File, how: Locking, on: bool) {
    cvt(lock_raw(f.as_raw_fd(), how, on)).unwrap_or_else(|e| panic!("{how:?} lock({on}): {e}"));
}

/// After taking a lock, what the other sandbox wrote before releasing it is seen: by `fstat`
/// (a pwrite at that size extends the file without overwriting), by reads of pages this
/// sandbox had cached, and by an in-place overwrite that leaves the size unchanged.
#[test]
fn a_lock_revalidates_size_and_pages() {
    require_fuse!();
    let p = Pair::new("64MiB");
    for how in [Locking::Flock, Locking::Fcntl, Locking::Ofd] {
        let name = format!("shared-{how:?}");
        write(&p.ma.join(&name), b"");
        let open = |m: &Path| fs::OpenOptions::new().read(true).write(true).open(m.join(&name)).unwrap();
        let (a, b) = (open(&p.ma), open(&p.mb));
        let mut want: Vec<u8> = Vec::new();
        for i in 0..10 {
            for (w, f) in [(0, &a), (1, &b)] {
                lock(f, how, true);
                let size = f.metadata().unwrap().len();
                assert_eq!(size, want.len() as u64, "{how:?} round {i}: writer {w}'s fstat after the lock");
                let mut got = vec![0u8; want.len()];
                f.read_exact_at(&mut got, 0).unwrap();
                assert_bytes_eq(&format!("{how:?} round {i}: writer {w} reads after the lock"), &got, &want);
                let r = record(w, i, how);
                f.write_all_at(&r, size).unwrap();
                want.extend_from_slice(&r);
                // Overwrite the first record in place: same size, new bytes.
                let head = record(w, 9999, how);
                f.write_all_at(&head, 0).unwrap();
                want[..40].copy_from_slice(&head);
                lock(f, how, false);
            }
        }
        let mut got = vec![0u8; want.len()];
        a.read_exact_at(&mut got, 0).unwrap();
        assert_bytes_eq(&format!("{how:?}: final contents"), &got, &want);
    }
}

/// Appends through the HTTP API and through a mount interleave without loss.
#[test]
fn api_appends_and_guest_appends_interleave() {
    require_fuse!();
    let s = Single::new();
    write(&s.p("log"), b"");
    let pid = spawn_appender(&s.p("log"), Locking::NoLock, (0..50).map(|i| record(0, i, Locking::NoLock)).collect());
    for i in 0..50 {
        let mut child = std::process::Command::new(SERVER_BIN)
            .args(["file", "write", "vol", "/log", "--append"])
            .env("VOLUMEFS_SERVER", format!("http://{}", s.c.addr))
            .env("VOLUMEFS_TOKEN", &s.c.token)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), &record(1, i, Locking::NoLock)).unwrap();
        assert!(child.wait().unwrap().success(), "file write --append");
    }
    assert_eq!(wait_child(pid), 0, "guest appender");
    check_records("API + guest appends", &read(&s.p("log")), 2, 50, Locking::NoLock);
}

/// With the server gone, an agent told to stop gives up on it after a bounded wait: pending
/// requests fail with EIO and the mount goes away, instead of sleeping until a server returns.
#[test]
fn stopping_an_agent_while_the_server_is_down_returns() {
    require_fuse!();
    let mut s = Single::new();
    write(&s.p("f"), b"before the crash");
    let held = fs::File::open(s.p("f")).unwrap();
    s.c.kill_server();
    // A request now waits for a server that does not come back.
    let path = s.p("g");
    let blocked = std::thread::spawn(move || fs::write(path, b"x").map_err(|e| e.raw_os_error()));
    std::thread::sleep(Duration::from_millis(300));
    let agent = s.agent.take().unwrap();
    // The bound is the agent's STOP_GRACE (10 s), plus slack for a loaded machine.
    let (status, took) = agent.terminate_within(Duration::from_secs(40)).expect("agent stopped within 40 s with the server down");
    eprintln!("appends: agent stopped {took:?} after SIGTERM with the server down (exit {status})");
    let r = blocked.join().unwrap();
    assert_eq!(r, Err(Some(libc::EIO)), "the write pending while the server was down fails with EIO");
    drop(held);
    assert!(!is_mounted(&s.mnt), "the mount is gone");
}

/// A plain `umount` in the guest while the server is down returns, and the agent still stops.
#[test]
fn unmounting_while_the_server_is_down_returns() {
    require_fuse!();
    let mut s = Single::new();
    // An agent whose requests wait at most 3 s for an unreachable host.
    s.agent.take().unwrap().stop();
    s.agent = Some(s.c.start_agent_with(&s.socket, &[&s.mnt], &["--host-timeout", "3"]));
    write(&s.p("f"), b"data");
    s.c.kill_server();
    // A name the kernel has never seen, so the lookup must ask the host (past the negative
    // entry TTL too, in case it was looked up).
    std::thread::sleep(Duration::from_millis(1200));
    let started = std::time::Instant::now();
    assert_eq!(fs::metadata(s.p("g")).map_err(|e| e.raw_os_error()).err(), Some(Some(libc::EIO)), "stat with the server down");
    eprintln!("appends: a stat with the server down failed with EIO after {:?} (host timeout 3 s)", started.elapsed());
    let out = std::process::Command::new("timeout").arg("30").arg("umount").arg(&s.mnt).output().unwrap();
    assert!(out.status.success(), "umount with the server down: {} {}", out.status, String::from_utf8_lossy(&out.stderr));
    assert!(!is_mounted(&s.mnt));
    let agent = s.agent.take().unwrap();
    agent.terminate_within(Duration::from_secs(40)).expect("agent stopped within 40 s with the server down");
}

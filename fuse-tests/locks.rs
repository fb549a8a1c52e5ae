//! Advisory locks on a shared volume: the host keeps them, so fcntl (POSIX) and flock locks
//! conflict across mounts of one volume (two sandboxes) as they would on one machine, are
//! released by unlock and by close, and a blocking request waits for the holder.

use crate::harness::*;
use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// fcntl(F_GETLK): the conflicting lock's (type, start, len), type F_UNLCK if none.
fn getlk(f: &File, typ: i32, start: i64, len: i64) -> (i32, i64, i64) {
    let mut fl = flock_struct(typ, start, len);
    cvt(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &mut fl) }).expect("F_GETLK");
    (fl.l_type as i32, fl.l_start, fl.l_len)
}

#[track_caller]
fn assert_would_block(what: &str, r: io::Result<()>) {
    let e = errno_of(what, r);
    assert!(e == libc::EAGAIN || e == libc::EACCES, "{what}: errno {}, expected EAGAIN or EACCES (lock held elsewhere)", errno_name(e));
}

#[test]
fn posix_locks_conflict_across_mounts() {
    require_fuse!();
    let p = Pair::new("64MiB");
    write(&p.ma.join("f"), &[0u8; 1000]);
    let (fa, fb) = (rw(&p.ma.join("f")), rw(&p.mb.join("f")));

    setlk(&fa, libc::F_SETLK, libc::F_WRLCK, 0, 100).expect("write lock in A");
    assert_would_block("overlapping write lock in B", setlk(&fb, libc::F_SETLK, libc::F_WRLCK, 50, 10));
    assert_would_block("overlapping read lock in B", setlk(&fb, libc::F_SETLK, libc::F_RDLCK, 99, 1));
    let (typ, start, len) = getlk(&fb, libc::F_WRLCK, 50, 10);
    assert_eq!((typ, start, len), (libc::F_WRLCK, 0, 100), "F_GETLK in B reports A's lock");
    setlk(&fb, libc::F_SETLK, libc::F_WRLCK, 200, 100).expect("non-overlapping write lock in B");
    assert_eq!(getlk(&fa, libc::F_WRLCK, 0, 100).0, libc::F_UNLCK, "A's own range is free for A");

    // Read locks are shared.
    setlk(&fa, libc::F_SETLK, libc::F_RDLCK, 500, 10).expect("read lock in A");
    setlk(&fb, libc::F_SETLK, libc::F_RDLCK, 500, 10).expect("read lock in B beside A's");

    // Unlock in A frees the range for B.
    setlk(&fa, libc::F_SETLK, libc::F_UNLCK, 0, 100).expect("unlock in A");
    setlk(&fb, libc::F_SETLK, libc::F_WRLCK, 50, 10).expect("B locks after A unlocked");
    assert_would_block("A locks what B holds", setlk(&fa, libc::F_SETLK, libc::F_WRLCK, 0, 0));

    // Closing B's descriptor releases all of B's locks.
    drop(fb);
    setlk(&fa, libc::F_SETLK, libc::F_WRLCK, 0, 0).expect("A locks the whole file after B closed");
}

#[test]
fn posix_locks_conflict_between_processes_in_one_mount() {
    require_fuse!();
    let s = Single::new();
    write(&s.p("f"), b"locked");
    let f = rw(&s.p("f"));
    setlk(&f, libc::F_SETLK, libc::F_WRLCK, 0, 0).expect("write lock in the parent");
    // A forked child is another lock owner; it only calls fcntl and _exit.
    let fd = f.as_raw_fd();
    let child_errno = |typ: i32| -> i32 {
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            unsafe {
                let fl = flock_struct(typ, 0, 0);
                let r = libc::fcntl(fd, libc::F_SETLK, &fl);
                libc::_exit(if r == 0 { 0 } else { *libc::__errno_location() });
            }
        }
        let mut status = 0;
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "child did not exit normally");
        libc::WEXITSTATUS(status)
    };
    let e = child_errno(libc::F_WRLCK);
    assert!(e == libc::EAGAIN || e == libc::EACCES, "another process got a write lock the parent holds (child errno {})", errno_name(e));
    setlk(&f, libc::F_SETLK, libc::F_UNLCK, 0, 0).unwrap();
    assert_eq!(child_errno(libc::F_WRLCK), 0, "child lock after the parent unlocked");
}

#[test]
fn blocking_posix_lock_waits_for_the_holder() {
    require_fuse!();
    let p = Pair::new("64MiB");
    write(&p.ma.join("f"), b"x");
    let fa = rw(&p.ma.join("f"));
    setlk(&fa, libc::F_SETLK, libc::F_WRLCK, 0, 0).expect("write lock in A");
    let got = Arc::new(AtomicBool::new(false));
    let waiter = {
        let (fb, got) = (rw(&p.mb.join("f")), got.clone());
        std::thread::spawn(move || {
            let r = setlk(&fb, libc::F_SETLKW, libc::F_WRLCK, 0, 0);
            got.store(true, Ordering::SeqCst);
            r.map(|_| fb)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    assert!(!got.load(Ordering::SeqCst), "F_SETLKW in B returned while A held the lock");
    setlk(&fa, libc::F_SETLK, libc::F_UNLCK, 0, 0).unwrap();
    let waited = eventually(Duration::from_secs(5), || got.load(Ordering::SeqCst));
    assert!(waited.is_some(), "F_SETLKW in B still waiting 5 s after A unlocked");
    let fb = waiter.join().unwrap().expect("F_SETLKW in B");
    assert_would_block("A after B took the lock", setlk(&fa, libc::F_SETLK, libc::F_WRLCK, 0, 0));
    drop(fb);
}

#[test]
fn flock_conflicts_across_mounts() {
    require_fuse!();
    let p = Pair::new("64MiB");
    write(&p.ma.join("f"), b"x");
    let (fa, fb) = (rw(&p.ma.join("f")), rw(&p.mb.join("f")));
    let flock = |f: &File, op: i32| cvt(unsafe { libc::flock(f.as_raw_fd(), op) }).map(|_| ());
    flock(&fa, libc::LOCK_EX | libc::LOCK_NB).expect("flock LOCK_EX in A");
    assert_errno("flock LOCK_EX in B", flock(&fb, libc::LOCK_EX | libc::LOCK_NB), libc::EWOULDBLOCK);
    assert_errno("flock LOCK_SH in B", flock(&fb, libc::LOCK_SH | libc::LOCK_NB), libc::EWOULDBLOCK);
    flock(&fa, libc::LOCK_UN).unwrap();
    flock(&fb, libc::LOCK_SH | libc::LOCK_NB).expect("flock LOCK_SH in B after A unlocked");
    flock(&fa, libc::LOCK_SH | libc::LOCK_NB).expect("shared flock in A beside B's");
    assert_errno("flock LOCK_EX in A beside B's shared lock", flock(&fa, libc::LOCK_EX | libc::LOCK_NB), libc::EWOULDBLOCK);
    // Close releases flock locks. The kernel sends that unlock with FUSE_RELEASE, which it
    // queues in the background after close(2) has returned (unlike POSIX locks, released by the
    // synchronous FLUSH), so allow the release a moment to arrive.
    drop(fb);
    let freed = eventually(Duration::from_secs(2), || flock(&fa, libc::LOCK_EX | libc::LOCK_NB).is_ok());
    assert!(freed.is_some(), "B's flock lock still held 2 s after B closed its descriptor");
}

/// A python3 process running `locker.py` (next to this file): one whole-file write lock, taken
/// when it starts and held until told otherwise. Killed (by its PID) when dropped.
struct Locker {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    stdin: Option<std::process::ChildStdin>,
}

impl Locker {
    fn start(path: &std::path::Path, kind: &str, wait: bool, extra: &[&str]) -> Locker {
        use std::io::BufRead;
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/fuse-tests/locker.py");
        let mut child = std::process::Command::new("python3")
            .arg(script)
            .arg(path)
            .arg(kind)
            .arg(if wait { "1" } else { "0" })
            .args(extra)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run python3 locker.py");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stdin = child.stdin.take();
        let l = Locker { child, lines, stdin };
        l.expect("ready", Duration::from_secs(20));
        l
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next line it prints, if one comes within `within`.
    fn line(&self, within: Duration) -> Option<String> {
        self.lines.recv_timeout(within).ok()
    }

    #[track_caller]
    fn expect(&self, want: &str, within: Duration) {
        match self.line(within) {
            Some(l) => assert_eq!(l, want, "locker {} printed {l:?}, expected {want:?}", self.pid()),
            None => panic!("locker {} did not print {want:?} within {within:?}", self.pid()),
        }
    }

    fn tell(&mut self, cmd: &str) {
        use std::io::Write;
        writeln!(self.stdin.as_mut().unwrap(), "{cmd}").expect("write to locker");
    }

    /// The process's state letter from /proc (R, S, D, Z…), None once it is reaped.
    fn state(&self) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next())
    }

    /// Whether the process is inside a FUSE request (waiting for the daemon's answer).
    fn in_fuse_request(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/wchan", self.pid())).is_ok_and(|w| w.contains("request_wait_answer"))
    }
}

impl Drop for Locker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        // A process stuck in a FUSE request cannot be reaped until the mount answers or goes:
        // do not hang the test on it (the cluster's teardown kills the agents).
        let _ = eventually(Duration::from_secs(5), || matches!(self.child.try_wait(), Ok(Some(_))));
    }
}

const KINDS: [&str; 3] = ["ofd", "posix", "flock"];

/// Issue #13: a waiting lock (OFD, POSIX fcntl, flock) completes soon after the holder lets go,
/// by unlocking or by closing its file, whether the holder is in the same sandbox or another.
/// Before, an OFD lock outlived the file it was taken on (the kernel never tells FUSE), so a
/// waiter on it was never answered.
#[test]
fn waits_end_when_the_holder_unlocks_or_closes() {
    require_fuse!();
    let p = Pair::new("64MiB");
    for kind in KINDS {
        for (side, waiter_mnt) in [("same sandbox", &p.ma), ("other sandbox", &p.mb)] {
            for how in ["unlock", "close"] {
                let name = format!("{kind}-{}-{how}", side.replace(' ', "-"));
                write(&p.ma.join(&name), b"x");
                let mut holder = Locker::start(&p.ma.join(&name), kind, false, &[]);
                holder.expect("locked", Duration::from_secs(10));
                let waiter = Locker::start(&waiter_mnt.join(&name), kind, true, &[]);
                let what = format!("{kind} lock, waiter in the {side}, holder does {how}");
                assert!(eventually(Duration::from_secs(10), || waiter.in_fuse_request()).is_some(), "{what}: the waiter never waited");
                assert_eq!(waiter.line(Duration::from_millis(300)), None, "{what}: the waiter got an answer while the lock was held");
                holder.tell(how);
                holder.expect(if how == "unlock" { "unlocked" } else { "closed" }, Duration::from_secs(10));
                waiter.expect("locked", Duration::from_secs(5));
                // The waiter holds it now: the former holder cannot take it back.
                let again = Locker::start(&p.ma.join(&name), kind, false, &[]);
                let got = again.line(Duration::from_secs(10)).unwrap_or_default();
                assert!(got == "errno 11" || got == "errno 13", "{what}: a third process got {got:?} while the waiter held the lock");
            }
        }
    }
}

/// Issue #13: a waiter killed with SIGKILL dies at once (it is not left in D state inside the
/// FUSE request), and the mount then stops cleanly.
#[test]
fn killed_waiter_dies_and_the_mount_unmounts() {
    require_fuse!();
    let mut s = Single::new();
    for kind in KINDS {
        let name = format!("killed-{kind}");
        write(&s.p(&name), b"x");
        let holder = Locker::start(&s.p(&name), kind, false, &[]);
        holder.expect("locked", Duration::from_secs(10));
        let waiter = Locker::start(&s.p(&name), kind, true, &[]);
        assert!(eventually(Duration::from_secs(10), || waiter.in_fuse_request()).is_some(), "{kind}: the waiter never waited");
        unsafe { libc::kill(waiter.pid() as libc::pid_t, libc::SIGKILL) };
        let mut waiter = waiter;
        let died = eventually(Duration::from_secs(3), || matches!(waiter.child.try_wait(), Ok(Some(_))));
        assert!(died.is_some(), "{kind}: a waiter killed with SIGKILL is still there 3 s later (state {:?})", waiter.state());
        drop(holder);
    }
    // Nothing is left busy: the agent stops with exit 0 and the mount is gone.
    s.agent.take().unwrap().stop();
    assert!(!is_mounted(&s.mnt), "mount still there after the agent stopped");
}

/// Issue #13: a waiter interrupted by a signal it catches gets EINTR (its handler runs), and
/// the lock it waited for is not taken behind its back.
#[test]
fn signalled_waiter_gets_eintr() {
    require_fuse!();
    let p = Pair::new("64MiB");
    for kind in KINDS {
        let name = format!("alarm-{kind}");
        write(&p.ma.join(&name), b"x");
        let mut holder = Locker::start(&p.ma.join(&name), kind, false, &[]);
        holder.expect("locked", Duration::from_secs(10));
        let waiter = Locker::start(&p.mb.join(&name), kind, true, &["alarm"]);
        waiter.expect("eintr", Duration::from_secs(10));
        // The holder still holds it, and gives it to the next process once freed.
        holder.tell("unlock");
        holder.expect("unlocked", Duration::from_secs(10));
        let next = Locker::start(&p.mb.join(&name), kind, true, &[]);
        next.expect("locked", Duration::from_secs(10));
    }
}

/// Issue #8: locks survive a server restart (SIGKILL, then SIGTERM). The holder's guest takes
/// them back when it reconnects, and during the grace period nobody else is granted them first:
/// another sandbox's F_SETLK / LOCK_NB fails while the holder holds, and succeeds once it lets go.
#[test]
fn locks_survive_a_server_restart() {
    require_fuse!();
    let mut p = Pair::new("64MiB");
    write(&p.ma.join("posix"), &[0u8; 100]);
    write(&p.ma.join("flock"), b"x");
    let (fa, fb) = (rw(&p.ma.join("posix")), rw(&p.mb.join("posix")));
    let (ga, gb) = (rw(&p.ma.join("flock")), rw(&p.mb.join("flock")));
    let flock = |f: &File, op: i32| cvt(unsafe { libc::flock(f.as_raw_fd(), op) }).map(|_| ());
    setlk(&fa, libc::F_SETLK, libc::F_WRLCK, 10, 20).expect("fcntl lock in A");
    flock(&ga, libc::LOCK_EX | libc::LOCK_NB).expect("flock in A");
    for (round, kill) in [("SIGKILL", true), ("SIGTERM", false)] {
        if kill {
            p.c.kill_server();
            p.c.start_server();
        } else {
            p.c.restart_server();
        }
        // Any request makes each guest reconnect; it reclaims before anything else is sent.
        std::fs::metadata(p.ma.join("posix")).expect("stat in A after the restart");
        std::fs::metadata(p.mb.join("posix")).expect("stat in B after the restart");
        assert_eq!(getlk(&fb, libc::F_WRLCK, 0, 0), (libc::F_WRLCK, 10, 20), "after {round}: F_GETLK in B sees A's reclaimed lock");
        assert_would_block(&format!("after {round}: F_SETLK in B on A's range"), setlk(&fb, libc::F_SETLK, libc::F_WRLCK, 15, 1));
        assert_errno(&format!("after {round}: flock in B"), flock(&gb, libc::LOCK_EX | libc::LOCK_NB), libc::EWOULDBLOCK);
        // B's own unrelated range is not held up once every guest has reclaimed.
        let free = eventually(Duration::from_secs(10), || setlk(&fb, libc::F_SETLK, libc::F_WRLCK, 50, 1).is_ok());
        assert!(free.is_some(), "after {round}: B cannot lock a range nobody holds");
        setlk(&fb, libc::F_SETLK, libc::F_UNLCK, 50, 1).unwrap();
    }
    // A still holds both, and letting go hands them to B.
    setlk(&fa, libc::F_SETLK, libc::F_UNLCK, 10, 20).expect("unlock in A");
    flock(&ga, libc::LOCK_UN).expect("flock unlock in A");
    setlk(&fb, libc::F_SETLK, libc::F_WRLCK, 15, 1).expect("F_SETLK in B after A unlocked");
    flock(&gb, libc::LOCK_EX | libc::LOCK_NB).expect("flock in B after A unlocked");
    assert_would_block("A after B took the range", setlk(&fa, libc::F_SETLK, libc::F_WRLCK, 10, 20));
}

/// Issue #8: a guest that comes back after the grace period and finds its range taken is not
/// told it still holds it: the reclaim fails, and the owner's next lock call on that file fails
/// with EIO (once); its other locks are reclaimed.
#[test]
fn a_lock_taken_during_the_holders_absence_is_reported_lost() {
    require_fuse!();
    let mut c = Cluster::with_server_args(&["--lease-ttl", "2"]);
    c.create_volume("vol", None);
    let (sa, sb) = (c.sandbox("sb-a"), c.sandbox("sb-b"));
    let (ma, mb) = (c.path("mnt-a"), c.path("mnt-b"));
    c.attach("sb-a", "vol", &ma, &[]);
    c.attach("sb-b", "vol", &mb, &[]);
    let agent_a = c.start_agent(&sa, &[&ma]);
    let agent_b = c.start_agent(&sb, &[&mb]);
    write(&ma.join("taken"), b"x");
    write(&ma.join("kept"), b"x");
    // A's locks are held by processes of their own: nothing in this process may have a file of
    // A's mount open while A's agent is stopped (spawning the server would close it, and wait).
    let mut taken = Locker::start(&ma.join("taken"), "posix", false, &[]);
    taken.expect("locked", Duration::from_secs(10));
    let mut kept = Locker::start(&ma.join("kept"), "posix", false, &[]);
    kept.expect("locked", Duration::from_secs(10));
    let (fb, kb) = (rw(&mb.join("taken")), rw(&mb.join("kept")));

    // A's VM is paused across the restart and past the grace period (one lease TTL).
    let signal_a = |sig| unsafe { libc::kill(agent_a.pid() as libc::pid_t, sig) };
    signal_a(libc::SIGSTOP);
    c.kill_server();
    c.start_server();
    let got = eventually(Duration::from_secs(20), || setlk(&fb, libc::F_SETLK, libc::F_WRLCK, 0, 0).is_ok());
    signal_a(libc::SIGCONT);
    assert!(got.is_some(), "B never got the range A could not reclaim in time");

    // A comes back (any request reconnects it; it reclaims first).
    std::fs::metadata(ma.join("taken")).expect("stat in A after it came back");
    taken.tell("trylock");
    taken.expect(&format!("errno {}", libc::EIO), Duration::from_secs(10));
    taken.tell("trylock");
    let again = taken.line(Duration::from_secs(10)).unwrap_or_default();
    assert!(again == "errno 11" || again == "errno 13", "A's lock call after the loss was reported: {again:?}");
    assert_would_block("B on A's other, reclaimed lock", setlk(&kb, libc::F_SETLK, libc::F_WRLCK, 0, 0));
    kept.tell("unlock");
    kept.expect("unlocked", Duration::from_secs(10));
    setlk(&kb, libc::F_SETLK, libc::F_WRLCK, 0, 0).expect("B locks after A unlocked");
    drop((taken, kept, fb, kb));
    agent_b.stop();
    agent_a.stop();
}

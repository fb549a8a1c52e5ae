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

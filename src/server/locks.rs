//! Advisory byte-range locks shared by every sandbox on a volume (fcntl and, through FUSE,
//! flock, which arrives as a whole-file lock owned by the open file).
//!
//! The table lives on the host, so two sandboxes contending for one lock see each other. An
//! owner is (session, guest lock owner). Requests never block here: a conflicting request gets
//! `EAGAIN`, and a guest that wants to wait retries; so a lock can never pin a server thread,
//! and a session that ends (lease expired, detached) simply has its locks dropped.
//!
//! A waiting guest is not left to poll: a request that will wait records the session's
//! interest in the file (at most [`MAX_WAITS_PER_SESSION`] files per session), and every change
//! that frees bytes there (unlock, downgrade, close, session end) returns the interested
//! sessions, which the caller tells with a push. Interest is one-shot: the guest registers it
//! again if its retry conflicts again.

use crate::engine::meta::{LockRow, VolId};
use crate::engine::Engine;
use crate::fs::{FsError, FsResult, Ino};
use crate::proto::Lock;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

#[derive(Clone, Debug)]
struct Held {
    session: u64,
    owner: u64,
    start: u64,
    end: u64,
    typ: i32,
    pid: u32,
}

impl Held {
    fn conflicts(&self, session: u64, l: &Lock) -> bool {
        (self.session, self.owner) != (session, l.owner)
            && self.start <= l.end
            && l.start <= self.end
            && (self.typ == libc::F_WRLCK || l.typ == libc::F_WRLCK)
    }
}

/// Locks one session may hold at once (ranges, after merging its own): a guest cannot grow the
/// table, or the time every lock request of its neighbours takes, without bound.
pub const MAX_LOCKS_PER_SESSION: usize = 4096;

/// Files one session may wait on at once. Past that a waiting request still gets `EAGAIN` but
/// no push (the guest falls back to retrying on a timer), so a guest cannot grow the table.
pub const MAX_WAITS_PER_SESSION: usize = 1024;

/// Sessions to tell that locks were freed on a file: `((volume, inode), sessions)`.
pub type Freed = Vec<((VolId, Ino), Vec<u64>)>;

#[derive(Default)]
struct Tables {
    files: HashMap<(VolId, Ino), Vec<Held>>,
    /// Ranges held per session, for the limit.
    per_session: HashMap<u64, usize>,
    /// Sessions waiting for a lock on a file, to be told when something there is freed.
    waiting: HashMap<(VolId, Ino), HashSet<u64>>,
    /// Files each session waits on, for the limit.
    waits_per_session: HashMap<u64, usize>,
}

impl Tables {
    /// Takes the interest registered on a file (it is one-shot).
    fn take_waiters(&mut self, key: (VolId, Ino)) -> Vec<u64> {
        let Some(set) = self.waiting.remove(&key) else { return Vec::new() };
        for s in &set {
            if let Some(c) = self.waits_per_session.get_mut(s) {
                *c -= 1;
                if *c == 0 {
                    self.waits_per_session.remove(s);
                }
            }
        }
        set.into_iter().collect()
    }

    fn add_waiter(&mut self, key: (VolId, Ino), session: u64) {
        if self.waiting.get(&key).is_some_and(|s| s.contains(&session)) {
            return;
        }
        let count = self.waits_per_session.entry(session).or_insert(0);
        if *count >= MAX_WAITS_PER_SESSION {
            tracing::warn!(session, limit = MAX_WAITS_PER_SESSION, "limit hit: files waited on per session (the guest polls instead)");
            return;
        }
        *count += 1;
        self.waiting.entry(key).or_default().insert(session);
    }
}

#[derive(Default)]
pub struct LockTable {
    tables: Mutex<Tables>,
}

/// The other servers sharing this server's store (see [`Engine::shared`]): each server
/// publishes the locks held through it, in the store, in the same transaction as it checks the
/// others' (serializable: two servers cannot both win one range). A server not seen for `ttl`
/// (its heartbeat stopped: it died) no longer holds anything. A guest waiting on a lock held
/// through another server is pushed when that server announces that it freed bytes of the
/// file (a dead server's locks expire unannounced: its guests retry on their timer).
pub struct Remote<'a> {
    pub engine: &'a Engine,
    /// This server's id in the store (kept across restarts: DATA/server-id).
    pub server: &'a str,
    pub ttl: std::time::Duration,
}

fn row(h: &Held) -> LockRow {
    LockRow { owner: h.owner, start: h.start, end: h.end, typ: h.typ, pid: h.pid }
}

impl Remote<'_> {
    /// Publishes the locks now held on a file (with `freed`, bytes were freed: the other
    /// servers are told); a failure is logged (the next change of the
    /// file's locks publishes them again, and a dead server's go with it).
    fn publish(&self, vol: VolId, ino: Ino, held: Option<&Vec<Held>>, freed: bool) {
        let rows: Vec<LockRow> = held.map(|h| h.iter().map(row).collect()).unwrap_or_default();
        if let Err(e) = self.engine.publish_locks(self.server, self.ttl, vol, ino, &rows, None, freed) {
            tracing::error!(vol, ino, "publishing locks to the shared store: {e}");
        }
    }
}

impl LockTable {
    /// The sessions waiting on a file where another server freed locked bytes (one-shot, as
    /// every wait).
    pub fn freed_elsewhere(&self, vol: VolId, ino: Ino) -> Vec<u64> {
        self.tables.lock().unwrap().take_waiters((vol, ino))
    }

    /// Publishes every lock held through this server again (after a heartbeat found that the
    /// others may have forgotten this server).
    pub fn republish(&self, remote: &Remote) {
        // Under the table's lock, as every publication: a change meanwhile cannot be overwritten
        // by an older picture.
        let t = self.tables.lock().unwrap();
        for ((vol, ino), held) in &t.files {
            remote.publish(*vol, *ino, Some(held), false);
        }
    }

    /// The first lock of another owner that conflicts with `l`.
    pub fn test(&self, vol: VolId, ino: Ino, session: u64, l: &Lock, remote: Option<&Remote>) -> FsResult<Lock> {
        let t = self.tables.lock().unwrap();
        if let Some(h) = t.files.get(&(vol, ino)).and_then(|v| v.iter().find(|h| h.conflicts(session, l))) {
            return Ok(Lock { owner: h.owner, start: h.start, end: h.end, typ: h.typ, pid: h.pid });
        }
        if let (Some(r), true) = (remote, l.typ != libc::F_UNLCK) {
            let want = LockRow { owner: l.owner, start: l.start, end: l.end, typ: l.typ, pid: l.pid };
            if let Some(h) = r.engine.remote_lock(r.server, r.ttl, vol, ino, &want)? {
                return Ok(Lock { owner: h.owner, start: h.start, end: h.end, typ: h.typ, pid: h.pid });
            }
        }
        Ok(Lock { typ: libc::F_UNLCK, ..l.clone() })
    }

    /// Takes (`F_RDLCK`/`F_WRLCK`) or releases (`F_UNLCK`) a range; `EAGAIN` on conflict.
    /// Returns the sessions to tell that bytes were freed (see [`LockTable::set_or_wait`]).
    pub fn set(&self, vol: VolId, ino: Ino, session: u64, l: &Lock, remote: Option<&Remote>) -> FsResult<Vec<u64>> {
        self.set_or_wait(vol, ino, session, l, false, remote)
    }

    /// [`LockTable::set`]; with `wait`, a conflict also records that `session` waits on the
    /// file, in the same critical section as the check, so no release in between is missed.
    /// On success, returns the sessions waiting on the file if this freed bytes there (an
    /// unlock or a downgrade of a range the owner held).
    pub fn set_or_wait(&self, vol: VolId, ino: Ino, session: u64, l: &Lock, wait: bool, remote: Option<&Remote>) -> FsResult<Vec<u64>> {
        if l.start > l.end {
            return Err(FsError::new(libc::EINVAL, "lock range ends before it starts"));
        }
        if ![libc::F_RDLCK, libc::F_WRLCK, libc::F_UNLCK].contains(&l.typ) {
            return Err(FsError::new(libc::EINVAL, format!("lock type {} is none of F_RDLCK, F_WRLCK, F_UNLCK", l.typ)));
        }
        let mut t = self.tables.lock().unwrap();
        let conflict = t.files.get(&(vol, ino)).and_then(|held| held.iter().find(|h| h.conflicts(session, l)).cloned());
        if let (true, Some(h)) = (l.typ != libc::F_UNLCK, conflict) {
            if wait {
                t.add_waiter((vol, ino), session);
            }
            return Err(FsError::new(libc::EAGAIN, format!("bytes {}-{} are locked by another owner (pid {})", h.start, h.end, h.pid)));
        }
        let Tables { files, per_session, .. } = &mut *t;
        let held = files.entry((vol, ino)).or_default();
        // Cut the owner's existing locks out of the range, then add the new one: this gives
        // POSIX replace, upgrade, downgrade and split semantics.
        let mine = |h: &Held| (h.session, h.owner) == (session, l.owner);
        let before = held.iter().filter(|h| mine(h)).count();
        let frees = l.typ != libc::F_WRLCK && held.iter().any(|h| mine(h) && h.start <= l.end && l.start <= h.end);
        let mut kept = Vec::with_capacity(held.len() + 1);
        for h in held.iter().cloned() {
            let mine = (h.session, h.owner) == (session, l.owner);
            if !mine || h.end < l.start || h.start > l.end {
                kept.push(h);
                continue;
            }
            if h.start < l.start {
                kept.push(Held { end: l.start - 1, ..h.clone() });
            }
            if h.end > l.end {
                kept.push(Held { start: l.end + 1, ..h.clone() });
            }
        }
        if l.typ != libc::F_UNLCK {
            kept.push(Held { session, owner: l.owner, start: l.start, end: l.end, typ: l.typ, pid: l.pid });
        }
        let after = kept.iter().filter(|h| mine(h)).count();
        let count = per_session.entry(session).or_insert(0);
        if after > before && *count + after - before > MAX_LOCKS_PER_SESSION {
            tracing::warn!(session, limit = MAX_LOCKS_PER_SESSION, "limit hit: locks per session");
            if held.is_empty() {
                files.remove(&(vol, ino));
            }
            return Err(FsError::new(libc::ENOLCK, format!("this mount session holds {MAX_LOCKS_PER_SESSION} locks, the most allowed")));
        }
        if let Some(r) = remote {
            // The others' locks, checked and ours published in one transaction.
            let rows: Vec<LockRow> = kept.iter().map(row).collect();
            let want = (l.typ != libc::F_UNLCK).then_some(LockRow { owner: l.owner, start: l.start, end: l.end, typ: l.typ, pid: l.pid });
            if let Some(h) = r.engine.publish_locks(r.server, r.ttl, vol, ino, &rows, want.as_ref(), frees)? {
                if held.is_empty() {
                    files.remove(&(vol, ino));
                }
                if wait {
                    // Told when the other server frees bytes there (its announcement).
                    t.add_waiter((vol, ino), session);
                }
                return Err(FsError::new(
                    libc::EAGAIN,
                    format!("bytes {}-{} are locked by another owner through another server (pid {})", h.start, h.end, h.pid),
                ));
            }
        }
        *count = *count + after - before;
        if kept.is_empty() {
            files.remove(&(vol, ino));
        } else {
            *held = kept;
        }
        Ok(if frees { t.take_waiters((vol, ino)) } else { Vec::new() })
    }

    /// Drops every lock of one owner on one file (close of a descriptor, flock release);
    /// returns the sessions to tell if anything was freed.
    pub fn release_owner(&self, vol: VolId, ino: Ino, session: u64, owner: u64, remote: Option<&Remote>) -> Vec<u64> {
        let mut t = self.tables.lock().unwrap();
        let Tables { files, per_session, .. } = &mut *t;
        let mut freed = false;
        if let Some(held) = files.get_mut(&(vol, ino)) {
            let n = held.len();
            held.retain(|h| (h.session, h.owner) != (session, owner));
            freed = held.len() < n;
            if let Some(c) = per_session.get_mut(&session) {
                *c -= n - held.len();
            }
            if held.is_empty() {
                files.remove(&(vol, ino));
            }
        }
        if let (Some(r), true) = (remote, freed) {
            r.publish(vol, ino, files.get(&(vol, ino)), true);
        }
        if freed {
            t.take_waiters((vol, ino))
        } else {
            Vec::new()
        }
    }

    /// Drops every lock a session holds, and its waits (its lease ended); returns, per file
    /// where locks were freed, the sessions to tell.
    pub fn release_session(&self, session: u64, remote: Option<&Remote>) -> Freed {
        let mut t = self.tables.lock().unwrap();
        let mut freed = Vec::new();
        t.files.retain(|key, held| {
            let n = held.len();
            held.retain(|h| h.session != session);
            if held.len() < n {
                freed.push(*key);
            }
            !held.is_empty()
        });
        if let Some(r) = remote {
            for key in &freed {
                r.publish(key.0, key.1, t.files.get(key), true);
            }
        }
        t.per_session.remove(&session);
        t.waiting.retain(|_, set| {
            set.remove(&session);
            !set.is_empty()
        });
        t.waits_per_session.remove(&session);
        freed.into_iter().map(|key| (key, t.take_waiters(key))).filter(|(_, s)| !s.is_empty()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lk(owner: u64, start: u64, end: u64, typ: i32) -> Lock {
        Lock { owner, start, end, typ, pid: owner as u32 }
    }

    #[test]
    fn posix_range_semantics() {
        let t = LockTable::default();
        t.set(1, 5, 1, &lk(1, 0, 99, libc::F_WRLCK), None).unwrap();
        // Another session conflicts; a reader does too; disjoint ranges do not.
        assert_eq!(t.set(1, 5, 2, &lk(1, 50, 60, libc::F_RDLCK), None).unwrap_err().errno, libc::EAGAIN);
        t.set(1, 5, 2, &lk(1, 100, 200, libc::F_WRLCK), None).unwrap();
        assert_eq!(t.test(1, 5, 2, &lk(1, 10, 10, libc::F_RDLCK), None).unwrap().typ, libc::F_WRLCK);
        // Unlocking the middle splits the range; the hole is free for others.
        t.set(1, 5, 1, &lk(1, 40, 59, libc::F_UNLCK), None).unwrap();
        t.set(1, 5, 2, &lk(9, 45, 50, libc::F_WRLCK), None).unwrap();
        assert_eq!(t.set(1, 5, 2, &lk(9, 30, 30, libc::F_RDLCK), None).unwrap_err().errno, libc::EAGAIN);
        // Downgrade to shared lets other readers in, not writers.
        t.set(1, 5, 1, &lk(1, 0, 39, libc::F_RDLCK), None).unwrap();
        t.set(1, 5, 3, &lk(4, 0, 10, libc::F_RDLCK), None).unwrap();
        assert_eq!(t.set(1, 5, 3, &lk(5, 0, 10, libc::F_WRLCK), None).unwrap_err().errno, libc::EAGAIN);
        // A session that ends drops its locks.
        t.release_session(1, None);
        t.release_session(3, None);
        t.set(1, 5, 3, &lk(5, 0, 10, libc::F_WRLCK), None).unwrap();
        t.release_owner(1, 5, 3, 5, None);
        assert_eq!(t.test(1, 5, 7, &lk(1, 0, 10, libc::F_WRLCK), None).unwrap().typ, libc::F_UNLCK);
    }

    /// A conflicting request that will wait is told once when the holder frees bytes (unlock,
    /// downgrade, close, session end), not when the holder only takes more; interest is bounded.
    #[test]
    fn waiters_are_told_when_bytes_are_freed() {
        let t = LockTable::default();
        t.set(1, 5, 1, &lk(1, 0, 99, libc::F_WRLCK), None).unwrap();
        assert_eq!(t.set_or_wait(1, 5, 2, &lk(1, 0, 0, libc::F_WRLCK), true, None).unwrap_err().errno, libc::EAGAIN);
        assert_eq!(t.set_or_wait(1, 5, 3, &lk(1, 0, 0, libc::F_RDLCK), false, None).unwrap_err().errno, libc::EAGAIN);
        assert!(t.set(1, 5, 1, &lk(1, 200, 300, libc::F_WRLCK), None).unwrap().is_empty(), "taking more frees nothing");
        assert_eq!(t.set(1, 5, 1, &lk(1, 0, 99, libc::F_RDLCK), None).unwrap(), vec![2], "a downgrade tells the waiter, only it");
        assert!(t.set(1, 5, 1, &lk(1, 0, 99, libc::F_UNLCK), None).unwrap().is_empty(), "interest is one-shot");
        assert_eq!(t.set_or_wait(1, 5, 2, &lk(1, 200, 200, libc::F_WRLCK), true, None).unwrap_err().errno, libc::EAGAIN);
        assert_eq!(t.release_owner(1, 5, 1, 1, None), vec![2], "close tells the waiter");
        t.set(1, 6, 1, &lk(1, 0, 0, libc::F_WRLCK), None).unwrap();
        assert!(t.set_or_wait(1, 6, 2, &lk(2, 0, 0, libc::F_WRLCK), true, None).is_err());
        assert_eq!(t.release_session(1, None), vec![((1, 6), vec![2])], "session end tells the waiter");
        // A session waits on at most MAX_WAITS_PER_SESSION files; its end drops its interest.
        for i in 0..MAX_WAITS_PER_SESSION as u64 + 10 {
            t.set(1, 100 + i, 7, &lk(1, 0, 0, libc::F_WRLCK), None).unwrap();
            assert!(t.set_or_wait(1, 100 + i, 8, &lk(1, 0, 0, libc::F_WRLCK), true, None).is_err());
        }
        assert_eq!(t.tables.lock().unwrap().waiting.len(), MAX_WAITS_PER_SESSION);
        t.release_session(8, None);
        assert!(t.tables.lock().unwrap().waiting.is_empty());
        assert!(t.release_session(7, None).is_empty());
    }

    /// A session may hold MAX_LOCKS_PER_SESSION ranges; one more is ENOLCK and changes nothing,
    /// unlocking or merging always works, and releases give the room back.
    #[test]
    fn locks_per_session_are_bounded() {
        let t = LockTable::default();
        for i in 0..MAX_LOCKS_PER_SESSION as u64 {
            t.set(1, 5 + i % 3, 1, &lk(1, i * 10, i * 10, libc::F_WRLCK), None).unwrap();
        }
        let over = lk(1, 1_000_000, 1_000_000, libc::F_WRLCK);
        assert_eq!(t.set(1, 5, 1, &over, None).unwrap_err().errno, libc::ENOLCK);
        assert_eq!(t.test(1, 5, 2, &over, None).unwrap().typ, libc::F_UNLCK, "the refused lock was not taken");
        // Another session is not affected.
        t.set(1, 5, 2, &over, None).unwrap();
        // Replacing one of its own ranges (same count) and unlocking still work.
        t.set(1, 5, 1, &lk(1, 0, 0, libc::F_RDLCK), None).unwrap();
        t.set(1, 5, 1, &lk(1, 0, 0, libc::F_UNLCK), None).unwrap();
        t.set(1, 5, 1, &lk(1, 1, 1, libc::F_WRLCK), None).unwrap();
        assert_eq!(t.set(1, 5, 1, &lk(1, 2, 2, libc::F_WRLCK), None).unwrap_err().errno, libc::ENOLCK);
        t.release_owner(1, 6, 1, 1, None);
        t.set(1, 5, 1, &lk(1, 2, 2, libc::F_WRLCK), None).unwrap();
        t.release_session(1, None);
        t.set(1, 5, 1, &lk(1, 3, 3, libc::F_WRLCK), None).unwrap();
    }
}

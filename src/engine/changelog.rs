//! The change log: every namespace, data and attribute change of a volume, recorded by the engine
//! in the metadata transaction that makes it, so that a watcher (the HTTP API's `watch`) sees
//! changes made through FUSE by guests as well as through the API, and a reconnecting watcher
//! resumes from the last id it saw.
//!
//! What is recorded, per operation:
//! - create, mknod, mkdir, symlink, link: one `Create` of the new name;
//! - unlink, rmdir: one `Delete` of the removed name;
//! - rename: one `Move { from, to }`; a rename that replaces a name logs the `Delete` of the
//!   replaced name first (so a consumer keyed by path never has to infer the replacement);
//!   `RENAME_EXCHANGE` logs two moves with consecutive ids (`a` to `b`, then `b` to `a`): they are
//!   one atomic swap, not two renames to apply in turn; a rename that changes nothing (two names of
//!   one inode) logs nothing;
//! - write, setattr (mode, owner, size, times), setxattr, removexattr: one `Modify`.
//!
//! **Paths are computed when the change is made**, from the directory chain inside the same
//! transaction, and stored as bytes. A path resolved when the log is read would be the name's
//! path now, not then: after `mv a b`, an old `create a/x` would read as `create b/x`, and the
//! events of a deleted directory would not resolve at all. The cost is one indexed lookup per
//! directory level, in a transaction that holds the write lock anyway. A `Modify` is logged under
//! the inode's oldest name (a hard-linked file has several; inotify, too, reports a change under
//! one name); a change to an inode with no name left (unlinked while open) is not logged: no path
//! can see it.
//!
//! **Writes are coalesced.** A file written in many chunks would otherwise log one row per write
//! call. When the newest row of the volume's log is already a `Modify` of the same inode, nothing
//! else happened in the volume since, so that row already says what a new one would (same path),
//! and the new change is folded into it:
//! - if no reader can have seen that row yet, nothing is written at all (the row keeps the time
//!   of the first change of the run): the common case, a file written in chunks with nobody
//!   watching or a watcher that has not caught up, costs one indexed read and no page write;
//! - if a reader may have seen it (it was handed out by [`Engine::changes`] or
//!   [`Engine::last_change_id`], or logged before this engine started), the row is *replaced*:
//!   deleted and inserted again with a new id and time. Skipping here would be wrong: a watcher
//!   that has read the row would never hear of the later writes.
//!
//! So a change always ends up in a row with an id greater than any id a reader has been given,
//! and a run of writes occupies one row. (Deciding "seen" relies on the store running
//! transactions one at a time, as SQLite does: a reader's transaction and a writer's do not
//! interleave.)
//!
//! **Retention** keeps the newest [`ChangeRetention::keep`] rows per volume (100 000 by default).
//! Pruning runs inside a logging transaction, once per [`ChangeRetention::prune_every`] rows the
//! volume logged since its last pruning (and at its first change after the engine starts), so a
//! log holds at most `keep + prune_every` rows. The largest pruned id is remembered per volume:
//! [`Changes::truncated`] tells a caller resuming from an older id that it missed events.
//! Deleting a volume deletes its log.
//!
//! **Waiting** for new changes uses a [`ChangeNotifier`]: a generation counter moved after the
//! commit of every transaction that logged something (and after a volume is deleted), and a
//! condition variable. Read the generation *before* reading the log, so that a change committed
//! in between is not slept through:
//!
//! ```ignore
//! let n = engine.change_notifier();
//! loop {
//!     let g = n.generation();
//!     let page = engine.changes(vol, after, 1000)?;
//!     if page.events.is_empty() {
//!         n.wait_newer_than(g, Duration::from_secs(15)); // then send a keep-alive, or loop
//!         continue;
//!     }
//!     after = page.events.last().unwrap().id;
//!     // send page.events
//! }
//! ```

use super::meta::{Change, ChangeKind, ChangeRow, Changes, MetaTxn, VolId};
use super::Engine;
use crate::fs::{FsError, FsResult, Ino, Kind, Timespec, ROOT_INO};
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How much of each volume's change log is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeRetention {
    /// Rows kept per volume (at least 1).
    pub keep: u64,
    /// Rows a volume logs between two prunings (at least 1).
    pub prune_every: u64,
}

impl Default for ChangeRetention {
    fn default() -> ChangeRetention {
        ChangeRetention { keep: 100_000, prune_every: 1000 }
    }
}

/// Largest page [`Engine::changes`] returns.
pub const MAX_CHANGES_PAGE: usize = 10_000;

/// Wakes whoever waits for new changes (see the module documentation). Clones share the state.
#[derive(Clone, Default)]
pub struct ChangeNotifier {
    inner: Arc<(Mutex<Generation>, Condvar)>,
}

#[derive(Default)]
struct Generation {
    current: u64,
    /// Threads in `wait_newer_than`: with none, a change costs no wake-up call.
    waiters: usize,
}

impl ChangeNotifier {
    /// The current generation: it grows after every commit that logged a change.
    pub fn generation(&self) -> u64 {
        self.inner.0.lock().unwrap_or_else(|p| p.into_inner()).current
    }

    /// Sleeps until the generation is greater than `generation` or `timeout` passes; returns the
    /// generation then (equal to `generation` on a timeout).
    pub fn wait_newer_than(&self, generation: u64, timeout: Duration) -> u64 {
        let (lock, cv) = &*self.inner;
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        g.waiters += 1;
        let (mut g, _) = cv.wait_timeout_while(g, timeout, |g| g.current <= generation).unwrap_or_else(|p| p.into_inner());
        g.waiters -= 1;
        g.current
    }

    fn bump(&self) {
        let (lock, cv) = &*self.inner;
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        g.current += 1;
        if g.waiters > 0 {
            cv.notify_all();
        }
    }
}

/// The engine's change log state.
#[derive(Default)]
pub(super) struct ChangeLog {
    notifier: ChangeNotifier,
    retention: ChangeRetention,
    state: Mutex<LogState>,
}

#[derive(Default)]
struct LogState {
    /// Rows each volume logged since its last pruning; absent: not pruned since the engine
    /// started (so due at its next change).
    since_prune: HashMap<VolId, u64>,
    /// Per volume, the largest id a reader has been given (or has said it has).
    seen: HashMap<VolId, u64>,
    /// The id before the first row this engine logged: rows up to it were logged by an earlier
    /// run, and a reader may have seen them then. `None` until this engine logs a row.
    floor: Option<u64>,
}

impl LogState {
    /// Whether a reader may have been given row `id` of `vol`.
    fn maybe_seen(&self, vol: VolId, id: u64) -> bool {
        self.floor.is_none_or(|f| id <= f) || self.seen.get(&vol).is_some_and(|s| id <= *s)
    }
}

/// A change an operation makes, recorded by [`Engine::mutate`] at the end of its transaction.
pub(super) enum Event {
    /// A name made (`Create`) or removed (`Delete`): `name` in directory `dir`.
    Name { kind: ChangeKind, node: Kind, ino: Ino, dir: Ino, name: Vec<u8> },
    /// A name moved from `name` in `dir` to `new_name` in `new_dir`.
    Move { node: Kind, ino: Ino, dir: Ino, name: Vec<u8>, new_dir: Ino, new_name: Vec<u8> },
    /// The data or attributes of `ino` changed.
    Modify { node: Kind, ino: Ino },
}

impl Event {
    pub(super) fn name(kind: ChangeKind, node: Kind, ino: Ino, dir: Ino, name: &[u8]) -> Event {
        Event::Name { kind, node, ino, dir, name: name.to_vec() }
    }
}

/// What other servers sharing the store are told of a transaction's changes (see
/// [`parse_announcement`]): `ORIGIN VOL` then `i<ino>` for each inode whose data or
/// attributes changed and `e<dir>:<hex name>` for each name made, removed or moved (and, in
/// an announcement of its own, `l<ino>` for a file whose locked bytes were freed). Names are
/// at most 255 bytes and a transaction changes a handful, so this stays far under PostgreSQL's
/// 8000 bytes.
pub(super) fn announcement(origin: &str, vol: VolId, events: &[Event]) -> String {
    let mut s = format!("{origin} {vol}");
    let hex = |n: &[u8]| n.iter().map(|b| format!("{b:02x}")).collect::<String>();
    for ev in events {
        match ev {
            Event::Name { ino, dir, name, .. } => s += &format!(" i{ino} i{dir} e{dir}:{}", hex(name)),
            Event::Move { ino, dir, name, new_dir, new_name, .. } => {
                s += &format!(" i{ino} i{dir} i{new_dir} e{dir}:{} e{new_dir}:{}", hex(name), hex(new_name))
            }
            Event::Modify { ino, .. } => s += &format!(" i{ino}"),
        }
    }
    s
}

/// The announcement that server `origin` freed locked bytes of file `ino`.
pub(super) fn locks_freed(origin: &str, vol: VolId, ino: Ino) -> String {
    format!("{origin} {vol} l{ino}")
}

/// A change another server announced: its origin, the volume, the inodes and the names, and
/// the files where it freed locked bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announced {
    pub origin: String,
    pub vol: VolId,
    pub inodes: Vec<Ino>,
    pub names: Vec<(Ino, Vec<u8>)>,
    pub locks: Vec<Ino>,
}

/// Reads an [`announcement`]; `None` for anything else (another version's, a stranger's).
pub fn parse_announcement(s: &str) -> Option<Announced> {
    let mut words = s.split(' ');
    let origin = words.next()?.to_string();
    let vol = words.next()?.parse().ok()?;
    let mut a = Announced { origin, vol, inodes: Vec::new(), names: Vec::new(), locks: Vec::new() };
    for w in words {
        if let Some(i) = w.strip_prefix('i') {
            a.inodes.push(i.parse().ok()?);
        } else if let Some(i) = w.strip_prefix('l') {
            a.locks.push(i.parse().ok()?);
        } else if let Some(e) = w.strip_prefix('e') {
            let (dir, hex) = e.split_once(':')?;
            if hex.len() % 2 != 0 {
                return None;
            }
            let name = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok()).collect::<Option<Vec<u8>>>()?;
            a.names.push((dir.parse().ok()?, name));
        } else {
            return None;
        }
    }
    a.inodes.sort_unstable();
    a.inodes.dedup();
    Some(a)
}

/// The path of `ino` from the volume root through its oldest names, or `None` if some inode on
/// the way has no name.
fn path_of(t: &mut dyn MetaTxn, vol: VolId, ino: Ino) -> FsResult<Option<Vec<u8>>> {
    let mut names = Vec::new();
    let mut cur = ino;
    for _ in 0..4096 {
        if cur == ROOT_INO {
            let mut path = Vec::with_capacity(names.iter().map(|n: &Vec<u8>| n.len() + 1).sum::<usize>().max(1));
            for n in names.iter().rev() {
                path.push(b'/');
                path.extend_from_slice(n);
            }
            if path.is_empty() {
                path.push(b'/');
            }
            return Ok(Some(path));
        }
        match t.name_of(vol, cur)? {
            Some((parent, name)) => {
                names.push(name);
                cur = parent;
            }
            None => return Ok(None),
        }
    }
    Err(FsError::new(libc::ELOOP, "directory tree too deep"))
}

/// Directory paths already looked up in this transaction (a rename names one or two
/// directories up to three times).
#[derive(Default)]
struct DirPaths(Vec<(Ino, Option<Vec<u8>>)>);

impl DirPaths {
    /// The path of `name` in directory `dir`.
    fn path_in(&mut self, t: &mut dyn MetaTxn, vol: VolId, dir: Ino, name: &[u8]) -> FsResult<Option<Vec<u8>>> {
        let known = self.0.iter().find(|(d, _)| *d == dir).map(|(_, p)| p.clone());
        let dir_path = match known {
            Some(p) => p,
            None => {
                let p = path_of(t, vol, dir)?;
                self.0.push((dir, p.clone()));
                p
            }
        };
        Ok(dir_path.map(|mut p| {
            if p != b"/" {
                p.push(b'/');
            }
            p.extend_from_slice(name);
            p
        }))
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// What one transaction did to the log.
#[derive(Default)]
struct Logged {
    /// Rows inserted (replacements included): watchers have something new.
    inserted: u64,
    /// Rows the log grew by.
    added: u64,
    pruned: bool,
}

impl Engine {
    /// Runs a mutation of volume `vol` in one metadata transaction; the events it pushes are
    /// written to the change log in the same transaction, and watchers are woken after commit.
    pub(super) fn mutate<T: super::Recorded>(
        &self,
        vol: VolId,
        mut f: impl FnMut(&mut dyn MetaTxn, &mut Vec<Event>) -> FsResult<T>,
    ) -> FsResult<T> {
        let tag = super::replay_tag();
        let (out, logged) = self.tx(|t| {
            if self.shared() {
                // Ids come from a sequence at insert, not at commit: without this, two servers'
                // transactions on one volume could commit their ids out of order, and a reader
                // that had the later one would never see the earlier. Taken first, so that
                // every mutation takes the volume's row before any other (no deadlock between
                // servers locking an inode and the volume in opposite orders).
                t.lock_volume(vol)?;
            }
            let mut events = Vec::new();
            let out = f(t, &mut events)?;
            super::record_replay(t, tag, &out)?;
            super::tell_observer(t, vol, &events, &|a| self.with_held(vol, a))?;
            if let Some(origin) = self.origin() {
                if !events.is_empty() {
                    t.announce(&announcement(origin, vol, &events))?;
                }
            }
            let logged = if events.is_empty() { Logged::default() } else { self.log_events(t, vol, events)? };
            Ok((out, logged))
        })?;
        // Only the first mutation of a request records (and only once it committed).
        if tag.is_some() {
            super::consume_replay_tag();
        }
        if logged.pruned || logged.added > 0 {
            let mut st = self.changelog.state.lock().unwrap();
            let n = st.since_prune.entry(vol).or_insert(0);
            *n = if logged.pruned { 0 } else { *n + logged.added };
        }
        if logged.inserted > 0 {
            self.changelog.notifier.bump();
        }
        Ok(out)
    }

    fn log_events(&self, t: &mut dyn MetaTxn, vol: VolId, events: Vec<Event>) -> FsResult<Logged> {
        let time = Timespec::now();
        let mut logged = Logged::default();
        let mut dirs = DirPaths::default();
        for ev in events {
            let row = match ev {
                Event::Name { kind, node, ino, dir, name } => {
                    let Some(path) = dirs.path_in(t, vol, dir, &name)? else { continue };
                    ChangeRow { id: 0, kind, node, ino, path, from: None, time }
                }
                Event::Move { node, ino, dir, name, new_dir, new_name } => {
                    let (Some(from), Some(path)) = (dirs.path_in(t, vol, dir, &name)?, dirs.path_in(t, vol, new_dir, &new_name)?) else {
                        continue;
                    };
                    ChangeRow { id: 0, kind: ChangeKind::Move, node, ino, path, from: Some(from), time }
                }
                // With a shared store another server's reader may have seen the last row: no
                // folding there (a reader knows only what this server handed out).
                Event::Modify { node, ino } => match if self.shared() { None } else { t.last_change(vol)? } {
                    Some(last) if last.kind == ChangeKind::Modify && last.ino == ino => {
                        // A run of changes to one inode (see the module docs): fold this one
                        // into the row, replacing it if a reader may have seen it.
                        if self.changelog.state.lock().unwrap().maybe_seen(vol, last.id) {
                            t.delete_change(vol, last.id)?;
                            self.insert_change(t, vol, &ChangeRow { time, ..last })?;
                            logged.inserted += 1;
                        }
                        continue;
                    }
                    _ => {
                        let Some(path) = path_of(t, vol, ino)? else { continue };
                        ChangeRow { id: 0, kind: ChangeKind::Modify, node, ino, path, from: None, time }
                    }
                },
            };
            self.insert_change(t, vol, &row)?;
            logged.inserted += 1;
            logged.added += 1;
        }
        let r = self.changelog.retention;
        let due = self.changelog.state.lock().unwrap().since_prune.get(&vol).is_none_or(|n| n + logged.added >= r.prune_every);
        if logged.added > 0 && due {
            t.prune_changes(vol, r.keep)?;
            logged.pruned = true;
        }
        Ok(logged)
    }

    fn insert_change(&self, t: &mut dyn MetaTxn, vol: VolId, row: &ChangeRow) -> FsResult<()> {
        let id = t.insert_change(vol, row)?;
        // Ids only grow: everything before this engine's first row is from an earlier run. (If
        // this transaction rolls back, the floor is merely a little high: more replacing.)
        self.changelog.state.lock().unwrap().floor.get_or_insert(id.saturating_sub(1));
        Ok(())
    }

    /// Records that a reader of `vol` has been given ids up to `id`.
    fn hand_out(&self, vol: VolId, id: u64) {
        let mut st = self.changelog.state.lock().unwrap();
        let seen = st.seen.entry(vol).or_insert(0);
        *seen = id.max(*seen);
    }

    /// Sets how much of each volume's log is kept (default: [`ChangeRetention::default`]).
    pub fn with_change_retention(mut self, r: ChangeRetention) -> Engine {
        self.changelog.retention = ChangeRetention { keep: r.keep.max(1), prune_every: r.prune_every.max(1) };
        self
    }

    /// The volume's changes with ids greater than `after`, oldest first, at most `limit` (and at
    /// most [`MAX_CHANGES_PAGE`]). `truncated` says that changes after `after` were pruned.
    pub fn changes(&self, vol: VolId, after: u64, limit: usize) -> FsResult<Changes> {
        let limit = limit.clamp(1, MAX_CHANGES_PAGE) as u32;
        self.tx(|t| {
            t.volume_by_id(vol)?.ok_or_else(|| FsError::new(libc::ENOENT, format!("volume #{vol} not found")))?;
            let truncated = after < t.changes_pruned_through(vol)?;
            let rows = t.list_changes(vol, after, limit)?;
            // Inside the transaction: no write can fold itself into a row between our reading
            // it and this (see the module docs). `after` counts as seen too: whatever the caller
            // claims to have, a later change must get a greater id.
            self.hand_out(vol, rows.last().map_or(after, |r| r.id.max(after)));
            let events = rows
                .into_iter()
                .map(|r| Change {
                    id: r.id,
                    kind: r.kind,
                    path: lossy(&r.path),
                    from: r.from.as_deref().map(lossy),
                    node: r.node,
                    time: r.time,
                })
                .collect();
            Ok(Changes { events, truncated })
        })
    }

    /// The id of the volume's newest change (0 if it has none): a watcher that wants only what
    /// happens from now on asks for the changes after it.
    pub fn last_change_id(&self, vol: VolId) -> FsResult<u64> {
        self.tx(|t| {
            t.volume_by_id(vol)?.ok_or_else(|| FsError::new(libc::ENOENT, format!("volume #{vol} not found")))?;
            let id = t.last_change(vol)?.map_or(0, |r| r.id);
            self.hand_out(vol, id);
            Ok(id)
        })
    }

    /// A handle to wait for new changes of any volume with.
    pub fn change_notifier(&self) -> ChangeNotifier {
        self.changelog.notifier.clone()
    }

    /// Forgets a deleted volume and wakes its watchers: their next read fails.
    pub(super) fn forget_volume_log(&self, vol: VolId) {
        let mut st = self.changelog.state.lock().unwrap();
        st.since_prune.remove(&vol);
        st.seen.remove(&vol);
        drop(st);
        self.changelog.notifier.bump();
    }
}

#[cfg(test)]
mod announcement_tests {
    use super::*;

    #[test]
    fn announcements_read_back_and_strangers_are_refused() {
        let events = vec![
            Event::name(ChangeKind::Create, Kind::File, 12, 1, b"a b\xff"),
            Event::Move { node: Kind::Dir, ino: 13, dir: 1, name: b"x".to_vec(), new_dir: 12, new_name: b"y".to_vec() },
            Event::Modify { node: Kind::File, ino: 12 },
        ];
        let s = announcement("srv1", 7, &events);
        let a = parse_announcement(&s).unwrap();
        assert_eq!((a.origin.as_str(), a.vol), ("srv1", 7));
        assert_eq!(a.inodes, vec![1, 12, 13]);
        assert_eq!(a.names, vec![(1, b"a b\xff".to_vec()), (1, b"x".to_vec()), (12, b"y".to_vec())]);
        let a = parse_announcement(&locks_freed("srv2", 3, 40)).unwrap();
        assert_eq!((a.origin.as_str(), a.vol, a.locks, a.inodes.len()), ("srv2", 3, vec![40], 0));
        for bad in ["", "srv", "srv x", "srv 1 q3", "srv 1 e1:abc", "srv 1 e1:zz", "srv 1 ix", "srv 1 l"] {
            assert_eq!(parse_announcement(bad), None, "{bad:?}");
        }
    }
}

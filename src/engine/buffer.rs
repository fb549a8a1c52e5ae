//! Write-behind: with a block store, a guest's writes to a file its server holds open are held
//! back in memory and go up to the store as whole blocks (one per [`FLUSH_BYTES`], not one per
//! write) when the file is synced, closed or unlocked, when its buffer fills, after
//! [`FLUSH_AGE`], when the lease is given up and when the server stops.
//!
//! What a held-back write does at once, in its own transaction as before: it charges the
//! volume (so the cap stays exact across servers, with nothing to reserve or release), moves
//! the file's times and records the request for replay. The bytes and the size they make wait
//! for the flush, which records the slices and moves the size in one transaction (JuiceFS's
//! order). So another server sees the file as it was until the flush, never a size with zeros
//! where bytes are still held; this server's answers (getattr, lookup, listings, the write's
//! own reply, an append's offset, the attributes pushed to its guests) see the held size and
//! its reads the held bytes. Close-to-open holds across servers: the writer's close flushes
//! before it returns.
//!
//! Each write is also appended to a journal file of its buffer in the server's data directory
//! (`write-behind/VOL-INO.log`), before its transaction, and marked committed after it. The
//! journal is written, not synced: a killed server process loses no acknowledged byte (the
//! next start replays the journals, keeping each write whose transaction committed), while a
//! crash of the host loses at most the writes of the last [`FLUSH_AGE`] that no fsync covered,
//! as a local disk does.

use super::*;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A file's buffer goes up once it holds this much (a write this long or longer is not held
/// back at all).
pub const FLUSH_BYTES: usize = blocks::BLOCK_MAX;

/// ... or once its oldest write is this old.
pub const FLUSH_AGE: Duration = Duration::from_secs(1);

/// The most bytes a server holds back over all files: past it, each write flushes its file.
const BUFFERS_MAX: usize = 256 << 20;

/// A journal record: a write (`W`, then session, seq, offset, append flag, the mtime its
/// transaction gives the file (seconds, nanoseconds), length, bytes)...
const RECORD_WRITE: u8 = b'W';
/// ... and its commit (`C`, then the offset it landed at).
const RECORD_COMMIT: u8 = b'C';
const WRITE_HEADER: usize = 1 + 8 + 8 + 8 + 1 + 8 + 4 + 4;
const COMMIT_LEN: usize = 1 + 8;

/// The bytes held back for one file.
#[derive(Default)]
pub(super) struct WriteBuffer {
    /// Runs of bytes by offset, never overlapping or touching: a later write is painted over.
    runs: BTreeMap<u64, Vec<u8>>,
    /// Bytes in `runs`.
    bytes: usize,
    /// When the oldest write still held was made.
    since: Option<Instant>,
    /// The journal, once a write was held back (opened for appending).
    journal: Option<std::fs::File>,
    /// Taken out of the engine's table: whoever finds it so looks the file up again.
    gone: bool,
}

impl WriteBuffer {
    /// Paints `data` at `off` over what is held, merging the runs it overlaps or touches.
    fn paint(&mut self, off: u64, data: &[u8]) {
        let end = off + data.len() as u64;
        // Runs are disjoint and sorted: walking back from the last one starting at or before
        // `end`, they end earlier and earlier.
        let touching: Vec<u64> = self.runs.range(..=end).rev().take_while(|(s, r)| **s + r.len() as u64 >= off).map(|(s, _)| *s).collect();
        let start = touching.last().map_or(off, |s| off.min(*s));
        let last_end = touching.first().map_or(end, |s| end.max(s + self.runs[s].len() as u64));
        // The first run, if it starts the merged one, is grown in place (a stream of appends
        // then costs no copying of what came before).
        let mut run = match touching.last() {
            Some(s) if *s == start => self.runs.remove(s).unwrap_or_default(),
            _ => Vec::new(),
        };
        self.bytes -= run.len();
        run.resize((last_end - start) as usize, 0);
        // (The first run, if taken above, is no longer in `runs`.)
        for s in &touching {
            if let Some(r) = self.runs.remove(s) {
                self.bytes -= r.len();
                run[(s - start) as usize..][..r.len()].copy_from_slice(&r);
            }
        }
        run[(off - start) as usize..][..data.len()].copy_from_slice(data);
        self.bytes += run.len();
        self.runs.insert(start, run);
    }

    /// Copies what is held of `[off, off + buf.len())` into `buf`.
    fn overlay(&self, off: u64, buf: &mut [u8]) {
        let end = off + buf.len() as u64;
        for (s, r) in self.runs.range(..end).rev() {
            let r_end = s + r.len() as u64;
            if r_end <= off {
                break;
            }
            let (from, to) = (off.max(*s), end.min(r_end));
            buf[(from - off) as usize..(to - off) as usize].copy_from_slice(&r[(from - s) as usize..(to - s) as usize]);
        }
    }
}

/// One file's buffer, as writers, readers and flushers share it.
type Shared = Arc<Mutex<WriteBuffer>>;

/// What a journal holds: its committed writes as (offset landed at, bytes), the length of the
/// journal they take, and the mtime the last of them gave the file.
type Replay<'a> = (Vec<(u64, &'a [u8])>, usize, Option<Timespec>);

/// The held-back writes of every file, with their journals' directory.
#[derive(Default)]
pub(super) struct Buffers {
    files: Mutex<HashMap<(VolId, Ino), Shared>>,
    /// Bytes held over all files.
    bytes: AtomicUsize,
    /// Set by [`Engine::write_behind_in`]: without it nothing is held back.
    dir: std::sync::OnceLock<PathBuf>,
    /// Per file with held bytes, the size they make it (the committed size moves only when
    /// they go up). Taken inside transactions too: nothing else is locked while it is held.
    sizes: Mutex<HashMap<(VolId, Ino), u64>>,
}

fn journal_path(dir: &Path, vol: VolId, ino: Ino) -> PathBuf {
    dir.join(format!("{vol}-{ino}.log"))
}

fn journal_err(what: &str, e: std::io::Error) -> FsError {
    FsError::new(libc::EIO, format!("write-behind journal: {what}: {e}"))
}

/// A journal's committed writes, in order, as (offset landed at, bytes), and how many bytes of
/// the file they take (what follows is a write that may not have committed, or torn).
/// `committed(session, seq)` says where an unmarked write landed if its transaction committed
/// (the record of its request says so).
fn read_journal(raw: &[u8], committed: impl Fn(u64, u64) -> FsResult<Option<u64>>) -> FsResult<Replay<'_>> {
    let u64_at = |at: usize| u64::from_le_bytes(raw[at..at + 8].try_into().unwrap());
    let u32_at = |at: usize| u32::from_le_bytes(raw[at..at + 4].try_into().unwrap());
    let (mut writes, mut at, mut mtime) = (Vec::new(), 0, None);
    while raw.len() >= at + WRITE_HEADER && raw[at] == RECORD_WRITE {
        // (The offset asked for, at +17, and the append flag, at +25, are for reading the
        // journal by hand: where a write landed is in its commit mark or its request's record.)
        let (session, seq) = (u64_at(at + 1), u64_at(at + 9));
        let when = Timespec { sec: u64_at(at + 26) as i64, nsec: u32_at(at + 34) };
        let len = u32_at(at + 38) as usize;
        let data_at = at + WRITE_HEADER;
        let Some(data) = raw.get(data_at..data_at + len) else { break };
        let commit_at = data_at + len;
        if raw.len() >= commit_at + COMMIT_LEN && raw[commit_at] == RECORD_COMMIT {
            writes.push((u64_at(commit_at + 1), data));
            mtime = Some(when);
            at = commit_at + COMMIT_LEN;
            continue;
        }
        // Unmarked. Last: the server died between the write's transaction and its mark, or
        // before the transaction committed (then the guest sends the write again, or never had
        // an answer). Followed by more writes: the mark could not be written (the server's
        // disk was full), or the write was refused and its record could not be cut. Only the
        // request's own record can tell.
        let last = raw.get(commit_at) != Some(&RECORD_WRITE);
        match committed(session, seq)? {
            Some(landed) => {
                writes.push((landed, data));
                mtime = Some(when);
                at = commit_at;
            }
            // Refused: never acknowledged, so nothing to replay (a last one is cut off).
            None if last => {}
            None => at = commit_at,
        }
        if last {
            break;
        }
    }
    Ok((writes, at, mtime))
}

impl Engine {
    /// Turns write-behind on (with a block store; otherwise it does nothing), its journals kept
    /// in `dir`: first the journals a previous run left are replayed (their committed writes
    /// go up, see the module's text). Returns how many files had writes to replay.
    pub fn write_behind_in(&self, dir: &Path) -> FsResult<usize> {
        if !self.has_blocks() {
            return Ok(0);
        }
        std::fs::create_dir_all(dir).map_err(|e| journal_err(&format!("create {}", dir.display()), e))?;
        let _ = self.buffers.dir.set(dir.to_path_buf());
        let mut replayed = 0;
        for entry in std::fs::read_dir(dir).map_err(|e| journal_err(&format!("read {}", dir.display()), e))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((vol, ino)) =
                name.strip_suffix(".log").and_then(|n| n.split_once('-')).and_then(|(v, i)| Some((v.parse().ok()?, i.parse().ok()?)))
            else {
                continue;
            };
            let path = entry.path();
            let mut raw = Vec::new();
            std::fs::File::open(&path)
                .and_then(|mut f| f.read_to_end(&mut raw))
                .map_err(|e| journal_err(&format!("read {}", path.display()), e))?;
            let (writes, valid, mtime) = read_journal(&raw, |session, seq| Ok(self.replayed(session, seq)?.map(|(_, landed)| landed)))?;
            if writes.is_empty() {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            // Each held write gave the file its own mtime. Another one now means the file's
            // data changed since, through another server (the sandbox moved on while this one
            // was down): painting these older bytes over it would undo that change, so they
            // are set aside for an operator instead.
            let now_mtime = self.tx(|t| t.get_inode(vol, ino))?.map(|a| a.mtime);
            if now_mtime != mtime {
                let aside = path.with_extension("log.stale");
                let _ = std::fs::rename(&path, &aside);
                tracing::error!(
                    vol,
                    ino,
                    writes = writes.len(),
                    journal = %aside.display(),
                    "held-back writes of the previous run not replayed: the file changed since (or is gone); their bytes are kept in the journal"
                );
                continue;
            }
            replayed += 1;
            tracing::info!(vol, ino, writes = writes.len(), "replaying writes held back by the previous run");
            let journal = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .and_then(|f| f.set_len(valid as u64).map(|_| f))
                .map_err(|e| journal_err(&format!("open {}", path.display()), e))?;
            let mut b = WriteBuffer { journal: Some(journal), since: Some(Instant::now()), ..Default::default() };
            for (off, data) in writes {
                b.paint(off, data);
            }
            if let Some((s, r)) = b.runs.iter().next_back() {
                self.hold_size(vol, ino, s + r.len() as u64);
            }
            self.buffers.bytes.fetch_add(b.bytes, Ordering::Relaxed);
            self.buffers.files.lock().unwrap().insert((vol, ino), Arc::new(Mutex::new(b)));
            // Up now if the store answers; otherwise the periodic flush tries again.
            if let Err(e) = self.settle(vol, ino) {
                tracing::warn!(vol, ino, "writes replayed from the journal stay held back for now: {e}");
            }
        }
        Ok(replayed)
    }

    /// Whether guests' writes are held back (write-behind is on).
    pub fn holds_writes(&self) -> bool {
        self.buffers.dir.get().is_some()
    }

    /// A guest's write (made inside [`Engine::recording`]) to a file this server holds open:
    /// with write-behind on, its bytes are held back (see the module's text), otherwise as
    /// [`Engine::write`].
    pub fn write_behind(&self, vol: VolId, ino: Ino, offset: u64, data: &[u8], append: bool, c: &Caller) -> FsResult<(u64, Attr)> {
        let tag = super::replay_tag();
        let held = || self.open.lock().unwrap().counts.contains_key(&(vol, ino));
        let (Some(dir), Some((session, seq))) = (self.buffers.dir.get(), tag) else { return self.write(vol, ino, offset, data, append, c) };
        if data.len() >= FLUSH_BYTES || !held() {
            return self.write(vol, ino, offset, data, append, c);
        }
        self.with_buffer(vol, ino, true, |b| {
            let b = b.expect("a buffer is made when asked for");
            let now = Timespec::now();
            let marked = match Self::journal_write(dir, vol, ino, b, (session, seq, now), offset, append, data) {
                Ok(m) => m,
                Err(e) => {
                    // No journal (the server's disk is full): this write goes up on its own.
                    tracing::warn!(vol, ino, "{e}: writing through");
                    return self.up_then(vol, ino, b, || self.write_through(vol, ino, offset, data, append, c));
                }
            };
            let out = self.write_tx(vol, ino, offset, data, append, c, None, now);
            let journal = b.journal.as_mut().expect("opened by journal_write");
            let (at, a) = match out {
                Ok(out) => out,
                Err(e) => {
                    // Refused (EDQUOT, ESTALE...): the record goes, as if never written, and
                    // the held size is what the held bytes make.
                    let end = b.runs.iter().next_back().map(|(s, r)| s + r.len() as u64);
                    match end {
                        Some(end) => drop(self.buffers.sizes.lock().unwrap().insert((vol, ino), end)),
                        None => drop(self.buffers.sizes.lock().unwrap().remove(&(vol, ino))),
                    }
                    if let Err(je) = journal.set_len(marked) {
                        tracing::warn!(vol, ino, "{}: flushing the file", journal_err("cut a refused write", je));
                        let _ = self.drain(vol, ino, b);
                    }
                    return Err(e);
                }
            };
            let mut commit = [0u8; COMMIT_LEN];
            commit[0] = RECORD_COMMIT;
            commit[1..].copy_from_slice(&at.to_le_bytes());
            let marked = journal.write_all(&commit);
            let before = b.bytes;
            b.paint(at, data);
            b.since.get_or_insert_with(Instant::now);
            let grown = b.bytes - before;
            let total = self.buffers.bytes.fetch_add(grown, Ordering::Relaxed) + grown;
            if marked.is_err() || b.bytes >= FLUSH_BYTES || total > BUFFERS_MAX {
                if let Err(e) = self.drain(vol, ino, b) {
                    // The write is committed and held; the periodic flush tries again.
                    tracing::warn!(vol, ino, "flushing held-back writes: {e}");
                }
            }
            Ok((at, a))
        })
    }

    /// Appends a write's record to the file's journal (opened on first use); returns the
    /// journal's length before it.
    #[allow(clippy::too_many_arguments)]
    fn journal_write(
        dir: &Path,
        vol: VolId,
        ino: Ino,
        b: &mut WriteBuffer,
        (session, seq, now): (u64, u64, Timespec),
        offset: u64,
        append: bool,
        data: &[u8],
    ) -> FsResult<u64> {
        if b.journal.is_none() {
            let path = journal_path(dir, vol, ino);
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&path)
                .map_err(|e| journal_err(&format!("open {}", path.display()), e))?;
            b.journal = Some(f);
        }
        let f = b.journal.as_mut().expect("just opened");
        let len = f.metadata().map_err(|e| journal_err("stat", e))?.len();
        let mut rec = Vec::with_capacity(WRITE_HEADER + data.len());
        rec.push(RECORD_WRITE);
        rec.extend_from_slice(&session.to_le_bytes());
        rec.extend_from_slice(&seq.to_le_bytes());
        rec.extend_from_slice(&offset.to_le_bytes());
        rec.push(append as u8);
        rec.extend_from_slice(&(now.sec as u64).to_le_bytes());
        rec.extend_from_slice(&now.nsec.to_le_bytes());
        rec.extend_from_slice(&(data.len() as u32).to_le_bytes());
        rec.extend_from_slice(data);
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(len)).and_then(|_| f.write_all(&rec)).map_err(|e| {
            let _ = f.set_len(len);
            journal_err("append", e)
        })?;
        Ok(len)
    }

    /// Runs `f` on the file's buffer, locked (or on `None` if it has none and `create` is
    /// false). Writes, flushes and reads of one file take turns here.
    pub(super) fn with_buffer<T>(&self, vol: VolId, ino: Ino, create: bool, f: impl FnOnce(Option<&mut WriteBuffer>) -> T) -> T {
        loop {
            let buf = {
                let mut files = self.buffers.files.lock().unwrap();
                let found = files.get(&(vol, ino)).cloned();
                match found {
                    Some(b) => b,
                    None if create => files.entry((vol, ino)).or_default().clone(),
                    None => {
                        drop(files);
                        return f(None);
                    }
                }
            };
            let mut b = buf.lock().unwrap();
            if !b.gone {
                return f(Some(&mut b));
            }
        }
    }

    /// Sends the buffer's bytes up (as few blocks as the runs allow), records them as slices
    /// (cut to the file's size now: another server may have truncated it) and forgets it.
    fn drain(&self, vol: VolId, ino: Ino, b: &mut WriteBuffer) -> FsResult<()> {
        self.send_up(vol, ino, b)?;
        self.forget_buffer(vol, ino, b);
        Ok(())
    }

    /// [`Engine::drain`] but for emptying and forgetting the buffer: the caller still holds it
    /// (locked) and does that when done.
    fn send_up(&self, vol: VolId, ino: Ino, b: &mut WriteBuffer) -> FsResult<()> {
        if let (Data::Blocks(store), false) = (&self.data, b.runs.is_empty()) {
            let mut slices = Vec::new();
            for (off, run) in &b.runs {
                slices.extend(blocks::slices_of(*off, &store.stage(run)?));
            }
            let held = self.held_size(vol, ino).unwrap_or(0);
            super::unrecorded(|| {
                self.mutate(vol, |t, log| {
                    let Some(mut a) = t.get_inode(vol, ino)? else { return Ok(()) };
                    if a.kind != Kind::File {
                        return Ok(());
                    }
                    // The size moves now, as far as the space the held writes took is still
                    // the file's (a truncate through another server meanwhile freed what lay
                    // past its new end: those bytes came before it and go).
                    if held > a.size {
                        let kept = t.extents(vol, ino, a.size, held)?.iter().map(|(_, e)| *e).max().unwrap_or(a.size);
                        a.size = held.min(kept).max(a.size);
                        t.put_inode(vol, &a)?;
                    }
                    for s in slices.iter().filter(|s| s.off < a.size) {
                        t.insert_slice(vol, ino, &SliceRow { len: s.len.min(a.size - s.off), ..s.clone() })?;
                    }
                    // Other servers' guests drop the zeros they may have read meanwhile.
                    log.push(Event::Modify { node: a.kind, ino });
                    Ok(())
                })
            })?;
            self.wrote_slices(vol, ino);
        }
        Ok(())
    }

    /// Runs `change`, a change to the file other than a held-back write (a write through the
    /// API or too long to hold, a truncate, fallocate, link, the destination of a copy): what
    /// is held for the file goes up first, and the file's buffer stays locked until the change
    /// committed, so that no held-back write lands in between (an append taking the end of
    /// file this write takes, bytes painted later over a punched hole or a copy). `change`
    /// must not touch the file's buffer itself.
    pub(super) fn after_held<T>(&self, vol: VolId, ino: Ino, change: impl FnOnce() -> FsResult<T>) -> FsResult<T> {
        if self.buffers.dir.get().is_none() {
            return change();
        }
        self.with_buffer(vol, ino, true, |b| self.up_then(vol, ino, b.expect("a buffer is made when asked for"), change))
    }

    /// The body of [`Engine::after_held`], on the file's buffer, locked.
    fn up_then<T>(&self, vol: VolId, ino: Ino, b: &mut WriteBuffer, change: impl FnOnce() -> FsResult<T>) -> FsResult<T> {
        self.send_up(vol, ino, b)?;
        // Up: its journal goes before the change, which a replay must never paint over.
        self.clear_buffer(vol, ino, b);
        let out = change();
        self.forget_buffer(vol, ino, b);
        out
    }

    /// [`Engine::mutate`] of volume `vol` as a change to file `ino` (see [`Engine::after_held`]).
    pub(super) fn mutate_after_held<T: super::Recorded>(
        &self,
        vol: VolId,
        ino: Ino,
        f: impl FnMut(&mut dyn MetaTxn, &mut Vec<Event>) -> FsResult<T>,
    ) -> FsResult<T> {
        self.after_held(vol, ino, || self.mutate(vol, f))
    }

    /// Empties the buffer (bytes, held size, journal), which stays in the table.
    fn clear_buffer(&self, vol: VolId, ino: Ino, b: &mut WriteBuffer) {
        self.buffers.bytes.fetch_sub(b.bytes, Ordering::Relaxed);
        b.runs.clear();
        b.bytes = 0;
        b.since = None;
        self.buffers.sizes.lock().unwrap().remove(&(vol, ino));
        if b.journal.take().is_some() {
            if let Some(dir) = self.buffers.dir.get() {
                let _ = std::fs::remove_file(journal_path(dir, vol, ino));
            }
        }
    }

    /// Empties the buffer and takes it out of the table.
    fn forget_buffer(&self, vol: VolId, ino: Ino, b: &mut WriteBuffer) {
        self.clear_buffer(vol, ino, b);
        b.gone = true;
        self.buffers.files.lock().unwrap().remove(&(vol, ino));
    }

    /// Sends up what is held back for the file, if anything (before any change to it other
    /// than a held-back write, and at fsync, close and unlock).
    pub fn settle(&self, vol: VolId, ino: Ino) -> FsResult<()> {
        if self.buffers.dir.get().is_none() {
            return Ok(());
        }
        self.with_buffer(vol, ino, false, |b| b.map_or(Ok(()), |b| self.drain(vol, ino, b)))
    }

    /// Sends up what is held back for the files that match `which` (the first error is
    /// returned after every file was tried); returns how many were sent.
    fn settle_where(&self, which: impl Fn(&(VolId, Ino), &WriteBuffer) -> bool) -> FsResult<usize> {
        let keys: Vec<(VolId, Ino)> = self.buffers.files.lock().unwrap().keys().copied().collect();
        let (mut n, mut first_err) = (0, None);
        for (vol, ino) in keys {
            let r = self.with_buffer(vol, ino, false, |b| match b {
                Some(b) if which(&(vol, ino), b) => self.drain(vol, ino, b).map(|_| 1),
                _ => Ok(0),
            });
            match r {
                Ok(k) => n += k,
                Err(e) => {
                    tracing::warn!(vol, ino, "flushing held-back writes: {e}");
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(n), Err)
    }

    /// Sends up everything held back for volume `vol` (its lease is given up, it is cloned).
    pub fn settle_volume(&self, vol: VolId) -> FsResult<usize> {
        self.settle_where(|k, _| k.0 == vol)
    }

    /// Sends up everything held back (the server stops).
    pub fn settle_all(&self) -> FsResult<usize> {
        self.settle_where(|_, _| true)
    }

    /// Sends up what was held back for longer than `age`.
    pub fn settle_older(&self, age: Duration) -> FsResult<usize> {
        self.settle_where(|_, b| b.since.is_some_and(|s| s.elapsed() >= age))
    }

    /// Reads `buf` at `offset` of the file's committed bytes (`read`), then what this server
    /// holds back over them.
    pub(super) fn read_held(
        &self,
        vol: VolId,
        ino: Ino,
        offset: u64,
        buf: &mut [u8],
        read: impl FnOnce(&mut [u8]) -> FsResult<()>,
    ) -> FsResult<()> {
        if self.buffers.dir.get().is_none() {
            return read(buf);
        }
        self.with_buffer(vol, ino, false, |b| {
            read(buf)?;
            if let Some(b) = b {
                b.overlay(offset, buf);
            }
            Ok(())
        })
    }

    /// Forgets what is held back for a file that is gone.
    pub(super) fn discard_held(&self, vol: VolId, ino: Ino) {
        if self.buffers.dir.get().is_some() {
            self.with_buffer(vol, ino, false, |b| {
                if let Some(b) = b {
                    self.forget_buffer(vol, ino, b)
                }
            })
        }
    }

    /// The size held-back writes make file `ino`, if any.
    pub(super) fn held_size(&self, vol: VolId, ino: Ino) -> Option<u64> {
        self.buffers.sizes.lock().unwrap().get(&(vol, ino)).copied()
    }

    /// A held-back write reaches `end` of file `ino`.
    pub(super) fn hold_size(&self, vol: VolId, ino: Ino, end: u64) {
        let mut sizes = self.buffers.sizes.lock().unwrap();
        let s = sizes.entry((vol, ino)).or_insert(0);
        *s = (*s).max(end);
    }

    /// `a` as this server's guests see it: its size reaches as far as the bytes it holds back.
    pub(super) fn with_held(&self, vol: VolId, a: Attr) -> Attr {
        if self.buffers.dir.get().is_none() || a.kind != Kind::File {
            return a;
        }
        match self.held_size(vol, a.ino) {
            Some(s) if s > a.size => Attr { size: s, ..a },
            _ => a,
        }
    }

    /// Bytes held back over all files (for tests and stats).
    pub fn held_back(&self) -> usize {
        self.buffers.bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn painted(writes: &[(u64, &[u8])]) -> (WriteBuffer, Vec<u8>) {
        let mut b = WriteBuffer::default();
        let mut model = Vec::new();
        for (off, data) in writes {
            b.paint(*off, data);
            let end = *off as usize + data.len();
            if model.len() < end {
                model.resize(end, 0);
            }
            model[*off as usize..end].copy_from_slice(data);
        }
        (b, model)
    }

    #[test]
    fn painted_runs_merge_and_read_back_as_written() {
        // Appends, an overlap of two runs, a write bridging a gap, one inside another.
        let (b, model) = painted(&[(0, b"aaaa"), (4, b"bbbb"), (20, b"cccc"), (6, b"dddddddddddddddd"), (30, b"ee"), (2, b"ff")]);
        assert_eq!(b.runs.len(), 2, "runs that overlap or touch merge: {:?}", b.runs.keys().collect::<Vec<_>>());
        assert_eq!(b.bytes, b.runs.values().map(Vec::len).sum::<usize>());
        let mut out = vec![0u8; 32];
        b.overlay(0, &mut out);
        assert_eq!(&out[..], &model[..32.min(model.len())]);
        // Part of a run, and a window straddling a gap.
        let mut part = vec![9u8; 5];
        b.overlay(26, &mut part);
        assert_eq!(&part, &[9, 9, 9, 9, b'e'], "bytes not held (24..30) are left alone");
    }

    #[test]
    fn random_paints_match_a_flat_model() {
        let mut seed = 0x1234_5678_u64;
        let mut next = |n: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for _ in 0..200 {
            let mut b = WriteBuffer::default();
            let mut model = vec![0u8; 256];
            let mut held = vec![false; 256];
            for i in 0..12 {
                let off = next(200);
                let len = 1 + next(50) as usize;
                let data = vec![i as u8 + 1; len];
                b.paint(off, &data);
                model[off as usize..off as usize + len].copy_from_slice(&data);
                held[off as usize..off as usize + len].iter_mut().for_each(|h| *h = true);
            }
            let mut out = vec![0u8; 256];
            b.overlay(0, &mut out);
            assert_eq!(out, model);
            assert_eq!(b.bytes, held.iter().filter(|h| **h).count(), "runs hold each byte once");
            let keys: Vec<(u64, u64)> = b.runs.iter().map(|(s, r)| (*s, s + r.len() as u64)).collect();
            assert!(keys.windows(2).all(|w| w[0].1 < w[1].0), "runs neither overlap nor touch: {keys:?}");
        }
    }

    #[test]
    fn a_journal_keeps_committed_writes_and_an_unmarked_last_one_only_if_recorded() {
        let rec = |session: u64, seq: u64, off: u64, data: &[u8], landed: Option<u64>| {
            let mut r = vec![RECORD_WRITE];
            r.extend_from_slice(&session.to_le_bytes());
            r.extend_from_slice(&seq.to_le_bytes());
            r.extend_from_slice(&off.to_le_bytes());
            r.push(0);
            r.extend_from_slice(&(seq * 10).to_le_bytes());
            r.extend_from_slice(&7u32.to_le_bytes());
            r.extend_from_slice(&(data.len() as u32).to_le_bytes());
            r.extend_from_slice(data);
            if let Some(at) = landed {
                r.push(RECORD_COMMIT);
                r.extend_from_slice(&at.to_le_bytes());
            }
            r
        };
        let mut raw = rec(1, 1, 0, b"one", Some(0));
        raw.extend(rec(1, 2, 10, b"two", Some(12)));
        let whole = raw.len();
        raw.extend(rec(1, 3, 20, b"three", None));
        let never = |_: u64, _: u64| Ok(None);
        let (w, valid, mtime) = read_journal(&raw, never).unwrap();
        assert_eq!(w, vec![(0, &b"one"[..]), (12, &b"two"[..])], "the commit mark says where a write landed");
        assert_eq!(valid, whole, "an unrecorded last write is cut off");
        assert_eq!(mtime, Some(Timespec { sec: 20, nsec: 7 }), "the mtime the last kept write gave the file");
        let (w, valid, mtime) = read_journal(&raw, |s, q| Ok((s, q) == (1, 3)).map(|yes| yes.then_some(40))).unwrap();
        assert_eq!(w.last(), Some(&(40, &b"three"[..])), "a recorded last write is kept, where it landed");
        assert_eq!((valid, mtime), (raw.len(), Some(Timespec { sec: 30, nsec: 7 })));
        // A torn tail (the process died inside the append) is no write.
        let (w, valid, _) = read_journal(&raw[..raw.len() - 2], |_, _| Ok(Some(0))).unwrap();
        assert_eq!((w.len(), valid), (2, whole));
        // An unmarked write followed by more (its mark could not be written): kept if its
        // request's record committed, skipped if not, and the writes after it are read on.
        let mut raw = rec(1, 1, 0, b"one", Some(0));
        raw.extend(rec(1, 2, 3, b"two", None));
        raw.extend(rec(1, 3, 6, b"six", Some(6)));
        let (w, valid, mtime) = read_journal(&raw, |s, q| Ok(((s, q) == (1, 2)).then_some(3))).unwrap();
        assert_eq!(w, vec![(0, &b"one"[..]), (3, &b"two"[..]), (6, &b"six"[..])]);
        assert_eq!((valid, mtime), (raw.len(), Some(Timespec { sec: 30, nsec: 7 })));
        let (w, valid, _) = read_journal(&raw, never).unwrap();
        assert_eq!(w, vec![(0, &b"one"[..]), (6, &b"six"[..])], "a refused write in the middle is skipped");
        assert_eq!(valid, raw.len());
    }
}

//! A mount session: one guest mount of one attachment, the unit that holds a lease.
//!
//! The session, not the connection, owns the state that must survive a reconnect: the set of
//! inodes the guest has been handed (with their lookup counts), its open handles, and the replay
//! record of recent mutations. A connection attaches to a session; when it drops, the session
//! waits for its guest to come back until the lease TTL runs out, then it is ended and its
//! handles are released.
//!
//! Scope rules, checked for every request:
//! - The guest's inode 1 is the attachment's root (its subpath); every other inode number must be
//!   one this session was handed by a lookup, create or readdirplus and has not forgotten.
//!   Anything else is `ESTALE`: a forged number reaches nothing.
//! - Names are single components (no `/`, no `.` or `..`), so lookups only walk down.
//! - A read-only attachment refuses every mutation, and every open for writing, with `EROFS`.
//!
//! The known set is a cache of that rule, not the rule: an inode number the session has not been
//! handed (after a server restart, or in a forked VM whose kernel remembers its parent's inodes)
//! is accepted if it exists and has a name inside the attachment's subtree, and refused with
//! `ESTALE` otherwise.
//!
//! Lease: a session is `Live` while its guest renews it (any request renews); one that goes
//! silent for the TTL expires and is ended. `Released` is hibernation: the guest gave the lease
//! up on purpose, the session (handles, references) waits for a resume and never expires.

use super::Server;
use crate::engine::meta::{AttachState, VolId};
use crate::engine::Engine;
use crate::fs::{Attr, FsError, FsResult, Ino, Kind, ROOT_INO};
use crate::proto::{Notice, Op, Reply, Request, ServerMsg};
use crate::transport::Stream;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

/// Open handles (files and directories) one mount session may hold: a guest cannot grow the
/// server's tables without bound. Far above what a kernel keeps open through one mount in
/// practice (Linux's default per-process limit is 1024 descriptors).
pub const MAX_HANDLES: usize = 16384;
/// How many recent mutation results a session keeps for replay after a reconnect.
const REPLAY_KEEP: usize = 4096;

/// The largest file an open sends whole with its answer (see `Op::Open`).
pub const PREFETCH_MAX: u32 = 256 << 10;
/// Bytes of directory entries one readdir reply may carry: a frame less room for the envelope.
const READDIR_BUDGET: usize = crate::proto::MAX_FRAME - (16 << 10);
/// An upper bound on an encoded directory entry's size besides its name (numbers, kind,
/// cookie and attributes, each a varint of at most 10 bytes).
const DIRENT_OVERHEAD: usize = 192;

struct Handle {
    ino: Ino,
    writable: bool,
    dir: bool,
}

/// Frames a connection may have queued for its guest. Replies are bounded by the request
/// window, so only pushes can fill it: a guest that stops reading loses its connection (and
/// reconnects), never anyone else's time.
const SEND_QUEUE: usize = 256;

enum Outgoing {
    Frame(Vec<u8>),
    /// Close the connection once everything queued before has been written.
    Close,
}

/// The connection a session currently speaks through. Nobody waits on its socket: a frame
/// goes straight out when nothing is queued before it and the socket takes it whole at once
/// (it is non-blocking), and is queued for the connection's writer task otherwise, so a guest
/// that stops reading stalls only its own connection. Writing in place saves the writer
/// task's wakeup on every reply.
pub struct Conn {
    tx: tokio::sync::mpsc::Sender<Outgoing>,
    /// A second descriptor of the socket: for writes in place, and to shut it down from
    /// anywhere.
    stream: Stream,
    /// Messages handed to the writer task and not yet written. Writes in place happen only
    /// while it is 0 and under its lock, so they never interleave with the writer's.
    queued: Arc<Mutex<usize>>,
}

/// Queued frames written together at most (past it, the next write takes the rest).
const COALESCE: usize = 256 << 10;

/// A peer that does not drain its socket for this long is cut off.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

impl Conn {
    /// Starts the writer task for `w`; `closer` is another descriptor of the same socket.
    pub fn start(mut w: impl tokio::io::AsyncWrite + Unpin + Send + 'static, closer: Stream) -> std::io::Result<Arc<Conn>> {
        use tokio::io::AsyncWriteExt;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Outgoing>(SEND_QUEUE);
        let shut = closer.try_clone()?;
        let queued = Arc::new(Mutex::new(0usize));
        let written = queued.clone();
        super::runtime().spawn(async move {
            while let Some(Outgoing::Frame(mut buf)) = rx.recv().await {
                // What else is queued goes in the same write (a reply and the pushes before
                // it, replies finished together), up to a bound, in order.
                let mut close = false;
                let mut frames = 1;
                while buf.len() < COALESCE {
                    match rx.try_recv() {
                        Ok(Outgoing::Frame(more)) => {
                            buf.extend_from_slice(&more);
                            frames += 1;
                        }
                        Ok(Outgoing::Close) => {
                            close = true;
                            break;
                        }
                        Err(_) => break,
                    }
                }
                match tokio::time::timeout(WRITE_TIMEOUT, w.write_all(&buf)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break,
                    Err(_) => {
                        tracing::warn!("a guest did not read for {WRITE_TIMEOUT:?}: closing its connection");
                        break;
                    }
                }
                if close {
                    break;
                }
                *written.lock().unwrap() -= frames;
            }
            shut.shutdown();
        });
        Ok(Arc::new(Conn { tx, stream: closer, queued }))
    }

    /// Sends one message: in place if nothing is queued and the socket takes it whole, queued
    /// behind otherwise. A full queue means the guest stopped reading: its connection is
    /// closed (it will reconnect, and resend what had no reply) rather than anyone waiting.
    pub fn send(&self, msg: &ServerMsg) -> std::io::Result<()> {
        let buf = crate::proto::encode(msg)?;
        let mut queued = self.queued.lock().unwrap();
        let rest = if *queued == 0 {
            match self.stream.write_once(&buf) {
                Ok(n) if n == buf.len() => return Ok(()),
                Ok(n) => {
                    let mut buf = buf;
                    buf.drain(..n);
                    buf
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted => buf,
                Err(e) => return Err(e),
            }
        } else {
            buf
        };
        match self.tx.try_send(Outgoing::Frame(rest)) {
            Ok(()) => {
                *queued += 1;
                Ok(())
            }
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!("a guest connection stopped reading ({SEND_QUEUE} frames queued): closing it");
                self.shutdown();
                Err(std::io::Error::new(std::io::ErrorKind::WouldBlock, "the guest is not reading: connection closed"))
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => Err(std::io::ErrorKind::BrokenPipe.into()),
        }
    }

    /// Closes the connection after what is already queued has been written.
    pub fn close_after_queued(&self) {
        let mut queued = self.queued.lock().unwrap();
        match self.tx.try_send(Outgoing::Close) {
            Ok(()) => *queued += 1,
            Err(_) => self.shutdown(),
        }
    }

    /// Closes the connection now.
    pub fn shutdown(&self) {
        self.stream.shutdown();
    }
}

/// Results of recent mutations by sequence number; `None` while the first copy still runs.
#[derive(Default)]
struct Replay {
    done: HashMap<u64, Option<FsResult<Reply>>>,
    order: VecDeque<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    Live,
    Released,
}

pub struct Session {
    pub id: u64,
    /// The session of the parent sandbox this one was forked from.
    pub forked_from: Option<u64>,
    pub state: Mutex<LeaseState>,
    pub sandbox: String,
    pub attachment: u64,
    pub vol: VolId,
    /// The real inode of the mount's root.
    pub root: Ino,
    pub read_only: bool,
    known: Mutex<HashMap<Ino, u64>>,
    /// Subpath mounts: inodes found inside the subpath, valid for one scope epoch of the volume.
    verified: Mutex<(u64, HashSet<Ino>)>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    replay: Mutex<Replay>,
    replayed: Condvar,
    conn: Mutex<Option<Arc<Conn>>>,
    /// When the guest was last heard from; with `conn == None`, when it went away.
    last_seen: Mutex<Instant>,
    /// Set on a session opened for a guest that named a session this server does not have
    /// (it restarted, or the lease lapsed): it may reclaim its locks, once.
    pub may_reclaim: std::sync::atomic::AtomicBool,
    /// The session a restarted server lost, that this one replaces for the same guest, and its
    /// highest recorded request: the guest resends what it had no reply to, and a mutation
    /// recorded under the old session is answered from the record, not applied again.
    pub predecessor: Mutex<Option<(u64, u64)>>,
}

impl Session {
    pub fn new(id: u64, sandbox: &str, attachment: u64, vol: VolId, root: Ino, read_only: bool) -> Session {
        Session {
            id,
            forked_from: None,
            state: Mutex::new(LeaseState::Live),
            sandbox: sandbox.to_string(),
            attachment,
            vol,
            root,
            read_only,
            known: Mutex::new(HashMap::from([(root, 1)])),
            verified: Mutex::default(),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            replay: Mutex::new(Replay::default()),
            replayed: Condvar::new(),
            conn: Mutex::new(None),
            last_seen: Mutex::new(Instant::now()),
            may_reclaim: Default::default(),
            predecessor: Mutex::new(None),
        }
    }

    pub fn bind(&self, conn: Arc<Conn>) {
        *self.conn.lock().unwrap() = Some(conn);
        self.touch();
    }

    /// The connection ended; the lease clock starts unless another connection took over.
    pub fn unbind(&self, conn: &Arc<Conn>) {
        let mut cur = self.conn.lock().unwrap();
        if cur.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            *cur = None;
            self.touch();
        }
    }

    pub fn touch(&self) {
        *self.last_seen.lock().unwrap() = Instant::now();
    }

    pub fn lease(&self) -> LeaseState {
        *self.state.lock().unwrap()
    }

    pub fn set_lease(&self, st: LeaseState) {
        *self.state.lock().unwrap() = st;
        self.touch();
    }

    /// Whether the lease has gone unrenewed for longer than `ttl`.
    pub fn expired(&self, ttl: Duration) -> bool {
        self.lease() == LeaseState::Live && self.last_seen.lock().unwrap().elapsed() > ttl
    }

    /// Whether the session holds any handle at all.
    pub fn has_handles(&self) -> bool {
        !self.handles.lock().unwrap().is_empty()
    }

    /// Open file handles (not directories), for refusing a detach of a busy mount.
    pub fn open_files(&self) -> usize {
        self.handles.lock().unwrap().values().filter(|h| !h.dir).count()
    }

    /// A copy for a forked sandbox: the same references and handles (each handle taken again on
    /// the engine), a new identity, waiting for the child's agent to resume it.
    pub fn fork(&self, id: u64, sandbox: &str, attachment: u64, engine: &Engine) -> Session {
        let handles: HashMap<u64, Handle> = self
            .handles
            .lock()
            .unwrap()
            .iter()
            .map(|(fh, h)| {
                engine.hold_again(self.vol, h.ino);
                (*fh, Handle { ino: h.ino, writable: h.writable, dir: h.dir })
            })
            .collect();
        Session {
            id,
            forked_from: Some(self.id),
            state: Mutex::new(LeaseState::Released),
            sandbox: sandbox.to_string(),
            attachment,
            vol: self.vol,
            root: self.root,
            read_only: self.read_only,
            known: Mutex::new(self.known.lock().unwrap().clone()),
            verified: Mutex::default(),
            handles: Mutex::new(handles),
            next_fh: AtomicU64::new(self.next_fh.load(Ordering::Relaxed)),
            replay: Mutex::new(Replay::default()),
            replayed: Condvar::new(),
            conn: Mutex::new(None),
            last_seen: Mutex::new(Instant::now()),
            may_reclaim: Default::default(),
            predecessor: Mutex::new(None),
        }
    }

    /// Releases every handle and closes the connection.
    pub fn close(&self, engine: &Engine) {
        if let Some(c) = self.conn.lock().unwrap().take() {
            c.shutdown();
        }
        self.release_handles(engine);
    }

    /// Releases every handle (freeing files unlinked while open).
    fn release_handles(&self, engine: &Engine) {
        let handles: Vec<Handle> = self.handles.lock().unwrap().drain().map(|(_, h)| h).collect();
        for h in handles {
            let _ = engine.release(self.vol, h.ino);
        }
    }

    /// The volume's inode number for a number the guest sent, if this session may reach it.
    ///
    /// The rule is the subtree: an inode is reachable if it is the mount's root or has a name
    /// below it, checked on every use, not only when the inode was handed out. For a mount of
    /// the whole volume every existing inode qualifies, so the session's own table suffices.
    /// A subpath mount caches "inside" answers per scope epoch of the volume: a rename or
    /// unlink anywhere in it (by any session or the API) moves the epoch, and every cached
    /// answer is checked again, so an inode moved out of the subpath is refused from then on.
    fn to_real(&self, engine: &Engine, wire: Ino) -> FsResult<Ino> {
        let real = if wire == ROOT_INO { self.root } else { wire };
        if real == self.root {
            return Ok(real);
        }
        if self.root == ROOT_INO {
            if self.known.lock().unwrap().contains_key(&real) {
                return Ok(real);
            }
        } else {
            let epoch = engine.scope_epoch(self.vol);
            {
                let v = self.verified.lock().unwrap();
                if v.0 == epoch && v.1.contains(&real) {
                    return Ok(real);
                }
            }
            if engine.within(self.vol, real, self.root)? {
                let mut v = self.verified.lock().unwrap();
                if v.0 < epoch {
                    *v = (epoch, HashSet::new());
                }
                if v.0 == epoch {
                    v.1.insert(real);
                }
                return Ok(real);
            }
            return Err(FsError::new(libc::ESTALE, format!("inode {wire} is not inside this mount's subpath")));
        }
        if engine.within(self.vol, real, self.root)? {
            self.known.lock().unwrap().entry(real).or_insert(0);
            return Ok(real);
        }
        Err(FsError::new(libc::ESTALE, format!("inode {wire} is not visible through this mount")))
    }

    fn to_wire(&self, real: Ino) -> Ino {
        if real == self.root {
            ROOT_INO
        } else {
            real
        }
    }

    fn wire_attr(&self, mut a: Attr) -> Attr {
        a.ino = self.to_wire(a.ino);
        a
    }

    /// Hands an inode to the guest: one more lookup reference.
    fn grant(&self, a: Attr) -> Attr {
        *self.known.lock().unwrap().entry(a.ino).or_insert(0) += 1;
        self.wire_attr(a)
    }

    fn forget(&self, real: Ino, n: u64) {
        if real == self.root {
            return;
        }
        let mut known = self.known.lock().unwrap();
        if let Some(c) = known.get_mut(&real) {
            *c = c.saturating_sub(n);
            if *c == 0 {
                known.remove(&real);
            }
        }
    }

    fn handle(&self, fh: u64, ino: Ino, write: bool) -> FsResult<()> {
        match self.handles.lock().unwrap().get(&fh) {
            Some(h) if h.ino == ino && !h.dir && (!write || h.writable) => Ok(()),
            Some(h) if h.ino == ino && write && !h.writable => {
                Err(FsError::new(libc::EBADF, format!("handle {fh} is not open for writing")))
            }
            _ => Err(FsError::new(libc::EBADF, format!("no open handle {fh} for inode {ino}"))),
        }
    }

    /// Refuses a new handle when the session holds [`MAX_HANDLES`] already (checked before the
    /// engine takes one, so a refusal changes nothing).
    fn room_for_handle(&self) -> FsResult<()> {
        if self.handles.lock().unwrap().len() >= MAX_HANDLES {
            tracing::warn!(sandbox = %self.sandbox, session = self.id, limit = MAX_HANDLES, "limit hit: open handles per session");
            return Err(FsError::new(libc::EMFILE, format!("this mount session has {MAX_HANDLES} files open, the most allowed")));
        }
        Ok(())
    }

    fn add_handle(&self, ino: Ino, writable: bool, dir: bool) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap().insert(fh, Handle { ino, writable, dir });
        fh
    }

    fn take_handle(&self, fh: u64, ino: Ino) -> FsResult<()> {
        let mut handles = self.handles.lock().unwrap();
        match handles.get(&fh) {
            Some(h) if h.ino == ino => {
                handles.remove(&fh);
                Ok(())
            }
            _ => Err(FsError::new(libc::EBADF, format!("no open handle {fh} for inode {ino}"))),
        }
    }

    fn push(&self, n: Notice) {
        let conn = self.conn.lock().unwrap().clone();
        if let Some(c) = conn {
            let _ = c.send(&ServerMsg::Notify(n));
        }
    }

    /// Tells this session that `ino` changed, if it has it cached.
    pub fn invalidate_inode(&self, real: Ino) {
        if self.known.lock().unwrap().contains_key(&real) {
            self.push(Notice::InvalInode { ino: self.to_wire(real) });
        }
    }

    /// A change through this session, to `a`: its guest's kernel may ask for the attributes
    /// next (it drops its own copy of a directory's after a create or an unlink in it, and of a
    /// file's after a write; it does not know of an atime moved by its read), and the guest
    /// answers from this push. Only inodes the guest has. Other sandboxes see an atime moved by
    /// someone else's read when their cached attributes are next refreshed, as NFS clients do.
    fn told(&self, a: &Attr) {
        if self.known.lock().unwrap().contains_key(&a.ino) {
            self.push(Notice::Attr { attr: self.wire_attr(a.clone()) });
        }
    }

    /// Tells this session's guest that a lock it waits for on `real` may be free now.
    pub fn lock_freed(&self, real: Ino) {
        self.push(Notice::LockFreed { ino: self.to_wire(real) });
    }

    pub fn invalidate_entry(&self, parent: Ino, name: &[u8]) {
        if self.known.lock().unwrap().contains_key(&parent) {
            let wire = self.to_wire(parent);
            self.push(Notice::InvalEntry { parent: wire, name: name.to_vec() });
            self.push(Notice::InvalInode { ino: wire });
        }
    }
}

impl crate::engine::Observer for Session {
    fn changed(&self, a: &Attr) {
        self.told(a);
    }
}

/// What a mutation changed, for invalidating other sessions' caches.
enum Changed {
    Nothing,
    Inode(Ino),
    Entries(Vec<(Ino, Vec<u8>)>),
}

/// Runs one request for `s`, with replay of already-applied mutations. The flag says the
/// connection must be closed after the reply (the guest released its lease).
pub fn handle(server: &Server, s: &Arc<Session>, req: Request) -> (FsResult<Reply>, bool) {
    let _span = tracing::debug_span!("request", sandbox = %s.sandbox, session = s.id, id = req.id).entered();
    tracing::debug!(target: "opmix", op = format!("{:?}", req.op).split([' ', '(', '{']).next().unwrap_or(""));
    let close = req.op.ends_connection();
    (run(server, s, req), close)
}

fn run(server: &Server, s: &Arc<Session>, req: Request) -> FsResult<Reply> {
    if s.lease() == LeaseState::Released {
        return Err(FsError::new(libc::ENOTCONN, "this mount's lease was released; reconnect to take it again"));
    }
    s.touch();
    if req.seq != 0 {
        let mut replay = s.replay.lock().unwrap();
        loop {
            match replay.done.get(&req.seq) {
                Some(Some(r)) => return r.clone(),
                // The first copy (from before a reconnect) is still running: wait for its result.
                Some(None) => replay = s.replayed.wait(replay).unwrap(),
                None => break,
            }
        }
        replay.done.insert(req.seq, None);
        replay.order.push_back(req.seq);
        while replay.order.len() > REPLAY_KEEP {
            match replay.order.pop_front() {
                Some(old) if old != req.seq => {
                    replay.done.remove(&old);
                }
                _ => break,
            }
        }
    }
    // A mutation the lost session of a restarted server already applied is answered from its
    // record; every other mutation records its result as it commits.
    let durable = req.seq != 0 && req.op.is_mutation();
    let earlier = if durable { recorded_earlier(server, s, &req) } else { None };
    // A panic while serving one request becomes an EIO reply (recorded for replay like any
    // other result) and a log line; the worker, the connection and the server go on.
    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match earlier {
        Some(rec) => replay_reply(server, s, &req, rec).map(|r| (r, Changed::Nothing)),
        None if durable => server.engine.observed(s.clone(), || server.engine.recording(s.id, req.seq, || execute(server, s, &req))),
        None => server.engine.observed(s.clone(), || execute(server, s, &req)),
    }));
    let (result, changed) = match served {
        Ok(Ok((reply, changed))) => (Ok(reply), changed),
        Ok(Err(e)) => (Err(e), Changed::Nothing),
        Err(panic) => {
            let what = panic.downcast_ref::<&str>().map(|m| m.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
            tracing::error!(sandbox = %s.sandbox, session = s.id, id = req.id, panic = what.as_deref().unwrap_or("?"), "request panicked");
            (Err(FsError::new(libc::EIO, "internal error while serving this request (logged on the host)")), Changed::Nothing)
        }
    };
    if req.seq != 0 {
        let mut replay = s.replay.lock().unwrap();
        if let Some(slot) = replay.done.get_mut(&req.seq) {
            *slot = Some(result.clone());
        }
        s.replayed.notify_all();
    }
    match changed {
        Changed::Nothing => {}
        Changed::Inode(ino) => {
            for p in server.peers(s.vol, s.id) {
                p.invalidate_inode(ino);
            }
        }
        Changed::Entries(entries) => {
            for p in server.peers(s.vol, s.id) {
                for (parent, name) in &entries {
                    p.invalidate_entry(*parent, name);
                }
            }
        }
    }
    result
}

/// The record of `req` under the session this one replaced, if that session applied it.
fn recorded_earlier(server: &Server, s: &Session, req: &Request) -> Option<(u64, u64)> {
    let mut pred = s.predecessor.lock().unwrap();
    let (old, last) = (*pred)?;
    if req.seq > last {
        // The guest is past everything the old session recorded: its records are done with.
        *pred = None;
        drop(pred);
        if let Err(e) = server.engine.forget_replays(old) {
            tracing::warn!(session = s.id, old, "forgetting the replaced session's records: {e}");
        }
        return None;
    }
    match server.engine.replayed(old, req.seq) {
        Ok(rec) => rec,
        Err(e) => {
            tracing::warn!(session = s.id, old, seq = req.seq, "reading a replay record: {e}");
            None
        }
    }
}

/// The reply a recorded mutation would have had, rebuilt from its record `(inode, number)` and
/// the volume as it is now (a create gets a new handle on the file it made).
fn replay_reply(server: &Server, s: &Session, req: &Request, (ino, n): (u64, u64)) -> FsResult<Reply> {
    let e = &server.engine;
    let v = s.vol;
    tracing::info!(sandbox = %s.sandbox, session = s.id, seq = req.seq, "answered a resent request from its record (applied before a restart)");
    Ok(match &req.op {
        Op::Write { append: true, data, .. } => {
            Reply::Appended { written: data.len() as u32, offset: n, attr: s.wire_attr(e.getattr(v, ino)?) }
        }
        Op::Write { append: false, data, .. } => Reply::Written(data.len() as u32),
        Op::CopyFileRange { .. } => Reply::Written(n as u32),
        Op::Create { flags, .. } => {
            s.room_for_handle()?;
            let a = e.open(v, ino, flags & libc::O_ACCMODE, &req.caller)?;
            let fh = s.add_handle(a.ino, flags & libc::O_ACCMODE != libc::O_RDONLY, false);
            Reply::Created { attr: s.grant(a), fh }
        }
        Op::MkNod { .. } | Op::MkDir { .. } | Op::Symlink { .. } | Op::Link { .. } => Reply::Entry(s.grant(e.getattr(v, ino)?)),
        Op::SetAttr { .. } => Reply::Attr(s.wire_attr(e.getattr(v, ino)?)),
        Op::Unlink { .. } | Op::RmDir { .. } | Op::Rename { .. } | Op::SetXattr { .. } | Op::RemoveXattr { .. } | Op::Fallocate { .. } => {
            Reply::Empty
        }
        // Not mutations: never recorded (named one by one so that a new op must be decided on).
        Op::Lookup { .. }
        | Op::Forget { .. }
        | Op::GetAttr { .. }
        | Op::ReadLink { .. }
        | Op::Open { .. }
        | Op::Read { .. }
        | Op::Lseek { .. }
        | Op::Fsync { .. }
        | Op::Release { .. }
        | Op::OpenDir { .. }
        | Op::ReadDir { .. }
        | Op::ReleaseDir { .. }
        | Op::StatFs
        | Op::GetXattr { .. }
        | Op::ListXattr { .. }
        | Op::Renew
        | Op::ReleaseLease
        | Op::Unmounted
        | Op::Flush { .. }
        | Op::GetLk { .. }
        | Op::SetLk { .. }
        | Op::SetLkW { .. }
        | Op::ReclaimLocks { .. } => return Err(FsError::new(libc::EIO, "no replay record for this kind of request")),
    })
}

/// Sends up what is held back for `real` before a close, an unlock or a release. A failure
/// (the store unreachable) fails none of them: the writes stay held and journaled, the periodic
/// flush tries again, and the handle, lock or lease still goes (an fsync reports it instead).
fn settle_or_warn(s: &Session, e: &Engine, v: VolId, real: Ino, at: &str) {
    if let Err(err) = e.settle(v, real) {
        tracing::warn!(sandbox = %s.sandbox, session = s.id, ino = real, "held-back writes not sent up at the {at} (the periodic flush tries again): {err}");
    }
}

/// The read-only rule, in one place: a read-only attachment refuses every mutation (the
/// exhaustive [`Op::class`]), every open for writing or truncating, and write locks.
fn check_read_only(s: &Session, op: &Op) -> FsResult<()> {
    if !s.read_only {
        return Ok(());
    }
    // Every op named (no wildcard): a new one must be decided on here too.
    let writes = match op {
        Op::Open { flags, .. } => flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0,
        Op::SetLk { lock, .. } | Op::SetLkW { lock, .. } => lock.typ == libc::F_WRLCK,
        // Each reclaimed lock is checked against the read-only rule as it is taken again.
        Op::ReclaimLocks { .. } => false,
        Op::Lookup { .. }
        | Op::Forget { .. }
        | Op::GetAttr { .. }
        | Op::SetAttr { .. }
        | Op::ReadLink { .. }
        | Op::MkNod { .. }
        | Op::MkDir { .. }
        | Op::Symlink { .. }
        | Op::Link { .. }
        | Op::Unlink { .. }
        | Op::RmDir { .. }
        | Op::Rename { .. }
        | Op::Create { .. }
        | Op::Read { .. }
        | Op::Write { .. }
        | Op::Fallocate { .. }
        | Op::Lseek { .. }
        | Op::CopyFileRange { .. }
        | Op::Fsync { .. }
        | Op::Release { .. }
        | Op::OpenDir { .. }
        | Op::ReadDir { .. }
        | Op::ReleaseDir { .. }
        | Op::StatFs
        | Op::SetXattr { .. }
        | Op::GetXattr { .. }
        | Op::ListXattr { .. }
        | Op::RemoveXattr { .. }
        | Op::Renew
        | Op::ReleaseLease
        | Op::Flush { .. }
        | Op::GetLk { .. }
        | Op::Unmounted => op.is_mutation(),
    };
    if writes {
        Err(erofs(s))
    } else {
        Ok(())
    }
}

fn erofs(s: &Session) -> FsError {
    FsError::new(libc::EROFS, format!("attachment {} of sandbox `{}` is read-only", s.attachment, s.sandbox))
}

fn execute(server: &Server, s: &Session, req: &Request) -> FsResult<(Reply, Changed)> {
    let e = &server.engine;
    let v = s.vol;
    let c = &req.caller;
    check_read_only(s, &req.op)?;
    let entry = |parent: Ino, name: &[u8]| Changed::Entries(vec![(parent, name.to_vec())]);
    Ok(match &req.op {
        Op::Lookup { parent, name } => {
            let p = s.to_real(e, *parent)?;
            let a = match name.as_slice() {
                // How exportfs (open_by_handle_at, NFS re-export) reaches an inode by number
                // ("." of it) and a directory's parent (".."): the answer passes the same scope
                // check as any inode, and ".." of this mount's root is the root.
                b"." => e.getattr(v, p)?,
                b".." if p == s.root => e.getattr(v, p)?,
                b".." => e.getattr(v, s.to_real(e, e.dir_parent(v, p)?)?)?,
                _ => e.lookup(v, p, name, c)?,
            };
            (Reply::Entry(s.grant(a)), Changed::Nothing)
        }
        Op::Forget { items } => {
            for (ino, n) in items {
                let real = if *ino == ROOT_INO { s.root } else { *ino };
                s.forget(real, *n);
            }
            (Reply::Empty, Changed::Nothing)
        }
        Op::GetAttr { ino } => (Reply::Attr(s.wire_attr(e.getattr(v, s.to_real(e, *ino)?)?)), Changed::Nothing),
        Op::SetAttr { ino, set } => {
            let real = s.to_real(e, *ino)?;
            (Reply::Attr(s.wire_attr(e.setattr(v, real, set, c)?)), Changed::Inode(real))
        }
        Op::ReadLink { ino } => (Reply::Data(e.readlink(v, s.to_real(e, *ino)?)?), Changed::Nothing),
        Op::MkNod { parent, name, mode, umask, rdev } => {
            let p = s.to_real(e, *parent)?;
            (Reply::Entry(s.grant(e.mknod(v, p, name, *mode, *umask, *rdev, c)?)), entry(p, name))
        }
        Op::MkDir { parent, name, mode, umask } => {
            let p = s.to_real(e, *parent)?;
            (Reply::Entry(s.grant(e.mkdir(v, p, name, *mode, *umask, c)?)), entry(p, name))
        }
        Op::Symlink { parent, name, target } => {
            let p = s.to_real(e, *parent)?;
            (Reply::Entry(s.grant(e.symlink(v, p, name, target, c)?)), entry(p, name))
        }
        Op::Link { ino, new_parent, new_name } => {
            let (i, p) = (s.to_real(e, *ino)?, s.to_real(e, *new_parent)?);
            (Reply::Entry(s.grant(e.link(v, i, p, new_name, c)?)), entry(p, new_name))
        }
        Op::Unlink { parent, name } => {
            let p = s.to_real(e, *parent)?;
            e.unlink(v, p, name, c)?;
            (Reply::Empty, entry(p, name))
        }
        Op::RmDir { parent, name } => {
            let p = s.to_real(e, *parent)?;
            e.rmdir(v, p, name, c)?;
            (Reply::Empty, entry(p, name))
        }
        Op::Rename { parent, name, new_parent, new_name, flags } => {
            let (p, np) = (s.to_real(e, *parent)?, s.to_real(e, *new_parent)?);
            e.rename(v, p, name, np, new_name, *flags, c)?;
            (Reply::Empty, Changed::Entries(vec![(p, name.clone()), (np, new_name.clone())]))
        }
        Op::Open { ino, flags, prefetch } => {
            let real = s.to_real(e, *ino)?;
            let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
            s.room_for_handle()?;
            let a = e.open(v, real, *flags, c)?;
            if e.shared() {
                // Changes made through other servers reach this guest by no push: at each open
                // the file's cached pages and attributes go first (close-to-open across servers).
                s.push(Notice::InvalInode { ino: *ino });
            }
            let fh = s.add_handle(real, writable, false);
            let limit = (*prefetch).min(PREFETCH_MAX);
            if a.kind != Kind::File || limit == 0 || a.size > limit as u64 {
                return Ok((Reply::Opened { fh }, Changed::Nothing));
            }
            // One byte more than asked for: a file that grew past the limit meanwhile is
            // answered without data, never cut short.
            let data = e.read_as(v, real, 0, limit + 1, !s.read_only)?;
            if data.len() > limit as usize {
                return Ok((Reply::Opened { fh }, Changed::Nothing));
            }
            (Reply::OpenedWith { fh, data }, Changed::Nothing)
        }
        Op::Create { parent, name, mode, umask, flags } => {
            let p = s.to_real(e, *parent)?;
            s.room_for_handle()?;
            let a = e.create(v, p, name, *mode, *umask, c)?;
            let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
            let fh = s.add_handle(a.ino, writable, false);
            (Reply::Created { attr: s.grant(a), fh }, entry(p, name))
        }
        Op::Read { ino, fh, offset, size } => {
            let real = s.to_real(e, *ino)?;
            s.handle(*fh, real, false)?;
            // A read-only attachment leaves atime alone, as a read-only mount does.
            let data = e.read_as(v, real, *offset, (*size).min(crate::proto::MAX_IO), !s.read_only)?;
            (Reply::Data(data), Changed::Nothing)
        }
        Op::Write { ino, fh, offset, append, data } => {
            let real = s.to_real(e, *ino)?;
            s.handle(*fh, real, true)?;
            let (at, attr) = e.write_behind(v, real, *offset, data, *append, c)?;
            let written = data.len() as u32;
            let reply = if *append { Reply::Appended { written, offset: at, attr: s.wire_attr(attr) } } else { Reply::Written(written) };
            (reply, Changed::Inode(real))
        }
        Op::Fallocate { ino, fh, offset, length, mode } => {
            let real = s.to_real(e, *ino)?;
            s.handle(*fh, real, true)?;
            e.fallocate(v, real, *offset, *length, *mode, c)?;
            (Reply::Empty, Changed::Inode(real))
        }
        Op::Lseek { ino, fh, offset, whence } => {
            let real = s.to_real(e, *ino)?;
            s.handle(*fh, real, false)?;
            (Reply::Offset(e.lseek(v, real, *offset, *whence)?), Changed::Nothing)
        }
        Op::CopyFileRange { ino_in, fh_in, offset_in, ino_out, fh_out, offset_out, len } => {
            let (src, dst) = (s.to_real(e, *ino_in)?, s.to_real(e, *ino_out)?);
            s.handle(*fh_in, src, false)?;
            s.handle(*fh_out, dst, true)?;
            let (n, _) = e.copy_range(v, src, *offset_in, dst, *offset_out, *len, c)?;
            (Reply::Written(n as u32), Changed::Inode(dst))
        }
        Op::Fsync { ino, fh: _, datasync } => {
            e.fsync(v, s.to_real(e, *ino)?, *datasync)?;
            (Reply::Empty, Changed::Nothing)
        }
        Op::Release { ino, fh, lock_owner } => {
            let real = s.to_real(e, *ino)?;
            s.take_handle(*fh, real)?;
            if let Some(owner) = lock_owner {
                // Whoever takes these locks next reads what was written under them.
                settle_or_warn(s, e, v, real, "release");
                server.lock_freed(real, &server.locks.release_owner(v, real, s.id, *owner, server.remote_locks().as_ref()));
            }
            e.release(v, real)?;
            (Reply::Empty, Changed::Nothing)
        }
        Op::ReleaseDir { ino, fh } => {
            let real = s.to_real(e, *ino)?;
            s.take_handle(*fh, real)?;
            e.release(v, real)?;
            (Reply::Empty, Changed::Nothing)
        }
        Op::Flush { ino, fh: _, lock_owner } => {
            let real = s.to_real(e, *ino)?;
            // A close: what this file's writes left held back goes up before close() returns
            // (close-to-open for other servers' guests), and before its locks are freed.
            settle_or_warn(s, e, v, real, "close");
            server.lock_freed(real, &server.locks.release_owner(v, real, s.id, *lock_owner, server.remote_locks().as_ref()));
            (Reply::Empty, Changed::Nothing)
        }
        Op::GetLk { ino, lock } => {
            (Reply::Lock(server.locks.test(v, s.to_real(e, *ino)?, s.id, lock, server.remote_locks().as_ref())?), Changed::Nothing)
        }
        Op::SetLk { ino, lock } | Op::SetLkW { ino, lock } => {
            let real = s.to_real(e, *ino)?;
            if lock.typ != libc::F_UNLCK && server.in_lock_grace() {
                return Err(FsError::new(libc::EAGAIN, "the server restarted: locks held before are being reclaimed (grace period)"));
            }
            let wait = matches!(req.op, Op::SetLkW { .. });
            if lock.typ == libc::F_UNLCK {
                // Whoever takes the lock next (through any server) reads what was written
                // under it.
                settle_or_warn(s, e, v, real, "unlock");
            }
            server.lock_freed(real, &server.locks.set_or_wait(v, real, s.id, lock, wait, server.remote_locks().as_ref())?);
            (Reply::Empty, Changed::Nothing)
        }
        Op::ReclaimLocks { locks } => {
            if !s.may_reclaim.swap(false, Ordering::SeqCst) {
                return Err(FsError::new(libc::EPERM, "only a session that replaces one the server lost may reclaim locks, once"));
            }
            if locks.len() > super::locks::MAX_LOCKS_PER_SESSION {
                return Err(FsError::new(libc::ENOLCK, format!("{} locks to reclaim, more than a session may hold", locks.len())));
            }
            let mut failed = Vec::new();
            for (i, (ino, lock)) in locks.iter().enumerate() {
                let taken = s.to_real(e, *ino).and_then(|real| {
                    if lock.typ == libc::F_UNLCK {
                        return Err(FsError::new(libc::EINVAL, "an unlock is not a lock to reclaim"));
                    }
                    if s.read_only && lock.typ == libc::F_WRLCK {
                        return Err(erofs(s));
                    }
                    server.locks.set(v, real, s.id, lock, server.remote_locks().as_ref()).map(|_| ())
                });
                if let Err(err) = taken {
                    tracing::warn!(sandbox = %s.sandbox, session = s.id, ino, start = lock.start, end = lock.end, pid = lock.pid, "lock not reclaimed after the restart (its holder is told on its next lock call): {err}");
                    failed.push(i as u32);
                }
            }
            tracing::info!(sandbox = %s.sandbox, session = s.id, reclaimed = locks.len() - failed.len(), failed = failed.len(), "locks reclaimed");
            server.reclaimed(s.attachment);
            (Reply::Reclaimed { failed }, Changed::Nothing)
        }
        Op::ReleaseLease => {
            tracing::info!(sandbox = %s.sandbox, session = s.id, "lease released by the guest");
            s.set_lease(LeaseState::Released);
            // Hibernating: nothing this server held back for the volume waits for the resume.
            if let Err(err) = e.settle_volume(v) {
                tracing::warn!(sandbox = %s.sandbox, session = s.id, "held-back writes not sent up at the lease release (the periodic flush tries again): {err}");
            }
            server.lock_freed_all(server.locks.release_session(s.id, server.remote_locks().as_ref()));
            let _ = e.set_attachment_state(s.attachment, AttachState::Released, "lease released by the guest (hibernated or unmounted)");
            (Reply::Empty, Changed::Nothing)
        }
        Op::Unmounted => {
            tracing::info!(sandbox = %s.sandbox, session = s.id, "the guest unmounted this volume: session ended");
            s.set_lease(LeaseState::Released);
            server.locks.release_session(s.id, server.remote_locks().as_ref());
            // The kernel released every file before the unmount completed; whatever the guest
            // still claims to hold goes now. The session itself is dropped once the reply is out.
            s.release_handles(e);
            let _ = e.set_attachment_state(s.attachment, AttachState::Released, "unmounted in the guest");
            (Reply::Empty, Changed::Nothing)
        }
        Op::OpenDir { ino } => {
            let real = s.to_real(e, *ino)?;
            s.room_for_handle()?;
            e.opendir(v, real, c)?;
            (Reply::Opened { fh: s.add_handle(real, false, true) }, Changed::Nothing)
        }
        Op::ReadDir { ino, fh: _, cookie, plus, max_entries } => {
            let real = s.to_real(e, *ino)?;
            // A read-only attachment leaves atime alone, as a read-only mount does.
            let mut entries = e.readdir_as(v, real, *cookie, *max_entries, *plus, !s.read_only)?;
            // Stop at a byte budget, before anything is counted as looked up: the reply must
            // fit one frame whatever the names' lengths (the guest asks again from the cookie).
            let mut bytes = 0;
            let fit = entries.iter().take_while(|d| {
                bytes += d.name.len() + DIRENT_OVERHEAD;
                bytes <= READDIR_BUDGET
            });
            let keep = fit.count().max(1);
            entries.truncate(keep);
            for d in &mut entries {
                if d.name == b".." && real == s.root {
                    // The mount's root is its own parent: nothing above it is named.
                    d.ino = real;
                    d.attr = if *plus { Some(e.getattr(v, real)?) } else { None };
                }
                let dots = d.name == b"." || d.name == b"..";
                d.ino = s.to_wire(d.ino);
                if let Some(a) = d.attr.take() {
                    // readdirplus counts as a lookup of every entry but `.` and `..`.
                    d.attr = Some(if dots { s.wire_attr(a) } else { s.grant(a) });
                }
            }
            (Reply::Dir(entries), Changed::Nothing)
        }
        Op::StatFs => (Reply::StatFs(e.statfs(v)?), Changed::Nothing),
        Op::SetXattr { ino, name, value, flags } => {
            let real = s.to_real(e, *ino)?;
            e.setxattr(v, real, name, value, *flags, c)?;
            (Reply::Empty, Changed::Inode(real))
        }
        Op::GetXattr { ino, name } => (Reply::Xattr(e.getxattr(v, s.to_real(e, *ino)?, name, c)?), Changed::Nothing),
        Op::ListXattr { ino } => (Reply::Xattr(e.listxattr(v, s.to_real(e, *ino)?, c)?), Changed::Nothing),
        Op::RemoveXattr { ino, name } => {
            let real = s.to_real(e, *ino)?;
            e.removexattr(v, real, name, c)?;
            (Reply::Empty, Changed::Inode(real))
        }
        Op::Renew => (Reply::Empty, Changed::Nothing),
    })
}

/// Ends sessions whose lease went unrenewed longer than the TTL.
pub fn start_reaper(server: &Arc<Server>) {
    let weak: Weak<Server> = Arc::downgrade(server);
    std::thread::Builder::new()
        .name("lease-reaper".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            let Some(server) = weak.upgrade() else { return };
            let ttl = server.config.lease_ttl;
            for s in server.sessions_where(|s| s.expired(ttl)) {
                let why = format!("lease expired: the guest did not renew it for {}s (VM stopped or agent killed)", ttl.as_secs());
                server.end_session(&s, AttachState::Failed, &why);
            }
        })
        .expect("spawn reaper");
}

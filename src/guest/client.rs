//! The guest's connection to the host for one mount: multiplexed, asynchronous, reconnecting.
//!
//! Callers hand in an [`Op`] and a callback; the request goes out at once with a fresh id and
//! the callback runs on the reader thread when its reply arrives, so any number of requests can
//! be in flight on one socket and FUSE worker threads never wait on the network.
//!
//! Every request stays in the pending table until it is answered. When the connection drops
//! (snapshot restore, server restart, hibernation), the reader reconnects with backoff, resumes
//! its session and sends every pending request again with the same id and sequence number; the
//! server answers a mutation it already applied from its replay record. Callers just see a slow
//! reply, never an error.
//!
//! If the server no longer has the session (it restarted), the client gets a fresh one and opens
//! every handle the kernel holds again before resending; requests name handles by the number the
//! kernel knows, translated to the current session's number as they are sent. The kernel's
//! numbers are this client's own, never a session's: a restarted server numbers its handles from
//! 1 again, and a handle opened after the restart must not take the number of one opened before
//! it (its writes would reach the other file).

use crate::fs::{Caller, FsError, FsResult};
use crate::proto::Lock;
use crate::proto::{self, Hello, Notice, Op, Reply, Request, Role, ServerMsg, Welcome, PROTOCOL_VERSION};
use crate::transport::{Endpoint, Stream};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub type Callback = Box<dyn FnOnce(FsResult<Reply>) + Send>;
/// Where pushed invalidations go.
type NoticeSink = Box<dyn Fn(Notice) + Send + Sync>;

struct Pending {
    /// As the caller made it: handle numbers are the kernel's, translated at each send.
    req: Request,
    cb: Callback,
    /// When it was handed in, for the host timeout.
    since: Instant,
}

/// A handle the kernel holds: what it opened, and its number in the current session.
#[derive(Clone)]
struct OpenHandle {
    ino: u64,
    flags: i32,
    dir: bool,
    current: u64,
}

/// The handle fields of an op (every op is named: a new one must say whether it carries a
/// handle, or a reconnect would send the kernel's number to a server that never issued it).
fn fhs_of(op: &mut Op) -> Vec<&mut u64> {
    match op {
        Op::Read { fh, .. }
        | Op::Write { fh, .. }
        | Op::Fallocate { fh, .. }
        | Op::Lseek { fh, .. }
        | Op::Fsync { fh, .. }
        | Op::Release { fh, .. }
        | Op::ReleaseDir { fh, .. }
        | Op::ReadDir { fh, .. }
        | Op::Flush { fh, .. } => vec![fh],
        Op::CopyFileRange { fh_in, fh_out, .. } => vec![fh_in, fh_out],
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
        | Op::Open { .. }
        | Op::Create { .. }
        | Op::OpenDir { .. }
        | Op::StatFs
        | Op::SetXattr { .. }
        | Op::GetXattr { .. }
        | Op::ListXattr { .. }
        | Op::RemoveXattr { .. }
        | Op::Renew
        | Op::ReleaseLease
        | Op::Unmounted
        | Op::GetLk { .. }
        | Op::SetLk { .. }
        | Op::SetLkW { .. }
        | Op::ReclaimLocks { .. } => Vec::new(),
    }
}

/// What the server granted this mount.
#[derive(Debug, Clone)]
pub struct Granted {
    pub session: u64,
    pub attachment: u64,
    pub read_only: bool,
    pub volume: String,
    pub lease_ttl: Duration,
    pub holds_writes: bool,
}

#[derive(Default)]
struct Link {
    writer: Option<Stream>,
}

pub struct MountClient {
    endpoint: Endpoint,
    path: String,
    link: Mutex<Link>,
    granted: Mutex<Granted>,
    pending: Mutex<BTreeMap<u64, Pending>>,
    handles: Mutex<std::collections::HashMap<u64, OpenHandle>>,
    /// The next handle number handed to the kernel.
    next_fh: AtomicU64,
    next_id: AtomicU64,
    /// Connections made after the first (a push sent while none was up is lost).
    links: AtomicU64,
    next_seq: AtomicU64,
    closing: AtomicBool,
    /// Set while the mount is paused (hibernation): requests queue and wait.
    paused: Mutex<bool>,
    resumed: Condvar,
    /// Set while the lease is given up: the reader does not reconnect until it is cleared.
    hibernated: Mutex<bool>,
    woken: Condvar,
    notices: Mutex<Option<NoticeSink>>,
    /// Runs after each reconnection (pushes may have been lost while the link was down).
    relinked: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    /// Why the mount is dead, if it is (attachment gone): every request fails with it.
    dead: Mutex<Option<FsError>>,
    /// Set when the mount is being stopped: past this instant, a host that cannot be reached
    /// is given up on (pending requests fail with EIO) instead of waited for.
    give_up_at: Mutex<Option<Instant>>,
    /// How long a request may wait for a host that cannot be reached before it fails with EIO
    /// (an NFS "soft" mount's timeout): a server that is gone never leaves a process, an
    /// `umount` or a `stat`, sleeping for good.
    host_timeout: Duration,
    /// Itself, for callbacks that outlive a call.
    me: Mutex<std::sync::Weak<MountClient>>,
    /// The locks the host has granted this mount, by inode (the owner is in each lock), kept
    /// as the host keeps them (POSIX replace and split): reclaimed from a restarted server.
    held: Mutex<HashMap<u64, Vec<Lock>>>,
    /// (inode, owner) whose locks a restarted server would not give back: the owner's next lock
    /// call on the inode fails with EIO, so that a holder learns it lost its lock.
    lost: Mutex<HashSet<(u64, u64)>>,
}

/// Applies a granted lock or unlock to `held` as the host does: the owner's ranges are cut
/// out of the range, then the new lock (if not an unlock) is added.
fn apply_lock(held: &mut HashMap<u64, Vec<Lock>>, ino: u64, l: &Lock) {
    let mut kept = Vec::new();
    for h in held.remove(&ino).unwrap_or_default() {
        if h.owner != l.owner || h.end < l.start || h.start > l.end {
            kept.push(h);
            continue;
        }
        if h.start < l.start {
            kept.push(Lock { end: l.start - 1, ..h.clone() });
        }
        if h.end > l.end {
            kept.push(Lock { start: l.end + 1, ..h.clone() });
        }
    }
    if l.typ != libc::F_UNLCK {
        kept.push(l.clone());
    }
    if !kept.is_empty() {
        held.insert(ino, kept);
    }
}

fn forget_owner(held: &mut HashMap<u64, Vec<Lock>>, ino: u64, owner: u64) {
    if let Some(v) = held.get_mut(&ino) {
        v.retain(|l| l.owner != owner);
        if v.is_empty() {
            held.remove(&ino);
        }
    }
}

fn handshake(endpoint: &Endpoint, path: &str, resume: Option<u64>) -> Result<(Stream, Granted), FsError> {
    let mut s = endpoint.connect().map_err(|e| FsError::new(libc::ENOTCONN, format!("cannot connect to {endpoint}: {e}")))?;
    let io = |e: std::io::Error| FsError::new(libc::ENOTCONN, format!("handshake with {endpoint}: {e}"));
    proto::write_frame(&mut s, &Hello { version: PROTOCOL_VERSION, role: Role::Mount { path: path.to_string(), resume } }).map_err(io)?;
    match proto::read_frame::<Welcome>(&mut s).map_err(io)? {
        Some(Welcome::Mount { session, attachment, read_only, volume, lease_ttl_ms, holds_writes }) => Ok((
            s,
            Granted { session, attachment, read_only, volume, lease_ttl: Duration::from_millis(lease_ttl_ms.max(300)), holds_writes },
        )),
        Some(Welcome::Refused(e)) => Err(e),
        Some(other) => Err(FsError::new(libc::EPROTO, format!("unexpected answer to a mount hello: {other:?}"))),
        None => Err(FsError::new(libc::ENOTCONN, format!("{endpoint} closed the connection during the handshake"))),
    }
}

/// Bounded exponential backoff with jitter, for a host that answers "not now" (`EAGAIN`: a
/// sandbox at its session limit, a server busy starting): each wait is drawn between half and
/// all of the current step, and the step doubles up to `max`, so many guests refused at once
/// neither hammer the host nor retry in lockstep.
pub struct Backoff {
    step: Duration,
    max: Duration,
    seed: u64,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Backoff { step: first.min(max), max, seed: (now ^ n ^ (std::process::id() as u64).rotate_left(32)) | 1 }
    }

    /// How long to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        // xorshift64: jitter needs spread, not cryptographic randomness.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let half = self.step / 2;
        let nanos = half.as_nanos() as u64;
        let delay = half + Duration::from_nanos(if nanos == 0 { 0 } else { self.seed % (nanos + 1) });
        self.step = (self.step * 2).min(self.max);
        delay
    }
}

/// The first wait and the longest step of [`Backoff`] for a busy host.
pub const BUSY_FIRST: Duration = Duration::from_millis(50);
pub const BUSY_MAX: Duration = Duration::from_secs(2);

/// The reader's buffer: a 1 MiB read reply takes a few reads, and small replies with the
/// pushes before them come in one.
const READ_BUFFER: usize = 256 << 10;

/// Asks the server which attachments this sandbox has.
pub fn control_hello(endpoint: &Endpoint) -> Result<(String, Vec<proto::AttachmentSpec>), FsError> {
    let mut s = endpoint.connect().map_err(|e| FsError::new(libc::ENOTCONN, format!("cannot connect to {endpoint}: {e}")))?;
    let io = |e: std::io::Error| FsError::new(libc::ENOTCONN, format!("handshake with {endpoint}: {e}"));
    proto::write_frame(&mut s, &Hello { version: PROTOCOL_VERSION, role: Role::Control }).map_err(io)?;
    match proto::read_frame::<Welcome>(&mut s).map_err(io)? {
        Some(Welcome::Control { sandbox, attachments }) => Ok((sandbox, attachments)),
        Some(Welcome::Refused(e)) => Err(e),
        Some(other) => Err(FsError::new(libc::EPROTO, format!("unexpected answer to a control hello: {other:?}"))),
        None => Err(FsError::new(libc::ENOTCONN, format!("{endpoint} closed the connection during the handshake"))),
    }
}

impl MountClient {
    /// Connects and opens a session for the attachment at `path`; fails with the server's
    /// reason. A renewal thread keeps the lease alive from then on.
    ///
    /// A host that answers `EAGAIN` (busy) is asked again with [`Backoff`] for up to
    /// `host_timeout`; any other refusal, and a host that cannot be reached, fail at once.
    pub fn connect(endpoint: Endpoint, path: &str, host_timeout: Duration) -> Result<Arc<MountClient>, FsError> {
        let deadline = Instant::now() + host_timeout;
        let mut backoff = Backoff::new(BUSY_FIRST, BUSY_MAX);
        let (stream, granted) = loop {
            match handshake(&endpoint, path, None) {
                Ok(r) => break r,
                Err(e) if e.errno == libc::EAGAIN && Instant::now() < deadline => {
                    let d = backoff.next_delay().min(deadline.saturating_duration_since(Instant::now()));
                    tracing::info!("mount at {path}: host busy ({}); asking again in {d:?}", e.msg);
                    std::thread::sleep(d);
                }
                Err(e) => return Err(e),
            }
        };
        let reader = stream.try_clone().map_err(FsError::from)?;
        let client = Arc::new(MountClient {
            endpoint,
            path: path.to_string(),
            link: Mutex::new(Link { writer: Some(stream) }),
            granted: Mutex::new(granted),
            pending: Mutex::new(BTreeMap::new()),
            handles: Mutex::new(std::collections::HashMap::new()),
            next_fh: AtomicU64::new(1),
            next_id: AtomicU64::new(1),
            links: AtomicU64::new(0),
            next_seq: AtomicU64::new(1),
            closing: AtomicBool::new(false),
            paused: Mutex::new(false),
            resumed: Condvar::new(),
            hibernated: Mutex::new(false),
            woken: Condvar::new(),
            notices: Mutex::new(None),
            relinked: Mutex::new(None),
            dead: Mutex::new(None),
            give_up_at: Mutex::new(None),
            host_timeout,
            me: Mutex::new(std::sync::Weak::new()),
            held: Mutex::default(),
            lost: Mutex::default(),
        });
        *client.me.lock().unwrap() = Arc::downgrade(&client);
        let c = client.clone();
        std::thread::Builder::new().name("vfs-conn".into()).spawn(move || c.reader(reader)).map_err(FsError::from)?;
        let weak = Arc::downgrade(&client);
        std::thread::Builder::new().name("vfs-renew".into()).spawn(move || renew_loop(weak)).map_err(FsError::from)?;
        Ok(client)
    }

    fn connected(&self) -> bool {
        self.link.lock().unwrap().writer.is_some()
    }

    fn is_hibernated(&self) -> bool {
        *self.hibernated.lock().unwrap()
    }

    /// Hibernation, after the caller has flushed the kernel's dirty pages: new requests wait,
    /// requests in flight finish, then the lease is given up and the connection closed.
    pub fn hibernate(&self, timeout: Duration) -> FsResult<()> {
        self.pause();
        let deadline = std::time::Instant::now() + timeout;
        while self.in_flight() > 0 {
            if std::time::Instant::now() > deadline {
                self.resume();
                return Err(FsError::new(libc::ETIMEDOUT, format!("{} request(s) still in flight after {timeout:?}", self.in_flight())));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        *self.hibernated.lock().unwrap() = true;
        let released = self.release_lease(timeout);
        // The host drops a released session's locks: there is nothing left to reclaim.
        self.held.lock().unwrap().clear();
        self.drop_connection();
        released.map(|_| ())
    }

    /// Gives the lease back and waits for the answer (bypassing a pause: the lease release is
    /// what a paused mount is waiting to send). The caller has stopped the reader from
    /// reconnecting when the server closes the connection after answering.
    fn release_lease(&self, timeout: Duration) -> FsResult<Reply> {
        let (tx, rx) = mpsc::channel();
        self.send_now(
            Caller::root(),
            Op::ReleaseLease,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv_timeout(timeout).unwrap_or_else(|_| Err(FsError::new(libc::ETIMEDOUT, "no answer to the lease release")))
    }

    /// Takes the lease again (reconnecting with the same session) and lets waiting requests go.
    pub fn wake(&self, timeout: Duration) -> FsResult<()> {
        *self.hibernated.lock().unwrap() = false;
        self.woken.notify_all();
        let deadline = std::time::Instant::now() + timeout;
        while !self.connected() {
            if let Some(e) = self.dead.lock().unwrap().clone() {
                return Err(e);
            }
            if std::time::Instant::now() > deadline {
                return Err(FsError::new(libc::ETIMEDOUT, format!("could not reach the host within {timeout:?}")));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.resume();
        Ok(())
    }

    /// Counts reconnections: cache knowledge gathered before the current connection may have
    /// missed a push (see the guest's page-cache rule in `fuse.rs`).
    pub fn link_generation(&self) -> u64 {
        self.links.load(Ordering::SeqCst)
    }

    /// Whether the server holds this mount's writes back (see [`Welcome::Mount`]).
    pub fn holds_writes(&self) -> bool {
        self.granted.lock().unwrap().holds_writes
    }

    pub fn granted(&self) -> Granted {
        self.granted.lock().unwrap().clone()
    }

    /// Where pushed invalidations go. Runs on the reader thread: it must not block on the kernel.
    pub fn on_notice(&self, f: impl Fn(Notice) + Send + Sync + 'static) {
        *self.notices.lock().unwrap() = Some(Box::new(f));
    }

    /// What to do after each reconnection. Runs on the reader thread: it must not block on the
    /// kernel.
    pub fn on_relink(&self, f: impl Fn() + Send + Sync + 'static) {
        *self.relinked.lock().unwrap() = Some(Box::new(f));
    }

    /// Sends `op`; `cb` runs with the reply. While the mount is paused this waits.
    pub fn call_async(&self, caller: Caller, op: Op, cb: Callback) {
        {
            let mut paused = self.paused.lock().unwrap();
            while *paused && !self.closing.load(Ordering::Relaxed) {
                paused = self.resumed.wait(paused).unwrap();
            }
        }
        self.send_now(caller, op, cb)
    }

    /// The request with handle numbers of the current session.
    fn encode(&self, req: &Request) -> std::io::Result<Vec<u8>> {
        let mut req = req.clone();
        let handles = self.handles.lock().unwrap();
        for fh in fhs_of(&mut req.op) {
            if let Some(h) = handles.get(fh) {
                *fh = h.current;
            }
        }
        drop(handles);
        proto::encode(&req)
    }

    fn send_now(&self, caller: Caller, op: Op, cb: Callback) {
        if let Some(e) = self.dead.lock().unwrap().clone() {
            return cb(Err(e));
        }
        if let Op::SetLk { ino, lock } | Op::SetLkW { ino, lock } | Op::GetLk { ino, lock } = &op {
            if self.lost.lock().unwrap().remove(&(*ino, lock.owner)) {
                return cb(Err(FsError::new(libc::EIO, "a lock this owner held on this file was lost when the host restarted")));
            }
        }
        let cb = self.remember_handles(&op, cb);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let seq = if op.is_sequenced() { self.next_seq.fetch_add(1, Ordering::Relaxed) } else { 0 };
        let req = Request { id, seq, caller, op };
        // Encoded, registered and written under the link lock, so a reconnect's resend (which
        // holds it too) sends each request exactly once, and never with a handle number of the
        // session before: a reconnect that reopened the handles between the encoding and the
        // write would otherwise let the old number through (EBADF from a restarted server).
        let mut link = self.link.lock().unwrap();
        let frame = match self.encode(&req) {
            Ok(f) => f,
            Err(e) => {
                drop(link);
                return cb(Err(FsError::new(libc::EINVAL, format!("request cannot be encoded: {e}"))));
            }
        };
        self.pending.lock().unwrap().insert(id, Pending { req, cb, since: Instant::now() });
        if let Some(w) = link.writer.as_mut() {
            if std::io::Write::write_all(w, &frame).is_err() {
                w.shutdown();
                link.writer = None;
            }
        }
    }

    /// Wraps `cb` so that the handle table follows opens and releases, and the table of held
    /// locks follows what the host granted and dropped.
    fn remember_handles(&self, op: &Op, cb: Callback) -> Callback {
        let Some(me) = self.me.lock().unwrap().upgrade() else { return cb };
        let (ino, flags, dir) = match op {
            Op::Open { ino, flags, .. } => (*ino, *flags, false),
            Op::OpenDir { ino } => (*ino, libc::O_RDONLY, true),
            Op::Create { flags, .. } => (0, *flags, false),
            Op::SetLk { ino, lock } | Op::SetLkW { ino, lock } => {
                let (ino, lock) = (*ino, lock.clone());
                return Box::new(move |r: FsResult<Reply>| {
                    if r.is_ok() {
                        apply_lock(&mut me.held.lock().unwrap(), ino, &lock);
                    }
                    cb(r)
                });
            }
            Op::Flush { ino, lock_owner, .. } => {
                let (ino, owner) = (*ino, *lock_owner);
                return Box::new(move |r: FsResult<Reply>| {
                    forget_owner(&mut me.held.lock().unwrap(), ino, owner);
                    cb(r)
                });
            }
            Op::Release { fh, ino, lock_owner } => {
                let (fh, ino, owner) = (*fh, *ino, *lock_owner);
                return Box::new(move |r: FsResult<Reply>| {
                    me.handles.lock().unwrap().remove(&fh);
                    if let Some(owner) = owner {
                        forget_owner(&mut me.held.lock().unwrap(), ino, owner);
                    }
                    cb(r)
                });
            }
            Op::ReleaseDir { fh, .. } => {
                // Forgotten once answered: a resend must still be translated.
                let fh = *fh;
                return Box::new(move |r: FsResult<Reply>| {
                    me.handles.lock().unwrap().remove(&fh);
                    cb(r)
                });
            }
            // Every op named (no wildcard): one that opens or closes a handle, or takes a lock,
            // must be tracked above, or a reconnect to a restarted server would lose it.
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
            | Op::Read { .. }
            | Op::Write { .. }
            | Op::Fallocate { .. }
            | Op::Lseek { .. }
            | Op::CopyFileRange { .. }
            | Op::Fsync { .. }
            | Op::ReadDir { .. }
            | Op::StatFs
            | Op::SetXattr { .. }
            | Op::GetXattr { .. }
            | Op::ListXattr { .. }
            | Op::RemoveXattr { .. }
            | Op::Renew
            | Op::ReleaseLease
            | Op::GetLk { .. }
            | Op::Unmounted
            | Op::ReclaimLocks { .. } => return cb,
        };
        // Reopening must neither truncate nor create again.
        let flags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC);
        Box::new(move |mut r: FsResult<Reply>| {
            let opened = match &mut r {
                Ok(Reply::Opened { fh } | Reply::OpenedWith { fh, .. }) => Some((fh, ino)),
                Ok(Reply::Created { attr, fh }) => Some((fh, attr.ino)),
                _ => None,
            };
            if let Some((fh, ino)) = opened {
                // The kernel gets a number of this client's; the session's is kept for sending.
                let kernel = me.next_fh.fetch_add(1, Ordering::Relaxed);
                me.handles.lock().unwrap().insert(kernel, OpenHandle { ino, flags, dir, current: *fh });
                *fh = kernel;
            }
            cb(r)
        })
    }

    /// Sends and waits for the reply.
    pub fn call(&self, caller: Caller, op: Op) -> FsResult<Reply> {
        let (tx, rx) = mpsc::channel();
        self.call_async(
            caller,
            op,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv().unwrap_or_else(|_| Err(FsError::new(libc::EIO, "mount client stopped")))
    }

    /// Pauses new requests (they wait, they do not fail) until [`MountClient::resume`].
    pub fn pause(&self) {
        *self.paused.lock().unwrap() = true;
    }

    pub fn resume(&self) {
        *self.paused.lock().unwrap() = false;
        self.resumed.notify_all();
    }

    /// Number of requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.pending.lock().unwrap().len()
    }

    /// Drops the current connection from the guest side (the reader reconnects).
    pub fn drop_connection(&self) {
        if let Some(w) = self.link.lock().unwrap().writer.take() {
            w.shutdown();
        }
    }

    /// The mount is being stopped (agent shutdown, detach): from now on the host is waited for
    /// at most `grace` more. A host still unreachable then is given up on: pending and new
    /// requests fail with EIO, so a flush or an unmount never sleeps until a server returns.
    pub fn stopping(&self, grace: Duration) {
        self.give_up_at.lock().unwrap().get_or_insert(Instant::now() + grace);
    }

    /// Stops for good: gives the lease back (so the host records a clean release rather than
    /// an expiry), then no reconnect; pending requests fail.
    pub fn close(&self) {
        if self.connected() && !self.is_hibernated() {
            // Hold the reader back from reconnecting when the server closes after the release.
            *self.hibernated.lock().unwrap() = true;
            let _ = self.release_lease(Duration::from_secs(2));
        }
        self.shut_down();
    }

    /// The mount is gone from the guest's kernel (a plain `umount` inside the guest): tells the
    /// host, which ends the session and records the attachment as released "unmounted in the
    /// guest", then stops for good. A hibernated mount reconnects first (the host must hear it
    /// on this session); a host not reachable within `timeout` is not told (its lease then
    /// expires). Returns whether the host acknowledged.
    pub fn unmounted(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        *self.hibernated.lock().unwrap() = false;
        self.woken.notify_all();
        while !self.connected() && self.dead.lock().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut told = false;
        if self.connected() {
            // Hold the reader back from reconnecting when the server closes after answering.
            *self.hibernated.lock().unwrap() = true;
            let (tx, rx) = mpsc::channel();
            self.send_now(
                Caller::root(),
                Op::Unmounted,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            );
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
            match rx.recv_timeout(left) {
                Ok(Ok(_)) => told = true,
                Ok(Err(e)) => tracing::warn!("mount at {}: the host did not take the unmount: {e}", self.path),
                Err(_) => tracing::warn!("mount at {}: no answer from the host to the unmount within {left:?}", self.path),
            }
        } else {
            tracing::warn!("mount at {}: host unreachable for {timeout:?}; the unmount is not reported", self.path);
        }
        self.shut_down();
        told
    }

    /// No reconnect from now on; pending and later requests fail.
    fn shut_down(&self) {
        self.closing.store(true, Ordering::SeqCst);
        // A lazily detached mount keeps serving open files: they now fail at once, as on a
        // dead FUSE mount, instead of waiting for a connection that will not come back.
        *self.dead.lock().unwrap() = Some(FsError::new(libc::ENOTCONN, "volume detached from this sandbox"));
        self.woken.notify_all();
        self.resume();
        self.drop_connection();
        self.fail_all(FsError::new(libc::ENOTCONN, "volume detached from this sandbox"));
    }

    /// Fails, with EIO, each pending request that has waited longer than the host timeout since
    /// the connection was lost at `lost` (or since it was made, if later). A mutation failed
    /// this way may still have been applied if its reply was what got lost.
    fn expire_pending(&self, lost: Instant, e: &FsError) {
        let now = Instant::now();
        let expired: Vec<Pending> = {
            let mut pending = self.pending.lock().unwrap();
            let ids: Vec<u64> =
                pending.iter().filter(|(_, p)| now.duration_since(p.since.max(lost)) >= self.host_timeout).map(|(id, _)| *id).collect();
            ids.iter().filter_map(|id| pending.remove(id)).collect()
        };
        if expired.is_empty() {
            return;
        }
        let why = FsError::new(libc::EIO, format!("host unreachable for {:?}: {}", self.host_timeout, e.msg));
        tracing::warn!("mount at {}: failing {} request(s): {why}", self.path, expired.len());
        for p in expired {
            (p.cb)(Err(why.clone()));
        }
    }

    fn fail_all(&self, e: FsError) {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap());
        for (_, p) in pending {
            (p.cb)(Err(e.clone()));
        }
    }

    fn reader(self: Arc<Self>, stream: Stream) {
        // Buffered: a reply and the pushes before it arrive together, read in one call.
        let mut stream = std::io::BufReader::with_capacity(READ_BUFFER, stream);
        loop {
            match proto::read_frame::<ServerMsg>(&mut stream) {
                Ok(Some(ServerMsg::Reply { id, result })) => {
                    let p = self.pending.lock().unwrap().remove(&id);
                    if let Some(p) = p {
                        (p.cb)(result);
                    }
                }
                Ok(Some(ServerMsg::Notify(n))) => {
                    if let Some(f) = self.notices.lock().unwrap().as_ref() {
                        f(n);
                    }
                }
                Ok(None) | Err(_) => {
                    stream.get_ref().shutdown();
                    match self.reconnect() {
                        Some(s) => stream = std::io::BufReader::with_capacity(READ_BUFFER, s),
                        None => return,
                    }
                }
            }
        }
    }

    /// One request and its reply on a connection nothing else uses yet (pushes are passed on).
    fn exchange(&self, w: &mut Stream, r: &mut Stream, op: Op, seq: u64) -> std::io::Result<FsResult<Reply>> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        proto::write_frame(w, &Request { id, seq, caller: Caller::root(), op })?;
        loop {
            match proto::read_frame::<ServerMsg>(r)? {
                Some(ServerMsg::Reply { id: got, result }) if got == id => return Ok(result),
                Some(ServerMsg::Notify(n)) => {
                    if let Some(f) = self.notices.lock().unwrap().as_ref() {
                        f(n);
                    }
                }
                Some(_) => {}
                None => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            }
        }
    }

    /// On a fresh session, after the handles: asks the host for every lock it had granted this
    /// mount. One it will not give back (someone else holds the range now) is forgotten here
    /// and marked lost, so its owner's next lock call on that file fails instead of the owner
    /// going on believing it holds it.
    /// `seq` is the same on every try: a reclaim whose reply was lost with the connection is
    /// answered from the session's replay record, not refused as a second reclaim.
    fn reclaim_locks(&self, w: &mut Stream, r: &mut Stream, seq: u64) -> std::io::Result<()> {
        let locks: Vec<(u64, Lock)> = self.held.lock().unwrap().iter().flat_map(|(ino, v)| v.iter().map(|l| (*ino, l.clone()))).collect();
        let failed: Vec<usize> = match self.exchange(w, r, Op::ReclaimLocks { locks: locks.clone() }, seq)? {
            Ok(Reply::Reclaimed { failed }) => failed.into_iter().map(|i| i as usize).filter(|i| *i < locks.len()).collect(),
            other => {
                tracing::error!("mount at {}: the host did not take back any of {} lock(s): {other:?}", self.path, locks.len());
                (0..locks.len()).collect()
            }
        };
        for i in failed {
            let (ino, l) = &locks[i];
            tracing::error!(
                "mount at {}: lock on inode {ino} bytes {}-{} (pid {}) lost across the host restart",
                self.path,
                l.start,
                l.end,
                l.pid
            );
            forget_owner(&mut self.held.lock().unwrap(), *ino, l.owner);
            self.lost.lock().unwrap().insert((*ino, l.owner));
        }
        Ok(())
    }

    /// On a fresh session (the server lost the old one), opens every handle the kernel holds
    /// again, one request at a time on the new connection before anything else is sent on it.
    fn reopen_handles(&self, w: &mut Stream, r: &mut Stream) -> std::io::Result<()> {
        let handles: Vec<(u64, OpenHandle)> = self.handles.lock().unwrap().iter().map(|(k, h)| (*k, h.clone())).collect();
        for (kfh, h) in handles {
            let op = if h.dir { Op::OpenDir { ino: h.ino } } else { Op::Open { ino: h.ino, flags: h.flags, prefetch: 0 } };
            match self.exchange(w, r, op, 0)? {
                Ok(Reply::Opened { fh }) => {
                    if let Some(h) = self.handles.lock().unwrap().get_mut(&kfh) {
                        h.current = fh;
                    }
                }
                other => tracing::warn!("could not reopen inode {} after the host lost this mount's session: {other:?}", h.ino),
            }
        }
        Ok(())
    }

    /// Reconnects with backoff, resumes the session and resends every pending request.
    fn reconnect(&self) -> Option<Stream> {
        self.link.lock().unwrap().writer = None;
        let lost = Instant::now();
        let mut delay = Duration::from_millis(10);
        let mut busy = Backoff::new(BUSY_FIRST, BUSY_MAX);
        // Set once a fresh session was granted and until its handles and locks are back: a
        // connection that breaks in between resumes the new session, which still needs them.
        let mut restore = false;
        let mut reclaim_seq = 0;
        loop {
            {
                let mut h = self.hibernated.lock().unwrap();
                while *h && !self.closing.load(Ordering::SeqCst) {
                    h = self.woken.wait(h).unwrap();
                }
            }
            if self.closing.load(Ordering::SeqCst) {
                return None;
            }
            let resume = Some(self.granted.lock().unwrap().session);
            match handshake(&self.endpoint, &self.path, resume) {
                Ok((mut stream, granted)) => {
                    let mut reader = stream.try_clone().ok()?;
                    let fresh = granted.session != self.granted.lock().unwrap().session;
                    *self.granted.lock().unwrap() = granted;
                    let mut link = self.link.lock().unwrap();
                    restore |= fresh;
                    if fresh {
                        reclaim_seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
                    }
                    if restore
                        && (self.reopen_handles(&mut stream, &mut reader).is_err()
                            || self.reclaim_locks(&mut stream, &mut reader, reclaim_seq).is_err())
                    {
                        // The new connection broke already: start over.
                        continue;
                    }
                    link.writer = Some(stream);
                    self.links.fetch_add(1, Ordering::SeqCst);
                    if let Some(f) = self.relinked.lock().unwrap().as_ref() {
                        f();
                    }
                    // Resend under the link lock so that no new request overtakes an old one.
                    let frames: Vec<Vec<u8>> = self.pending.lock().unwrap().values().filter_map(|p| self.encode(&p.req).ok()).collect();
                    if let Some(w) = link.writer.as_mut() {
                        for f in frames {
                            if std::io::Write::write_all(w, &f).is_err() {
                                break;
                            }
                        }
                    }
                    return Some(reader);
                }
                Err(e) if e.errno == libc::ENOTCONN => {
                    if self.give_up_at.lock().unwrap().is_some_and(|t| Instant::now() >= t) {
                        let why = FsError::new(libc::EIO, format!("host unreachable while stopping the mount: {}", e.msg));
                        tracing::error!("mount at {}: {why}", self.path);
                        *self.dead.lock().unwrap() = Some(why.clone());
                        self.fail_all(why);
                        return None;
                    }
                    self.expire_pending(lost, &e);
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
                Err(e) if e.errno == libc::EAGAIN => {
                    // Busy (the sandbox at its session limit, say): not a refusal for good.
                    // Waiting requests time out as for a host that cannot be reached.
                    if self.give_up_at.lock().unwrap().is_some_and(|t| Instant::now() >= t) {
                        let why = FsError::new(libc::EIO, format!("host busy while stopping the mount: {}", e.msg));
                        tracing::error!("mount at {}: {why}", self.path);
                        *self.dead.lock().unwrap() = Some(why.clone());
                        self.fail_all(why);
                        return None;
                    }
                    self.expire_pending(lost, &e);
                    let d = busy.next_delay();
                    tracing::info!("mount at {}: host busy ({}); reconnecting in {d:?}", self.path, e.msg);
                    std::thread::sleep(d);
                }
                Err(e) => {
                    // The server refused us for good (attachment detached, volume deleted).
                    tracing::error!("mount at {} ended: {e}", self.path);
                    *self.dead.lock().unwrap() = Some(FsError::new(libc::EIO, format!("volume unavailable: {}", e.msg)));
                    self.fail_all(FsError::new(libc::EIO, format!("volume unavailable: {}", e.msg)));
                    return None;
                }
            }
        }
    }
}

/// Renews the lease at a third of its TTL while the mount is connected and not hibernated.
fn renew_loop(client: std::sync::Weak<MountClient>) {
    loop {
        let Some(c) = client.upgrade() else { return };
        if c.closing.load(Ordering::SeqCst) {
            return;
        }
        let period = c.granted.lock().unwrap().lease_ttl / 3;
        if c.connected() && !c.is_hibernated() && c.pending.lock().unwrap().len() < 1024 {
            c.send_now(Caller::root(), Op::Renew, Box::new(|_| {}));
        }
        drop(c);
        std::thread::sleep(period.max(Duration::from_millis(100)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_bound_with_jitter() {
        let (first, max) = (Duration::from_millis(50), Duration::from_secs(2));
        let mut b = Backoff::new(first, max);
        let mut step = first;
        let mut delays = Vec::new();
        for _ in 0..12 {
            let d = b.next_delay();
            assert!(d >= step / 2 && d <= step, "delay {d:?} outside [{:?}, {step:?}]", step / 2);
            delays.push(d);
            step = (step * 2).min(max);
        }
        // Bounded: the last waits are all within the largest step.
        assert!(delays[8..].iter().all(|d| *d >= max / 2 && *d <= max), "{delays:?}");
        // Jittered: not every wait at the bound is the same.
        let mut tail: Vec<Duration> = delays[6..].to_vec();
        tail.dedup();
        assert!(tail.len() > 1, "no jitter: {delays:?}");
        // Two guests refused at the same moment do not retry in lockstep.
        let (mut x, mut y) = (Backoff::new(first, max), Backoff::new(first, max));
        let xs: Vec<Duration> = (0..8).map(|_| x.next_delay()).collect();
        let ys: Vec<Duration> = (0..8).map(|_| y.next_delay()).collect();
        assert_ne!(xs, ys);
    }
}

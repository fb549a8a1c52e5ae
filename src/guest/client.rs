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

use crate::fs::{Caller, FsError, FsResult};
use crate::proto::{self, Hello, Notice, Op, Reply, Request, Role, ServerMsg, Welcome, PROTOCOL_VERSION};
use crate::transport::{Endpoint, Stream};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

pub type Callback = Box<dyn FnOnce(FsResult<Reply>) + Send>;

struct Pending {
    req: Request,
    cb: Callback,
}

/// What the server granted this mount.
#[derive(Debug, Clone)]
pub struct Granted {
    pub session: u64,
    pub read_only: bool,
    pub volume: String,
}

#[derive(Default)]
struct Link {
    writer: Option<Stream>,
    /// Bumped on every new connection, so a writer error is only acted on once.
    epoch: u64,
}

pub struct MountClient {
    endpoint: Endpoint,
    attachment: u64,
    link: Mutex<Link>,
    granted: Mutex<Granted>,
    pending: Mutex<BTreeMap<u64, Pending>>,
    next_id: AtomicU64,
    next_seq: AtomicU64,
    closing: AtomicBool,
    /// Set while the mount is paused (hibernation): requests queue and wait.
    paused: Mutex<bool>,
    resumed: Condvar,
    notices: Mutex<Option<Box<dyn Fn(Notice) + Send + Sync>>>,
    /// Why the mount is dead, if it is (attachment gone): every request fails with it.
    dead: Mutex<Option<FsError>>,
}

fn handshake(endpoint: &Endpoint, attachment: u64, resume: Option<u64>) -> Result<(Stream, Granted), FsError> {
    let mut s = endpoint.connect().map_err(|e| FsError::new(libc::ENOTCONN, format!("cannot connect to {endpoint}: {e}")))?;
    let io = |e: std::io::Error| FsError::new(libc::ENOTCONN, format!("handshake with {endpoint}: {e}"));
    proto::write_frame(&mut s, &Hello { version: PROTOCOL_VERSION, role: Role::Mount { attachment, resume } }).map_err(io)?;
    match proto::read_frame::<Welcome>(&mut s).map_err(io)? {
        Some(Welcome::Mount { session, read_only, volume, .. }) => Ok((s, Granted { session, read_only, volume })),
        Some(Welcome::Refused(e)) => Err(e),
        Some(other) => Err(FsError::new(libc::EPROTO, format!("unexpected answer to a mount hello: {other:?}"))),
        None => Err(FsError::new(libc::ENOTCONN, format!("{endpoint} closed the connection during the handshake"))),
    }
}

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
    /// Connects and opens a session for `attachment`; fails with the server's reason.
    pub fn connect(endpoint: Endpoint, attachment: u64) -> Result<Arc<MountClient>, FsError> {
        let (stream, granted) = handshake(&endpoint, attachment, None)?;
        let reader = stream.try_clone().map_err(FsError::from)?;
        let client = Arc::new(MountClient {
            endpoint,
            attachment,
            link: Mutex::new(Link { writer: Some(stream), epoch: 1 }),
            granted: Mutex::new(granted),
            pending: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            next_seq: AtomicU64::new(1),
            closing: AtomicBool::new(false),
            paused: Mutex::new(false),
            resumed: Condvar::new(),
            notices: Mutex::new(None),
            dead: Mutex::new(None),
        });
        let c = client.clone();
        std::thread::Builder::new().name(format!("vfs-conn-{attachment}")).spawn(move || c.reader(reader)).map_err(FsError::from)?;
        Ok(client)
    }

    pub fn granted(&self) -> Granted {
        self.granted.lock().unwrap().clone()
    }

    /// Where pushed invalidations go. Runs on the reader thread: it must not block on the kernel.
    pub fn on_notice(&self, f: impl Fn(Notice) + Send + Sync + 'static) {
        *self.notices.lock().unwrap() = Some(Box::new(f));
    }

    /// Sends `op`; `cb` runs with the reply.
    pub fn call_async(&self, caller: Caller, op: Op, cb: Callback) {
        if let Some(e) = self.dead.lock().unwrap().clone() {
            return cb(Err(e));
        }
        {
            let mut paused = self.paused.lock().unwrap();
            while *paused && !self.closing.load(Ordering::Relaxed) {
                paused = self.resumed.wait(paused).unwrap();
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let seq = if op.is_mutation() { self.next_seq.fetch_add(1, Ordering::Relaxed) } else { 0 };
        let req = Request { id, seq, caller, op };
        let frame = match proto::encode(&req) {
            Ok(f) => f,
            Err(e) => return cb(Err(FsError::new(libc::EINVAL, format!("request cannot be encoded: {e}")))),
        };
        // Registered and written under the link lock, so a reconnect's resend (which holds it
        // too) sends each request exactly once.
        let mut link = self.link.lock().unwrap();
        self.pending.lock().unwrap().insert(id, Pending { req, cb });
        if let Some(w) = link.writer.as_mut() {
            if std::io::Write::write_all(w, &frame).is_err() {
                w.shutdown();
                link.writer = None;
            }
        }
    }

    /// Sends and waits for the reply.
    pub fn call(&self, caller: Caller, op: Op) -> FsResult<Reply> {
        let (tx, rx) = mpsc::channel();
        self.call_async(caller, op, Box::new(move |r| {
            let _ = tx.send(r);
        }));
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

    /// Stops for good: no reconnect; pending requests fail.
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.resume();
        self.drop_connection();
        self.fail_all(FsError::new(libc::ENOTCONN, "volume unmounted"));
    }

    fn fail_all(&self, e: FsError) {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap());
        for (_, p) in pending {
            (p.cb)(Err(e.clone()));
        }
    }

    fn reader(self: Arc<Self>, mut stream: Stream) {
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
                    stream.shutdown();
                    match self.reconnect() {
                        Some(s) => stream = s,
                        None => return,
                    }
                }
            }
        }
    }

    /// Reconnects with backoff, resumes the session and resends every pending request.
    fn reconnect(&self) -> Option<Stream> {
        self.link.lock().unwrap().writer = None;
        let mut delay = Duration::from_millis(10);
        loop {
            if self.closing.load(Ordering::SeqCst) {
                return None;
            }
            let resume = Some(self.granted.lock().unwrap().session);
            match handshake(&self.endpoint, self.attachment, resume) {
                Ok((stream, granted)) => {
                    let reader = stream.try_clone().ok()?;
                    *self.granted.lock().unwrap() = granted;
                    let mut link = self.link.lock().unwrap();
                    link.writer = Some(stream);
                    link.epoch += 1;
                    // Resend under the link lock so that no new request overtakes an old one.
                    let frames: Vec<Vec<u8>> =
                        self.pending.lock().unwrap().values().filter_map(|p| proto::encode(&p.req).ok()).collect();
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
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    // The server refused us for good (attachment detached, volume deleted).
                    log::error!("mount of attachment {} ended: {e}", self.attachment);
                    *self.dead.lock().unwrap() = Some(FsError::new(libc::EIO, format!("volume unavailable: {}", e.msg)));
                    self.fail_all(FsError::new(libc::EIO, format!("volume unavailable: {}", e.msg)));
                    return None;
                }
            }
        }
    }
}

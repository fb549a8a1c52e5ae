//! Guest connections: the handshake on each sandbox listener and the request loop of a mount.
//!
//! Everything here runs on the server's tokio runtime. Each connection has a reader task, which
//! decodes frames and hands each request to the blocking pool (engine calls block), and a writer
//! task behind a bounded queue ([`Conn`]): replies go out in whatever order they finish, and no
//! engine call ever waits on a guest's socket. A frame that is too large or does not decode ends
//! that connection only.
//!
//! Limits, each refused with a log line: requests in flight per connection ([`WINDOW`]; the
//! reader stops reading), engine calls in flight per sandbox ([`SANDBOX_SHARE`]; a sandbox's
//! requests wait for its own share, never for another sandbox's), connections per sandbox
//! ([`MAX_CONNS`]; closed at once), mount sessions per sandbox ([`MAX_SESSIONS`]; `EAGAIN`).

use super::session::{self, Conn, Session};
use super::{SandboxRt, Server};
use crate::engine::meta::AttachState;
use crate::fs::{Caller, FsError, Kind};
use crate::proto::{self, AttachmentSpec, Hello, Op, Request, Role, ServerMsg, Welcome, PROTOCOL_VERSION};
use crate::transport::Stream;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};

/// Requests one connection may have in flight before its reader stops reading.
const WINDOW: usize = 64;
/// Engine calls one sandbox may have running at once, across all its connections.
pub const SANDBOX_SHARE: usize = 8;
/// Connections one sandbox may hold open at once.
const MAX_CONNS: usize = 512;
/// A guest must say hello this quickly.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Mount sessions one sandbox may hold at once (a guest opening connection after connection
/// without resuming must not grow the server without bound).
const MAX_SESSIONS: usize = 256;
/// How long writing a handshake answer may take.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts the sandbox's guest connections until the sandbox is deleted (`closed` turns true).
pub async fn accept_loop(server: Weak<Server>, rt: Arc<SandboxRt>, listener: UnixListener, mut closed: watch::Receiver<bool>) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) if e.raw_os_error() == Some(libc::EMFILE) || e.raw_os_error() == Some(libc::ENFILE) => {
                    tracing::warn!(sandbox = %rt.name, "limit hit: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => {
                    tracing::error!(sandbox = %rt.name, "accept: {e}");
                    return;
                }
            },
            // Sent only on delete; an error means the sandbox is gone as well.
            _ = closed.changed() => return,
        };
        let Some(srv) = server.upgrade() else { return };
        // A second descriptor of the socket: resets and shutdowns reach it from anywhere.
        let (stream, closer) = match split_closer(stream) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(sandbox = %rt.name, "connection: {e}");
                continue;
            }
        };
        // Counted here, in accept order, so that the connection refused is the newest one.
        let Some(key) = rt.track(&closer, MAX_CONNS) else {
            tracing::warn!(sandbox = %rt.name, max = MAX_CONNS, "limit hit: connections per sandbox; closing a new one");
            closer.shutdown();
            continue;
        };
        let rt = rt.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(&srv, &rt, stream, &closer).await {
                tracing::info!(sandbox = %rt.name, "connection ended: {e}");
            }
            // Close for real: other descriptors of this socket must not keep the peer waiting.
            closer.shutdown();
            rt.untrack(key);
        });
    }
}

fn split_closer(stream: UnixStream) -> std::io::Result<(UnixStream, Stream)> {
    let std = stream.into_std()?;
    let closer = Stream::from(std.try_clone()?);
    Ok((UnixStream::from_std(std)?, closer))
}

async fn write_welcome(stream: &mut UnixStream, w: &Welcome) -> std::io::Result<()> {
    let buf = proto::encode(w)?;
    tokio::time::timeout(WELCOME_TIMEOUT, stream.write_all(&buf)).await.map_err(|_| std::io::ErrorKind::TimedOut)?
}

use super::blocking;

async fn serve(server: &Arc<Server>, rt: &Arc<SandboxRt>, mut stream: UnixStream, closer: &Stream) -> std::io::Result<()> {
    let hello: Hello = match tokio::time::timeout(HELLO_TIMEOUT, proto::read_frame_async(&mut stream)).await {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no hello")),
    };
    if hello.version != PROTOCOL_VERSION {
        let refusal =
            FsError::new(libc::EPROTO, format!("protocol version {} is not supported (server speaks {PROTOCOL_VERSION})", hello.version));
        return write_welcome(&mut stream, &Welcome::Refused(refusal)).await;
    }
    let (srv, name) = (server.clone(), rt.name.clone());
    match hello.role {
        Role::Control => {
            rt.hellos.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let welcome = blocking(move || control_welcome(&srv, &name)).await.unwrap_or_else(Welcome::Refused);
            write_welcome(&mut stream, &welcome).await
        }
        Role::Mount { path, resume } => {
            let opened = blocking(move || {
                let s = open_session(&srv, &name, &path, resume)?;
                let volume = srv.engine.volume_by_id(s.vol).map(|v| v.name).unwrap_or_default();
                Ok((s, volume))
            })
            .await;
            let (s, volume) = match opened {
                Ok(o) => o,
                Err(e) => return write_welcome(&mut stream, &Welcome::Refused(e)).await,
            };
            let welcome = Welcome::Mount {
                session: s.id,
                attachment: s.attachment,
                read_only: s.read_only,
                volume,
                lease_ttl_ms: server.config.lease_ttl.as_millis() as u64,
                holds_writes: server.engine.holds_writes(),
            };
            write_welcome(&mut stream, &welcome).await?;
            mount_loop(server, rt, &s, stream, closer.try_clone()?).await
        }
    }
}

fn control_welcome(server: &Server, sandbox: &str) -> Result<Welcome, FsError> {
    let attachments = server
        .attachments(Some(sandbox))?
        .into_iter()
        .map(|a| AttachmentSpec {
            id: a.row.id,
            volume: a.volume_name,
            path: a.row.path,
            read_only: a.row.read_only,
            subpath: a.row.subpath,
        })
        .collect();
    Ok(Welcome::Control { sandbox: sandbox.to_string(), attachments })
}

/// Finds or makes the session for the mount at `path` in `sandbox`, taking its lease.
///
/// `resume` names the session the guest had: its own (reconnect, resume after hibernation) or,
/// in a forked VM, its parent's, whose copy was made for this sandbox by the fork. Any other
/// value is ignored and a fresh session is made; the guest's cached inode numbers stay usable
/// because scope is checked by ancestry, not only by the session's memory.
fn open_session(server: &Arc<Server>, sandbox: &str, path: &str, resume: Option<u64>) -> Result<Arc<Session>, FsError> {
    let row = server.attachment_at(sandbox, path)?;
    let path = row.path.as_str();
    let result = (|| {
        if let Some(id) = resume {
            let found =
                server.sessions_where(|s| s.sandbox == sandbox && s.attachment == row.id && (s.id == id || s.forked_from == Some(id)));
            if let Some(s) = found.into_iter().next() {
                s.set_lease(session::LeaseState::Live);
                tracing::info!(sandbox, path, session = s.id, "session resumed");
                return Ok(s);
            }
        }
        let live = server.sessions_where(|s| s.sandbox == sandbox).len();
        if live >= MAX_SESSIONS {
            tracing::warn!(sandbox, live, "limit hit: mount sessions per sandbox");
            return Err(FsError::new(libc::EAGAIN, format!("sandbox `{sandbox}` already has {live} mount sessions")));
        }
        let root = server.engine.resolve(row.volume, &row.subpath, &Caller::root())?;
        if root.kind != Kind::Dir {
            return Err(FsError::new(libc::ENOTDIR, format!("subpath {} is not a directory", row.subpath)));
        }
        let s = Arc::new(Session::new(server.new_session_id(), sandbox, row.id, row.volume, root.ino, row.read_only));
        if let Some(old) = resume {
            // Its mutations that were applied but not answered before the restart are answered
            // from their records when the guest sends them again.
            let last = server.engine.last_replayed_seq(old)?;
            if last > 0 {
                *s.predecessor.lock().unwrap() = Some((old, last));
            }
        }
        // A guest that names a session we do not have lost it to a restart (or a lapsed lease):
        // it may take back the locks it held.
        s.may_reclaim.store(resume.is_some(), std::sync::atomic::Ordering::SeqCst);
        server.register_session(s.clone());
        tracing::info!(sandbox, path, session = s.id, read_only = row.read_only, subpath = %row.subpath, "session opened");
        Ok(s)
    })();
    let (state, reason) = match &result {
        Ok(_) => (AttachState::Mounted, String::new()),
        Err(e) => (AttachState::Failed, e.to_string()),
    };
    server.engine.set_attachment_state(row.id, state, &reason)?;
    result
}

/// Whether a request is served by the connection's own task, in place (its worker thread hands
/// the runtime's other tasks to another and runs it): a metadata request costs tens of
/// microseconds, less than handing it to the blocking pool and back (which made a round trip a
/// third slower). One connection's quick requests run one at a time, in order; requests that
/// move data or wait on the disk go to the blocking pool, so they never hold up the lookups
/// behind them. Named one by one, as every classification of ops is.
fn quick(op: &Op) -> bool {
    match op {
        Op::Read { .. }
        | Op::Write { .. }
        | Op::Fallocate { .. }
        | Op::CopyFileRange { .. }
        | Op::Fsync { .. }
        | Op::ReclaimLocks { .. } => false,
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
        | Op::Lseek { .. }
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
        | Op::Unmounted
        | Op::Flush { .. }
        | Op::GetLk { .. }
        | Op::SetLk { .. }
        | Op::SetLkW { .. } => true,
    }
}

async fn mount_loop(
    server: &Arc<Server>,
    rt: &Arc<SandboxRt>,
    s: &Arc<Session>,
    stream: UnixStream,
    closer: Stream,
) -> std::io::Result<()> {
    let (reader, writer) = stream.into_split();
    // Buffered: requests sent back to back (a batch of forgets, readahead) come in one read.
    let mut reader = tokio::io::BufReader::with_capacity(256 << 10, reader);
    let conn = Conn::start(writer, closer)?;
    s.bind(conn.clone());
    let window = Arc::new(Semaphore::new(WINDOW));
    let result = loop {
        let req: Request = match proto::read_frame_async(&mut reader).await {
            Ok(Some(r)) => r,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let Ok(in_flight) = window.clone().acquire_owned().await else { break Ok(()) };
        let Ok(share) = rt.share.clone().acquire_owned().await else { break Ok(()) };
        let (server2, s2, conn2) = (server.clone(), s.clone(), conn.clone());
        let quick = quick(&req.op);
        let job = move || {
            let id = req.id;
            let (result, close) = session::handle(&server2, &s2, req);
            drop(share);
            if let Err(e) = conn2.send(&ServerMsg::Reply { id, result }) {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    // The reply does not fit a frame: the request still gets an answer.
                    tracing::warn!("sandbox {}: reply to request {id} cannot be sent: {e}", s2.sandbox);
                    let err = FsError::new(libc::EIO, format!("the reply does not fit a frame: {e}"));
                    let _ = conn2.send(&ServerMsg::Reply { id, result: Err(err) });
                }
            }
            if close {
                conn2.close_after_queued();
                // A released session without handles has nothing a resume would need (requests
                // in flight were drained first, and scope is checked by ancestry): drop it.
                if !s2.has_handles() {
                    server2.forget_session(&s2);
                }
            }
            drop(in_flight);
        };
        if quick {
            tokio::task::block_in_place(job);
        } else {
            tokio::task::spawn_blocking(job);
        }
    };
    conn.shutdown();
    s.unbind(&conn);
    result
}

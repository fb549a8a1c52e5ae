//! Guest connections: the handshake on each sandbox listener and the request loop of a mount.
//!
//! A connection's reader thread decodes frames and hands each request to the shared worker pool,
//! so many requests are in flight and replies go out in whatever order they finish. Replies and
//! pushes are queued to the connection's own writer thread ([`Conn`]): no worker ever waits on a
//! guest's socket. A frame that
//! is too large or does not decode ends that connection only.

use super::session::{self, Conn, Session};
use super::{SandboxRt, Server};
use crate::engine::meta::AttachState;
use crate::fs::{Caller, FsError, Kind};
use crate::proto::{self, AttachmentSpec, Hello, Request, Role, ServerMsg, Welcome, PROTOCOL_VERSION};
use crate::transport::Stream;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Requests one connection may have in flight before its reader stops reading.
const WINDOW: usize = 64;
/// A guest must say hello this quickly.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Mount sessions one sandbox may hold at once (a guest opening connection after connection
/// without resuming must not grow the server without bound).
const MAX_SESSIONS: usize = 256;
/// A peer that does not drain its socket for this long is cut off.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

pub fn accept_loop(server: Weak<Server>, rt: Arc<SandboxRt>) {
    loop {
        let stream = match rt.listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) || e.raw_os_error() == Some(libc::ENFILE) => {
                tracing::warn!("sandbox {}: accept: {e}", rt.name);
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(_) => return, // listener shut down
        };
        let Some(srv) = server.upgrade() else { return };
        let rt = rt.clone();
        let _ = std::thread::Builder::new().name(format!("conn-{}", rt.name)).spawn(move || {
            let key = rt.track(&stream);
            let closer = stream.try_clone();
            if let Err(e) = serve(&srv, &rt, stream) {
                tracing::info!("sandbox {}: connection ended: {e}", rt.name);
            }
            // Close for real: other clones of this socket must not keep the peer waiting.
            if let Ok(c) = closer {
                c.shutdown();
            }
            rt.untrack(key);
        });
    }
}

fn serve(server: &Arc<Server>, rt: &SandboxRt, mut stream: Stream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let hello: Hello = match proto::read_frame(&mut stream)? {
        Some(h) => h,
        None => return Ok(()),
    };
    stream.set_read_timeout(None)?;
    if hello.version != PROTOCOL_VERSION {
        let refusal =
            FsError::new(libc::EPROTO, format!("protocol version {} is not supported (server speaks {PROTOCOL_VERSION})", hello.version));
        proto::write_frame(&mut stream, &Welcome::Refused(refusal))?;
        return Ok(());
    }
    match hello.role {
        Role::Control => {
            rt.hellos.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let welcome = match control_welcome(server, &rt.name) {
                Ok(w) => w,
                Err(e) => Welcome::Refused(e),
            };
            proto::write_frame(&mut stream, &welcome)
        }
        Role::Mount { path, resume } => {
            let s = match open_session(server, &rt.name, &path, resume) {
                Ok(s) => s,
                Err(e) => return proto::write_frame(&mut stream, &Welcome::Refused(e)),
            };
            let welcome = Welcome::Mount {
                session: s.id,
                attachment: s.attachment,
                read_only: s.read_only,
                volume: server.engine.volume_by_id(s.vol).map(|v| v.name).unwrap_or_default(),
                lease_ttl_ms: server.config.lease_ttl.as_millis() as u64,
            };
            proto::write_frame(&mut stream, &welcome)?;
            mount_loop(server, &s, stream)
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
        server.register_session(s.clone());
        tracing::info!(sandbox, path, session = s.id, read_only = row.read_only, subpath = %row.subpath, "session opened");
        Ok(s)
    })();
    let (state, reason) = match &result {
        Ok(_) => (AttachState::Mounted, String::new()),
        Err(e) => (AttachState::Failed, e.to_string()),
    };
    server.engine.tx(|t| t.set_attachment_state(row.id, state, &reason))?;
    result
}

fn mount_loop(server: &Arc<Server>, s: &Arc<Session>, mut stream: Stream) -> std::io::Result<()> {
    let conn = Conn::start(&stream, &s.sandbox)?;
    s.bind(conn.clone());
    let window = Arc::new(super::pool::Window::new(WINDOW));
    let result = loop {
        let req: Request = match proto::read_frame(&mut stream) {
            Ok(Some(r)) => r,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        window.acquire();
        let (server2, s2, conn2, window2) = (server.clone(), s.clone(), conn.clone(), window.clone());
        server.pool.run(move || {
            let id = req.id;
            let (result, close) = session::handle(&server2, &s2, req);
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
            window2.release();
        });
    };
    stream.shutdown();
    s.unbind(&conn);
    result
}

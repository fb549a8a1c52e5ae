//! The host storage server: it owns the engine, the sandbox registry and one guest listener per
//! sandbox, and serves the HTTP API.
//!
//! The security boundary lives here. A guest connection arrives on its sandbox's own listener,
//! which is the only thing that names the sandbox; a mount connection then names an attachment
//! of that sandbox, and from there on every inode number the guest sends is checked against the
//! set this session has been handed (see [`session`]), and every mutation against the
//! attachment's mode.

pub mod archive;
pub mod files;
pub mod guest;
pub mod http;
pub mod locks;
pub mod openapi;
pub mod session;
pub mod tus;
pub mod vm;
pub mod watch;

use crate::engine::meta::{AttachState, AttachmentRow, VolId};
use crate::engine::{check_object_name, Engine};
use crate::fs::{Caller, FsError, FsResult, Ino, Kind};
use crate::proto::{AgentCommand, AgentReply, AttachmentSpec};
use crate::transport::{Endpoint, Listener, AGENT_CONTROL_PORT, GUEST_SERVER_PORT};
use session::Session;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// The process's tokio runtime: guest connections (and their engine calls, on its blocking
/// pool) run on it. One per process, as there is one server per process.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread().thread_name("volumefs-rt").enable_all().build().expect("cannot start the tokio runtime")
    })
}

/// Runs an engine-bound closure on the runtime's blocking pool (engine calls block); a panic in
/// it becomes `EIO`. The guest data plane and the HTTP API both go through here.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> FsResult<T> + Send + 'static) -> FsResult<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| Err(FsError::new(libc::EIO, format!("internal error: {e}"))))
}

/// The lock grace period after a restart: until `until`, or until every attachment in
/// `expected` (mounted when the server went down) has reclaimed, new locks are not granted.
#[derive(Default)]
pub struct Grace {
    until: Option<std::time::Instant>,
    expected: std::collections::HashSet<u64>,
}

pub struct Config {
    pub data: PathBuf,
    /// Where metadata lives when not in SQLite under `data` (a PostgreSQL URL).
    pub meta: Option<String>,
    /// Where file data lives when not under `data` (a block store URL, see [`crate::engine::blocks`]).
    pub blocks: Option<String>,
    /// Bytes of blocks of a remote block store kept on local disk (DATA/block-cache; 0: none).
    pub block_cache: u64,
    /// How long a session may go without its guest before its lease lapses.
    pub lease_ttl: Duration,
    /// Where the guest image is (for `sandbox run`); found automatically when `None`.
    pub images: Option<PathBuf>,
    /// How long a resumable upload may sit untouched before it is removed.
    pub upload_expiry: Duration,
}

/// A sandbox's live pieces: its guest listener and the connections that came through it.
pub struct SandboxRt {
    pub name: String,
    pub socket: PathBuf,
    /// Turns true when the sandbox is deleted: its accept loop ends.
    closed: tokio::sync::watch::Sender<bool>,
    conns: Mutex<HashMap<u64, crate::transport::Stream>>,
    /// Engine calls this sandbox may have running at once ([`guest::SANDBOX_SHARE`]).
    share: Arc<tokio::sync::Semaphore>,
    next_conn: AtomicU64,
    /// The sandbox's microVM, when the server runs one for it.
    vm: Mutex<Option<vm::Vm>>,
    /// Control hellos seen: an agent that said hello has its control port listening.
    pub hellos: AtomicU64,
}

impl SandboxRt {
    /// Closes every connection of this sandbox from the host side, as a snapshot restore does.
    pub fn reset_connections(&self) -> usize {
        let conns = std::mem::take(&mut *self.conns.lock().unwrap());
        for c in conns.values() {
            c.shutdown();
        }
        conns.len()
    }

    /// Remembers a live connection so that it can be reset; returns its key, or `None` when
    /// the sandbox already has `max` connections.
    pub fn track(&self, s: &crate::transport::Stream, max: usize) -> Option<u64> {
        let clone = s.try_clone().ok()?;
        let mut conns = self.conns.lock().unwrap();
        if conns.len() >= max {
            return None;
        }
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        conns.insert(id, clone);
        Some(id)
    }

    pub fn untrack(&self, id: u64) {
        self.conns.lock().unwrap().remove(&id);
    }
}

pub struct Server {
    /// Held for the server's life: see [`lock_data_dir`].
    _data_lock: std::fs::File,
    pub engine: Engine,
    pub config: Config,
    pub token: String,
    /// Signs download URLs ([`http`]); its own secret, so that handing out URLs never involves
    /// the API token.
    pub url_key: String,
    /// Resumable (tus) uploads in progress.
    pub uploads: tus::Uploads,
    pub locks: locks::LockTable,
    /// This run's id among the servers sharing the store (their locks and heartbeats).
    pub server_id: String,
    /// The lock grace period after a restart (see [`Grace`]).
    grace: Mutex<Grace>,
    sandboxes: Mutex<HashMap<String, Arc<SandboxRt>>>,
    sessions: Mutex<HashMap<u64, Arc<Session>>>,
    by_volume: Mutex<HashMap<VolId, Vec<Weak<Session>>>>,
    next_session: AtomicU64,
}

/// What the API reports of an attachment.
#[derive(Debug, Clone)]
pub struct AttachmentInfo {
    pub row: AttachmentRow,
    pub volume_name: String,
}

pub(crate) fn random_token() -> FsResult<String> {
    use std::io::Read;
    let mut buf = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Reads a secret of the data directory (`api-token`, `url-key`), creating it (random, mode
/// 0600) on first start.
fn load_secret(dir: &Path, file: &str) -> FsResult<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(file);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let token = random_token()?;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    Ok(token)
}

impl Server {
    /// Another server's announcement of a change: pushed to this server's sessions of the
    /// volume as a change of its own would be.
    fn announced(&self, message: &str) {
        match crate::engine::parse_announcement(message) {
            Some(a) if a.origin != self.server_id => {
                self.invalidate(a.vol, &a.names);
                for ino in a.inodes {
                    self.engine.changed_elsewhere(a.vol, ino);
                    self.invalidate_inode(a.vol, ino);
                }
                for ino in a.locks {
                    self.lock_freed(ino, &self.locks.freed_elsewhere(a.vol, ino));
                }
            }
            Some(_) => {}
            None => tracing::warn!(message, "an announcement this server does not understand"),
        }
    }

    /// The other servers sharing the store, for the lock table (`None` with an embedded store).
    pub fn remote_locks(&self) -> Option<locks::Remote<'_>> {
        self.engine.shared().then(|| locks::Remote { engine: &self.engine, server: &self.server_id, ttl: self.config.lease_ttl })
    }
}

/// With a shared store, the server says it is alive every third of a lease TTL; servers silent
/// for a whole TTL (dead) are forgotten with the locks held through them.
fn start_heartbeat(server: &Arc<Server>) -> FsResult<()> {
    if !server.engine.shared() {
        return Ok(());
    }
    let ttl = server.config.lease_ttl;
    server.engine.server_started(&server.server_id)?;
    server.engine.server_heartbeat(&server.server_id, ttl)?;
    every(server, "heartbeat", ttl / 3, move |server| match server.engine.server_heartbeat(&server.server_id, ttl) {
        Ok(beat) => {
            if beat.forgotten > 0 {
                tracing::info!(servers = beat.forgotten, "servers silent for a lease TTL forgotten, with their locks and open files");
            }
            if beat.missed {
                // The others may have forgotten this server and its locks meanwhile (what they
                // granted in between can conflict with ours: that is logged by the guests'
                // next requests, not undone).
                tracing::warn!("this server was silent for a lease TTL; publishing its locks and open files again");
                if let Some(remote) = server.remote_locks() {
                    server.locks.republish(&remote);
                }
            }
        }
        Err(e) => tracing::error!("heartbeat to the shared store: {e}"),
    });
    Ok(())
}

/// Runs `f` every `period` on a thread of its own, for as long as the server lives.
fn every(server: &Arc<Server>, name: &str, period: Duration, f: impl Fn(&Server) + Send + 'static) {
    let weak = Arc::downgrade(server);
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || loop {
            std::thread::sleep(period);
            let Some(server) = weak.upgrade() else { return };
            f(&server);
        })
        .unwrap_or_else(|e| panic!("spawn the {name} thread: {e}"));
}

/// With a shared store, other servers' changes reach this server's sessions as its own do: a
/// listener hears their announcements (sent at their commits, in commit order) and pushes the
/// names and inodes they name to every session of the volume. A broken listening connection
/// is replaced; what was announced meanwhile is missed, which only delays (guests' caches
/// expire within the attribute TTL, and every open drops the file's cached pages).
fn start_listener(server: &Arc<Server>) {
    if !server.engine.shared() {
        return;
    }
    let weak = Arc::downgrade(server);
    std::thread::Builder::new()
        .name("store-listener".into())
        .spawn(move || loop {
            let Some(s) = weak.upgrade() else { return };
            let listener = s.engine.listen();
            drop(s);
            let mut l = match listener {
                Ok(Some(l)) => l,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!("listening to the shared store: {e}; trying again");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            loop {
                let got = l.wait(Duration::from_secs(1));
                let Some(s) = weak.upgrade() else { return };
                match got {
                    Ok(messages) => messages.iter().for_each(|m| s.announced(m)),
                    Err(e) => {
                        tracing::warn!("listening to the shared store: {e}; reconnecting");
                        break;
                    }
                }
            }
        })
        .expect("spawn the store listener thread");
}

/// With a block store, garbage collection runs every hour (blocks unreferenced for an hour go):
/// what deleted files, truncates, overwrites and crashed writes left behind.
fn start_gc(server: &Arc<Server>) {
    if !server.engine.has_blocks() {
        return;
    }
    every(server, "block-gc", GC_EVERY, |server| match server.engine.gc(GC_EVERY) {
        Ok(r) => tracing::info!(blocks = r.blocks, deleted = r.deleted, freed = r.deleted_bytes, "block garbage collected"),
        Err(e) => tracing::error!("block garbage collection: {e}"),
    });
    // Held-back writes go up once they are a second old.
    every(server, "write-behind", WRITE_BEHIND_EVERY, |server| {
        let _ = server.engine.settle_older(crate::engine::buffer::FLUSH_AGE);
    });
    // Files written in many small pieces are rewritten as whole blocks in the background.
    every(server, "compaction", COMPACT_EVERY, |server| {
        for (vol, ino) in server.engine.compaction_due() {
            match server.engine.compact(vol, ino) {
                Ok(Some((before, after))) => tracing::debug!(vol, ino, before, after, "file compacted"),
                Ok(None) => {}
                // Gone meanwhile: nothing to do.
                Err(e) if e.errno == libc::ESTALE => {}
                Err(e) => tracing::warn!(vol, ino, "compaction: {e}"),
            }
        }
    });
}

const COMPACT_EVERY: Duration = Duration::from_secs(5);

const WRITE_BEHIND_EVERY: Duration = Duration::from_millis(250);

const GC_EVERY: Duration = Duration::from_secs(3600);

/// Files unlinked while open outlive a restart (a reconnecting guest reopens its handles); once
/// the guests have had a lease TTL to come back, the orphans nobody reopened are freed.
fn start_orphan_reclaim(server: &Arc<Server>) {
    let weak = Arc::downgrade(server);
    let grace = server.config.lease_ttl;
    std::thread::Builder::new()
        .name("orphan-reclaim".into())
        .spawn(move || {
            std::thread::sleep(grace);
            let Some(server) = weak.upgrade() else { return };
            match server.engine.reclaim_orphans() {
                Ok(n) => tracing::info!(freed = n, "orphans left by the previous run reclaimed"),
                Err(e) => tracing::error!("reclaiming orphans: {e}"),
            }
            // Replay records of sessions that never came back (a guest gone for an hour resends
            // nothing worth answering from them).
            if let Err(e) = server.engine.expire_replays(Duration::from_secs(3600)) {
                tracing::error!("expiring replay records: {e}");
            }
        })
        .expect("spawn orphan reclaim");
}

/// Takes the data directory for this process: an exclusive `flock` on `DATA/lock`, held until
/// the process exits (the kernel drops it on any exit, even SIGKILL), with the holder's PID
/// written inside. A second server on the same directory is refused before it touches anything.
fn lock_data_dir(dir: &Path) -> FsResult<std::fs::File> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    let path = dir.join("lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| FsError::new(libc::EIO, format!("cannot open {}: {e}", path.display())))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut holder = String::new();
        let _ = f.read_to_string(&mut holder);
        let holder = holder.trim();
        let who = if holder.is_empty() { "another process".to_string() } else { format!("pid {holder}") };
        return Err(FsError::new(
            libc::EBUSY,
            format!("data directory {} is in use by another volumefs server ({who}); one server per data directory", dir.display()),
        ));
    }
    f.set_len(0)?;
    f.rewind()?;
    writeln!(f, "{}", std::process::id())?;
    Ok(f)
}

/// Every guest connection holds descriptors: take the hard limit, as servers do, instead of the
/// shell's soft default of 1024.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

impl Server {
    pub fn open(config: Config) -> FsResult<Arc<Server>> {
        std::fs::create_dir_all(&config.data)
            .map_err(|e| FsError::new(libc::EIO, format!("cannot create data directory {}: {e}", config.data.display())))?;
        let data_lock = lock_data_dir(&config.data)?;
        raise_fd_limit();
        let engine = Engine::open_store_cached(&config.data, config.meta.as_deref(), config.blocks.as_deref(), config.block_cache)?;
        let token = load_secret(&config.data, "api-token")?;
        let url_key = load_secret(&config.data, "url-key")?;
        let uploads = tus::Uploads::open(&config.data, config.upload_expiry)?;
        // Kept across restarts (DATA/server-id): the store's lock rows of the previous run are
        // this server's own, dropped at start (see `start_heartbeat`).
        let server_id: String = load_secret(&config.data, "server-id")?.chars().take(16).collect();
        // Before any guest or API call: with a shared store, changes are announced under this
        // id and open handles recorded under it.
        engine.set_origin(&server_id);
        // Guests' writes to a block store are held back per file (journaled here); a previous
        // run's journals are replayed first.
        engine.write_behind_in(&config.data.join("write-behind"))?;
        let server = Arc::new(Server {
            _data_lock: data_lock,
            engine,
            config,
            token,
            url_key,
            uploads,
            locks: locks::LockTable::default(),
            server_id,
            grace: Mutex::default(),
            sandboxes: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            by_volume: Mutex::new(HashMap::new()),
            // Random, so that session numbers of different server runs never meet: a guest
            // that names its old session after a restart must get a fresh one, not a stranger's.
            next_session: AtomicU64::new(u64::from_str_radix(&random_token()?[..12], 16).unwrap_or(1) | 1),
        });
        // Nothing is mounted until a guest says so again: leases do not outlive the server.
        let mounted = server.engine.release_all_mounted("server restarted")?;
        if !mounted.is_empty() {
            tracing::info!(
                attachments = mounted.len(),
                grace_s = server.config.lease_ttl.as_secs(),
                "lock grace period: new locks wait until these mounts have reclaimed theirs (or the grace ends)"
            );
            *server.grace.lock().unwrap() =
                Grace { until: Some(std::time::Instant::now() + server.config.lease_ttl), expected: mounted.into_iter().collect() };
        }
        for sb in server.engine.list_sandboxes()? {
            server.start_listener(&sb.name)?;
        }
        session::start_reaper(&server);
        start_orphan_reclaim(&server);
        start_gc(&server);
        start_heartbeat(&server)?;
        start_listener(&server);
        tus::start_expiry(&server);
        tracing::info!(data = %server.config.data.display(), pid = std::process::id(), "server started");
        Ok(server)
    }

    // ----- sandboxes ------------------------------------------------------------------------

    pub fn sandbox_dir(&self, name: &str) -> PathBuf {
        self.config.data.join("sandboxes").join(name)
    }

    fn start_listener(self: &Arc<Self>, name: &str) -> FsResult<Arc<SandboxRt>> {
        let dir = self.sandbox_dir(name);
        std::fs::create_dir_all(&dir)?;
        // Firecracker's hybrid vsock: the VM's uds is `<dir>/vsock`; a guest connecting to the
        // host on port P reaches `<dir>/vsock_P`.
        let socket = dir.join(format!("vsock_{GUEST_SERVER_PORT}"));
        let listener = match Listener::bind_unix(&socket) {
            Ok(Listener::Unix(l)) => l,
            Ok(Listener::Vsock(_)) => unreachable!("bind_unix makes unix listeners"),
            Err(e) => return Err(FsError::new(libc::EIO, format!("cannot listen on {}: {e}", socket.display()))),
        };
        listener.set_nonblocking(true)?;
        let listener = {
            let _rt = runtime().enter();
            tokio::net::UnixListener::from_std(listener)?
        };
        let (closed, on_close) = tokio::sync::watch::channel(false);
        let rt = Arc::new(SandboxRt {
            name: name.to_string(),
            socket,
            closed,
            share: Arc::new(tokio::sync::Semaphore::new(guest::SANDBOX_SHARE)),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            vm: Mutex::new(None),
            hellos: AtomicU64::new(0),
        });
        self.sandboxes.lock().unwrap().insert(name.to_string(), rt.clone());
        let server = Arc::downgrade(self);
        let rt2 = rt.clone();
        runtime().spawn(guest::accept_loop(server, rt2, listener, on_close));
        Ok(rt)
    }

    pub fn sandbox_rt(&self, name: &str) -> FsResult<Arc<SandboxRt>> {
        self.sandboxes.lock().unwrap().get(name).cloned().ok_or_else(|| FsError::new(libc::ENOENT, format!("sandbox `{name}` not found")))
    }

    pub fn create_sandbox(self: &Arc<Self>, name: &str) -> FsResult<Arc<SandboxRt>> {
        check_object_name("sandbox", name)?;
        self.engine.create_sandbox(name)?;
        self.start_listener(name)
    }

    pub fn delete_sandbox(&self, name: &str) -> FsResult<()> {
        self.engine.delete_sandbox(name)?;
        let rt = self.sandboxes.lock().unwrap().remove(name);
        if let Some(rt) = rt {
            if let Some(vm) = rt.vm.lock().unwrap().take() {
                vm.stop(Duration::ZERO);
            }
            rt.closed.send_replace(true);
            rt.reset_connections();
        }
        for s in self.sessions_where(|s| s.sandbox == name) {
            self.end_session(&s, AttachState::Released, "sandbox deleted");
        }
        let _ = std::fs::remove_dir_all(self.sandbox_dir(name));
        Ok(())
    }

    pub fn list_sandboxes(&self) -> FsResult<Vec<(String, PathBuf)>> {
        let rows = self.engine.list_sandboxes()?;
        let live = self.sandboxes.lock().unwrap();
        Ok(rows
            .into_iter()
            .map(|r| {
                let sock = live.get(&r.name).map(|rt| rt.socket.clone()).unwrap_or_default();
                (r.name, sock)
            })
            .collect())
    }

    // ----- attachments ----------------------------------------------------------------------

    /// Records "volume at path in sandbox" after checking that it can be honoured.
    pub fn attach(&self, sandbox: &str, volume: &str, path: &str, read_only: bool, subpath: &str) -> FsResult<AttachmentInfo> {
        if !path.starts_with('/') || path.split('/').any(|p| p == ".." || p == ".") || path.len() > 1024 {
            return Err(FsError::new(libc::EINVAL, format!("mount path {path:?} must be absolute, without `.` or `..`")));
        }
        let path = normalize(path);
        let subpath = normalize(if subpath.is_empty() { "/" } else { subpath });
        let vol = self.engine.volume(volume)?;
        let root = self.engine.resolve(vol.id, &subpath, &Caller::root())?;
        if root.kind != Kind::Dir {
            return Err(FsError::new(libc::ENOTDIR, format!("subpath {subpath:?} of volume `{volume}` is not a directory")));
        }
        // The same volume, mode and subpath at a path whose mount is gone (unmounted in the
        // guest, lease expired, mount failed) is attached again under its existing record;
        // anything else at that path is refused by `add_attachment` (detach it first).
        let existing = self.engine.attachments(Some(sandbox), None)?.into_iter().find(|a| a.path == path);
        let again = existing.filter(|a| {
            a.volume == vol.id
                && a.read_only == read_only
                && a.subpath == subpath
                && match a.state {
                    AttachState::Attached | AttachState::Released | AttachState::Failed => true,
                    AttachState::Mounted => false,
                }
        });
        let reused = again.is_some();
        let row = match again {
            Some(row) => row,
            None => self.engine.add_attachment(&AttachmentRow {
                id: 0,
                sandbox: sandbox.to_string(),
                volume: vol.id,
                path: path.clone(),
                read_only,
                subpath: subpath.clone(),
                state: AttachState::Attached,
                reason: String::new(),
            })?,
        };
        // A running agent mounts it now; otherwise it is mounted at the sandbox's next boot.
        if let Some(ep) = self.agent_endpoint(sandbox) {
            let spec = AttachmentSpec { id: row.id, volume: vol.name.clone(), path: path.clone(), read_only, subpath: subpath.clone() };
            let failure = match self.agent_call(&ep, &AgentCommand::Attach(spec), Duration::from_secs(60)) {
                Ok(AgentReply::Done) => None,
                // Still mounted in the guest (hibernated, say): the record stays as it is.
                Ok(AgentReply::Failed(e)) if reused && e.errno == libc::EBUSY => {
                    return Err(FsError::new(libc::EBUSY, format!("sandbox `{sandbox}` already has a volume at {path}: {}", e.msg)))
                }
                Ok(AgentReply::Failed(e)) => Some(e.msg),
                Ok(other) => Some(format!("unexpected answer from the agent: {other:?}")),
                Err(e) => Some(format!("agent unreachable: {}", e.msg)),
            };
            if let Some(why) = failure {
                self.engine.set_attachment_state(row.id, AttachState::Failed, &why)?;
            }
        }
        let row = self.engine.attachment(row.id)?.unwrap_or(row);
        Ok(AttachmentInfo { row, volume_name: vol.name })
    }

    /// Where this sandbox's agent takes commands, if it is running: the hybrid-vsock socket of
    /// its VM, or the unix socket of an agent on this host.
    /// A paused VM has none: touching its vsock while it is stopped wedges the backend.
    pub fn agent_endpoint(&self, sandbox: &str) -> Option<Endpoint> {
        let dir = self.sandbox_dir(sandbox);
        if let Ok(rt) = self.sandbox_rt(sandbox) {
            if let Some(vm) = rt.vm.lock().unwrap().as_mut() {
                return (!vm.paused && vm.running()).then(|| Endpoint::Hybrid { uds: dir.join("vsock"), port: AGENT_CONTROL_PORT });
            }
        }
        let local = dir.join("agent.sock");
        if local.exists() {
            return Some(Endpoint::Unix(local));
        }
        // A VM run by another VMM (Firecracker, Cloud Hypervisor) with its vsock uds_path at
        // the sandbox's `vsock`: the platform must not send commands while it is paused.
        let uds = dir.join("vsock");
        uds.exists().then_some(Endpoint::Hybrid { uds, port: AGENT_CONTROL_PORT })
    }

    /// Boots a microVM for `sandbox` (created if new) with `volumes` attached at boot, and
    /// returns once its agent is up and has mounted them (or said why not).
    pub fn run_sandbox(
        self: &Arc<Self>,
        sandbox: &str,
        volumes: &[(String, String, bool, String)],
        memory: &str,
    ) -> FsResult<Vec<AttachmentInfo>> {
        let rt = match self.sandbox_rt(sandbox) {
            Ok(rt) => rt,
            Err(_) => self.create_sandbox(sandbox)?,
        };
        if rt.vm.lock().unwrap().is_some() {
            return Err(FsError::new(libc::EBUSY, format!("sandbox `{sandbox}` is already running")));
        }
        let existing = self.attachments(Some(sandbox))?;
        for (volume, path, ro, subpath) in volumes {
            // Running a sandbox again with the same volumes reuses their attachments.
            let same = existing.iter().find(|a| a.row.path == normalize(path));
            match same {
                Some(a) if a.volume_name == *volume && a.row.read_only == *ro && a.row.subpath == normalize(subpath) => {}
                Some(a) => {
                    return Err(FsError::new(
                        libc::EEXIST,
                        format!(
                            "sandbox `{sandbox}` already has volume `{}` attached at {} ({}, subpath {}); detach it first to attach `{volume}` there",
                            a.volume_name,
                            a.row.path,
                            if a.row.read_only { "read-only" } else { "read-write" },
                            a.row.subpath
                        ),
                    ))
                }
                None => {
                    self.attach(sandbox, volume, path, *ro, subpath)?;
                }
            }
        }
        let images = vm::find_images(self.config.images.as_deref())?;
        let started = std::time::Instant::now();
        *rt.vm.lock().unwrap() = Some(vm::Vm::boot(&self.sandbox_dir(sandbox), &images, memory)?);
        let ep = Endpoint::Hybrid { uds: self.sandbox_dir(sandbox).join("vsock"), port: AGENT_CONTROL_PORT };
        let deadline = started + Duration::from_secs(180);
        let hellos = rt.hellos.load(Ordering::SeqCst);
        let mounted = loop {
            {
                let mut guard = rt.vm.lock().unwrap();
                let vm = guard.as_mut().expect("booted above");
                if !vm.running() {
                    let tail = vm.console_tail(30);
                    if let Some(vm) = guard.take() {
                        vm.stop(Duration::ZERO);
                    }
                    return Err(FsError::new(libc::EIO, format!("the VM of sandbox `{sandbox}` exited during boot; console:\n{tail}")));
                }
            }
            // Knock on the agent's control port only once it has said hello (it listens before
            // that): host-side vsock connects to a guest that is not listening yet are best avoided.
            if rt.hellos.load(Ordering::SeqCst) != hellos {
                if let Ok(AgentReply::Status(mounts)) = self.agent_call(&ep, &AgentCommand::Status, Duration::from_secs(10)) {
                    break mounts;
                }
            }
            if std::time::Instant::now() > deadline {
                let tail = rt.vm.lock().unwrap().take().map(|vm| {
                    let t = vm.console_tail(30);
                    vm.stop(Duration::ZERO);
                    t
                });
                return Err(FsError::new(
                    libc::ETIMEDOUT,
                    format!("the agent of sandbox `{sandbox}` did not come up; console:\n{}", tail.unwrap_or_default()),
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        tracing::info!("sandbox {sandbox}: VM up with {} mount(s) in {:?}", mounted.len(), started.elapsed());
        let console = rt.vm.lock().unwrap().as_ref().map(|vm| vm.console_tail(40)).unwrap_or_default();
        for a in self.attachments(Some(sandbox))? {
            if !mounted.iter().any(|m| m.path == a.row.path) && a.row.state != AttachState::Failed {
                let why: Vec<&str> = console.lines().filter(|l| l.contains(&a.row.path)).collect();
                let reason = format!("the guest agent could not mount it: {}", why.join(" / "));
                self.engine.set_attachment_state(a.row.id, AttachState::Failed, &reason)?;
            }
        }
        self.attachments(Some(sandbox))
    }

    /// Shuts a sandbox's VM down: the agent flushes and unmounts, then powers off.
    pub fn stop_sandbox(&self, sandbox: &str) -> FsResult<()> {
        let rt = self.sandbox_rt(sandbox)?;
        if rt.vm.lock().unwrap().is_none() {
            return Err(FsError::new(libc::EINVAL, format!("sandbox `{sandbox}` has no running VM")));
        }
        if rt.vm.lock().unwrap().as_ref().is_some_and(|vm| vm.paused) {
            // A hibernated VM is woken first so that it can flush and unmount in order.
            self.resume(sandbox)?;
        }
        if let Some(ep) = self.agent_endpoint(sandbox) {
            let _ = self.agent_call(&ep, &AgentCommand::Shutdown, Duration::from_secs(30));
        }
        let vm = rt.vm.lock().unwrap().take();
        if let Some(vm) = vm {
            vm.stop(Duration::from_secs(30));
        }
        for s in self.sessions_where(|s| s.sandbox == sandbox) {
            self.end_session(&s, AttachState::Released, "sandbox stopped");
        }
        Ok(())
    }

    /// Sends one command to an agent and waits for its answer.
    pub fn agent_call(&self, ep: &Endpoint, cmd: &AgentCommand, timeout: Duration) -> FsResult<AgentReply> {
        let unreachable = |e: std::io::Error| FsError::new(libc::EHOSTUNREACH, format!("cannot reach the agent at {ep}: {e}"));
        // A VM that was just booted or thawed may not answer its vsock at once: retry the
        // connection (not the command) for a while. A local agent's socket answers or not.
        let patience = if matches!(ep, Endpoint::Hybrid { .. }) { timeout.min(Duration::from_secs(30)) } else { Duration::ZERO };
        let deadline = std::time::Instant::now() + patience;
        let mut s = loop {
            match ep.connect() {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::info!("agent at {ep} not reachable yet: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(unreachable(e)),
            }
        };
        s.set_read_timeout(Some(timeout)).map_err(unreachable)?;
        crate::proto::write_frame(&mut s, cmd).map_err(unreachable)?;
        crate::proto::read_frame::<AgentReply>(&mut s)
            .map_err(unreachable)?
            .ok_or_else(|| FsError::new(libc::EHOSTUNREACH, format!("the agent at {ep} closed the connection without answering")))
    }

    /// Runs a lifecycle command on a sandbox's agent, turning its refusal into an error.
    pub fn agent_command(&self, sandbox: &str, cmd: AgentCommand, timeout: Duration) -> FsResult<AgentReply> {
        self.sandbox_rt(sandbox)?;
        let ep = self
            .agent_endpoint(sandbox)
            .ok_or_else(|| FsError::new(libc::EHOSTUNREACH, format!("sandbox `{sandbox}` has no running agent")))?;
        match self.agent_call(&ep, &cmd, timeout)? {
            AgentReply::Failed(e) => Err(FsError::new(e.errno, format!("agent of sandbox `{sandbox}`: {}", e.msg))),
            other => Ok(other),
        }
    }

    /// Creates sandbox `child` with `parent`'s attachment intents and a copy of each of the
    /// parent's mount sessions, for the child's agent (a clone of the parent's memory) to resume
    /// under its own identity.
    pub fn fork_sandbox(self: &Arc<Self>, parent: &str, child: &str) -> FsResult<Arc<SandboxRt>> {
        let attachments = self.attachments(Some(parent))?;
        let rt = self.create_sandbox(child)?;
        for a in attachments {
            let mut row = a.row.clone();
            row.sandbox = child.to_string();
            row.state = AttachState::Released;
            row.reason = format!("forked from `{parent}`; waiting for the child's agent");
            row = self.engine.add_attachment(&row)?;
            for s in self.sessions_where(|s| s.sandbox == parent && s.attachment == a.row.id) {
                let copy = Arc::new(s.fork(self.new_session_id(), child, row.id, &self.engine));
                self.register_session(copy);
            }
        }
        Ok(rt)
    }

    pub fn attachments(&self, sandbox: Option<&str>) -> FsResult<Vec<AttachmentInfo>> {
        let rows = self.engine.attachments(sandbox, None)?;
        let names: HashMap<VolId, String> = self.engine.list_volumes()?.into_iter().map(|v| (v.id, v.name)).collect();
        Ok(rows
            .into_iter()
            .map(|row| {
                let volume_name = names.get(&row.volume).cloned().unwrap_or_default();
                AttachmentInfo { row, volume_name }
            })
            .collect())
    }

    /// Flushes and unmounts (through the agent, if one runs) and forgets the attachment. A mount
    /// with open files is refused unless `force`.
    pub fn detach(&self, sandbox: &str, path: &str, force: bool) -> FsResult<()> {
        let row = self.attachment_at(sandbox, path)?;
        let path = row.path.clone();
        let sessions = self.sessions_where(|s| s.attachment == row.id);
        let open: usize = sessions.iter().map(|s| s.open_files()).sum();
        if open > 0 && !force {
            return Err(FsError::new(
                libc::EBUSY,
                format!("{open} file(s) are open on {path} in sandbox `{sandbox}` (use --force to detach anyway)"),
            ));
        }
        if let Some(ep) = self.agent_endpoint(sandbox) {
            match self.agent_call(&ep, &AgentCommand::Detach { path: path.clone(), force }, Duration::from_secs(60)) {
                Ok(AgentReply::Failed(e)) if e.errno != libc::ENOENT => {
                    return Err(FsError::new(e.errno, format!("agent of sandbox `{sandbox}`: {}", e.msg)))
                }
                _ => {}
            }
        }
        for s in sessions {
            self.end_session(&s, AttachState::Released, "detached");
        }
        self.engine.delete_attachment(row.id)
    }

    /// Hibernation: the agent flushes and releases every lease first; then a VM is frozen.
    pub fn hibernate(&self, sandbox: &str) -> FsResult<()> {
        self.agent_command(sandbox, AgentCommand::Hibernate, Duration::from_secs(90))?;
        let rt = self.sandbox_rt(sandbox)?;
        let mut vm = rt.vm.lock().unwrap();
        if let Some(vm) = vm.as_mut() {
            vm.pause()?;
        }
        Ok(())
    }

    /// Resume: a frozen VM runs again, then the agent takes its leases again and waiting
    /// accesses continue.
    pub fn resume(&self, sandbox: &str) -> FsResult<()> {
        let rt = self.sandbox_rt(sandbox)?;
        if let Some(vm) = rt.vm.lock().unwrap().as_mut() {
            if vm.paused {
                vm.cont()?;
            }
        }
        self.agent_command(sandbox, AgentCommand::Resume, Duration::from_secs(90)).map(|_| ())
    }

    /// The attachment at mount path `path` (normalized) of `sandbox`.
    pub fn attachment_at(&self, sandbox: &str, path: &str) -> FsResult<AttachmentRow> {
        let path = normalize(path);
        self.engine
            .attachments(Some(sandbox), None)?
            .into_iter()
            .find(|a| a.path == path)
            .ok_or_else(|| FsError::new(libc::ENOENT, format!("sandbox `{sandbox}` has no volume attached at {path}")))
    }

    /// Deletes a volume; refused while attached unless `force`, which detaches it everywhere.
    pub fn delete_volume(&self, name: &str, force: bool) -> FsResult<()> {
        let vol = self.engine.volume(name)?;
        let attached = self.engine.attachments(None, Some(vol.id))?;
        if !attached.is_empty() && !force {
            let list: Vec<String> = attached.iter().map(|a| format!("{}:{}", a.sandbox, a.path)).collect();
            return Err(FsError::new(
                libc::EBUSY,
                format!("volume `{name}` is attached to {} (use --force to detach and delete)", list.join(", ")),
            ));
        }
        for a in &attached {
            for s in self.sessions_where(|s| s.attachment == a.id) {
                self.end_session(&s, AttachState::Released, "volume deleted");
            }
            self.engine.delete_attachment(a.id)?;
        }
        self.engine.delete_volume(vol.id)
    }

    /// Whether the lock grace period after a restart still runs: some attachment mounted before
    /// the restart has not reclaimed its locks yet, and the grace (a lease TTL) has not ended.
    pub fn in_lock_grace(&self) -> bool {
        let g = self.grace.lock().unwrap();
        !g.expected.is_empty() && g.until.is_some_and(|t| std::time::Instant::now() < t)
    }

    /// An attachment's guest reclaimed its locks: the grace need not wait for it any more.
    pub fn reclaimed(&self, attachment: u64) {
        let mut g = self.grace.lock().unwrap();
        if g.expected.remove(&attachment) && g.expected.is_empty() {
            tracing::info!("lock grace period over: every mount from before the restart has reclaimed its locks");
        }
    }

    fn sessions_where(&self, f: impl Fn(&Session) -> bool) -> Vec<Arc<Session>> {
        self.sessions.lock().unwrap().values().filter(|s| f(s)).cloned().collect()
    }

    fn register_session(&self, s: Arc<Session>) {
        self.by_volume.lock().unwrap().entry(s.vol).or_default().push(Arc::downgrade(&s));
        self.sessions.lock().unwrap().insert(s.id, s);
    }

    fn new_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Other live sessions on `vol` (for cache invalidations).
    fn peers(&self, vol: VolId, except: u64) -> Vec<Arc<Session>> {
        let mut map = self.by_volume.lock().unwrap();
        let Some(list) = map.get_mut(&vol) else { return Vec::new() };
        list.retain(|w| w.strong_count() > 0);
        list.iter().filter_map(|w| w.upgrade()).filter(|s| s.id != except).collect()
    }

    /// Drops a released session from the registry without touching its attachment record.
    pub fn forget_session(&self, s: &Arc<Session>) {
        self.sessions.lock().unwrap().remove(&s.id);
        let _ = self.engine.forget_replays(s.id);
        self.lock_freed_all(self.locks.release_session(s.id, self.remote_locks().as_ref()));
    }

    /// Tells the sessions waiting for a lock on `ino` that bytes there were freed.
    pub fn lock_freed(&self, ino: Ino, waiting: &[u64]) {
        if waiting.is_empty() {
            return;
        }
        for s in self.sessions_where(|s| waiting.contains(&s.id)) {
            s.lock_freed(ino);
        }
    }

    pub fn lock_freed_all(&self, freed: locks::Freed) {
        for ((_, ino), waiting) in freed {
            self.lock_freed(ino, &waiting);
        }
    }

    /// Ends a session: drops its handles (freeing unlinked files), closes its connection and
    /// records why in the attachment.
    pub fn end_session(&self, s: &Arc<Session>, state: AttachState, reason: &str) {
        tracing::info!(sandbox = %s.sandbox, session = s.id, state = state.name(), reason, "session ended");
        self.sessions.lock().unwrap().remove(&s.id);
        self.lock_freed_all(self.locks.release_session(s.id, self.remote_locks().as_ref()));
        let _ = self.engine.forget_replays(s.id);
        s.close(&self.engine);
        let _ = self.engine.set_attachment_state(s.attachment, state, reason);
    }
}

/// `/a//b/` → `/a/b`.
pub fn normalize(path: &str) -> String {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    format!("/{}", parts.join("/"))
}

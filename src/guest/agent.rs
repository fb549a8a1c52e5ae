//! The guest agent: asks the host which volumes this sandbox has, mounts each one with FUSE and
//! serves them until told to stop.
//!
//! Shutdown (SIGTERM or SIGINT) is orderly: each mount is synced (`syncfs`, which makes the
//! kernel write back its dirty pages through us) and unmounted before the agent exits, so nothing
//! written before the signal is lost.
//!
//! The agent also listens on a control port for the host's runtime commands
//! ([`AgentCommand`]): attach, detach, hibernate, resume, exec, shutdown, status. In a VM that is
//! vsock port 1025 (the host reaches it through its hybrid-vsock socket); on an ordinary host it
//! is the unix socket `agent.sock` next to the sandbox's guest socket.

use super::client::{control_hello, Backoff, MountClient, BUSY_FIRST, BUSY_MAX};
use super::fuse::{Invalidator, VolumeFs};
use crate::fs::FsError;
use crate::proto::{self, AgentCommand, AgentReply, AttachmentSpec, MountStatus};
use crate::transport::{Endpoint, Listener, AGENT_CONTROL_PORT};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::{mpsc, Mutex};
use std::time::Duration;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// One live mount.
pub struct Mount {
    pub spec: AttachmentSpec,
    pub client: Arc<MountClient>,
    session: Option<fuser::BackgroundSession>,
    /// Tells this mount from a later one at the same path.
    pub id: u64,
    /// Where it is mounted here: the attachment's path, under the agent's `--mount-root`.
    pub local: PathBuf,
}

/// Where the attachment at `path` is mounted: `path` itself, or `path` under `root` (an agent
/// run next to another on one host, such as a forked sandbox's beside its parent's).
pub fn local_path(root: Option<&Path>, path: &str) -> PathBuf {
    match root {
        Some(r) => r.join(path.trim_start_matches('/')),
        None => PathBuf::from(path),
    }
}

/// Numbers mounts, so that the end of an old session is never taken for a newer mount's.
static NEXT_MOUNT: AtomicU64 = AtomicU64::new(1);

impl Mount {
    /// Connects to the host for `spec` and mounts it at `spec.path` (under `root`, if given).
    /// `on_end` runs with the mount's id when its FUSE session ends, whoever ends it.
    pub fn start(
        endpoint: &Endpoint,
        spec: &AttachmentSpec,
        root: Option<&Path>,
        host_timeout: Duration,
        on_end: impl FnOnce(u64) + Send + 'static,
    ) -> Result<Mount, String> {
        let id = NEXT_MOUNT.fetch_add(1, Ordering::Relaxed);
        let path = local_path(root, &spec.path);
        std::fs::create_dir_all(&path).map_err(|e| format!("cannot create mount point {}: {e}", path.display()))?;
        if is_mountpoint(&path) {
            return Err(format!("{} is already a mount point", path.display()));
        }
        let client = MountClient::connect(endpoint.clone(), &spec.path, host_timeout)
            .map_err(|e| format!("volume {} at {}: {e}", spec.volume, spec.path))?;
        let granted = client.granted();
        let mut options = vec![
            fuser::MountOption::FSName(format!("volumefs:{}", granted.volume)),
            fuser::MountOption::Subtype("volumefs".into()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::NoDev,
        ];
        if granted.read_only {
            options.push(fuser::MountOption::RO);
        }
        let mut config = fuser::Config::default();
        config.mount_options = options;
        config.acl = fuser::SessionACL::All;
        config.n_threads = Some(2);
        config.clone_fd = true;
        let invalidator = Arc::new(Invalidator::default());
        let fs = VolumeFs::new(client.clone(), invalidator.clone()).on_end(move || on_end(id));
        let session = fuser::Session::new(fs, &path, &config).map_err(|e| format!("cannot mount {}: {e}", path.display()))?;
        invalidator.start(session.notifier(), &client);
        let session = session.spawn().map_err(|e| format!("cannot start FUSE session for {}: {e}", path.display()))?;
        raise_readahead(&path);
        Ok(Mount { spec: spec.clone(), client, session: Some(session), id, local: path })
    }

    /// Whether the FUSE session has ended (the kernel unmounted it: `umount` in the guest).
    pub fn ended(&self) -> bool {
        self.session.as_ref().is_none_or(|s| s.guard.is_finished())
    }

    /// After an unmount inside the guest: tells the host (the session ends, the attachment
    /// reads `released`, "unmounted in the guest") and reaps the finished session thread.
    /// Nothing is unmounted here: the path may already hold something else.
    pub fn finish_unmounted(mut self) {
        let told = self.client.unmounted(STOP_GRACE);
        if let Some(session) = self.session.take() {
            // The session's mount checks that the kernel still has it before unmounting, so a
            // newer mount at the same path is never touched.
            if let Err(e) = session.join() {
                tracing::warn!(path = %self.spec.path, "FUSE session ended with: {e}");
            }
        }
        tracing::info!(path = %self.spec.path, reported = told, "unmounted in the guest: volume released");
    }

    /// Flushes and unmounts. A mount still busy is detached lazily so the agent can exit; a
    /// host that stays unreachable for [`STOP_GRACE`] is given up on (requests fail with EIO).
    pub fn stop(mut self) {
        self.client.stopping(STOP_GRACE);
        let path = self.local.clone();
        if !self.ended() {
            syncfs(&path);
        }
        if let Some(session) = self.session.take() {
            if let Err(e) = session.umount_and_join() {
                tracing::warn!("unmount of {} failed ({e}); detaching it", path.display());
                lazy_unmount(&path);
            }
        }
        self.client.close();
    }
}

/// The kernel grants a FUSE mount 128 KiB of readahead at mount time; with 1 MiB a sequential
/// read takes a ninth of the round trips. Best effort. The device number comes from
/// /proc/self/mountinfo: the agent must never make a request to its own mount.
fn raise_readahead(path: &Path) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dev = mountinfo.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() > 4 && Path::new(&unescape(f[4])) == path).then(|| f[2].to_string())
    });
    if let Some(dev) = dev {
        let _ = std::fs::write(format!("/sys/class/bdi/{dev}/read_ahead_kb"), format!("{}", crate::proto::MAX_IO / 1024));
    }
}

fn cpath(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap_or_default()
}

/// Makes the kernel write back every dirty page of the mount at `path`.
pub fn syncfs(path: &Path) {
    if let Ok(dir) = std::fs::File::open(path) {
        use std::os::fd::AsRawFd;
        // SAFETY: syncfs on a descriptor we hold open.
        unsafe { libc::syncfs(dir.as_raw_fd()) };
    }
}

fn lazy_unmount(path: &Path) {
    let c = cpath(path);
    // SAFETY: umount2 with a NUL-terminated path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

/// Whether `path` is the root of a mount (its device differs from its parent's).
pub fn is_mountpoint(path: &Path) -> bool {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    mountinfo.lines().any(|l| l.split(' ').nth(4).is_some_and(|m| Path::new(&unescape(m)) == want))
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// The agent's state: its mounts by path, and whether it is hibernated.
pub struct Agent {
    server: Endpoint,
    /// See [`MountClient`]: how long a request waits for an unreachable host.
    host_timeout: Duration,
    /// `--mount-root`: attachments are mounted at their path under it.
    mount_root: Option<PathBuf>,
    mounts: Mutex<BTreeMap<String, Mount>>,
    hibernated: Mutex<bool>,
    /// Where FUSE sessions report their end: (path, mount id).
    ended: Mutex<mpsc::Sender<(String, u64)>>,
    /// Inside a VM a shutdown powers the machine off; on an ordinary host it only exits.
    in_vm: bool,
}

/// How long hibernation may wait for requests in flight, and resume for the host.
const LIFECYCLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a mount being stopped waits for a host it cannot reach before failing what is
/// pending with EIO: a server restart fits in it, a server that is gone does not hang the guest.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

impl Agent {
    fn mount(&self, spec: &AttachmentSpec) -> Result<(), FsError> {
        // A mount unmounted in the guest whose end has not been handled yet is handled now, so
        // that attaching again right after an `umount` never finds the path taken.
        let stale = {
            let mut mounts = self.mounts.lock().unwrap();
            match mounts.get(&spec.path) {
                Some(m) if m.ended() => mounts.remove(&spec.path),
                Some(_) => return Err(FsError::new(libc::EBUSY, format!("{} is already mounted", spec.path))),
                None => None,
            }
        };
        if let Some(m) = stale {
            m.finish_unmounted();
        }
        let mut mounts = self.mounts.lock().unwrap();
        if mounts.contains_key(&spec.path) {
            return Err(FsError::new(libc::EBUSY, format!("{} is already mounted", spec.path)));
        }
        let ended = self.ended.lock().unwrap().clone();
        let path = spec.path.clone();
        let on_end = move |id| {
            let _ = ended.send((path, id));
        };
        let m = Mount::start(&self.server, spec, self.mount_root.as_deref(), self.host_timeout, on_end)
            .map_err(|e| FsError::new(libc::EIO, e))?;
        tracing::info!(path = %spec.path, at = %m.local.display(), volume = %spec.volume, read_only = spec.read_only, "mounted");
        mounts.insert(spec.path.clone(), m);
        Ok(())
    }

    fn handle(&self, cmd: AgentCommand) -> AgentReply {
        let result = match cmd {
            AgentCommand::Attach(spec) => self.mount(&spec).map(|_| AgentReply::Done),
            AgentCommand::Detach { path, force } => self.detach(&path, force).map(|_| AgentReply::Done),
            AgentCommand::Hibernate => self.hibernate().map(|_| AgentReply::Done),
            AgentCommand::Resume => self.resume().map(|_| AgentReply::Done),
            AgentCommand::Exec { argv, stdin, timeout_ms } => exec(&argv, &stdin, Duration::from_millis(timeout_ms)),
            AgentCommand::Status => Ok(AgentReply::Status(self.status())),
            AgentCommand::Shutdown => {
                STOP.store(true, Ordering::SeqCst);
                Ok(AgentReply::Done)
            }
        };
        result.unwrap_or_else(AgentReply::Failed)
    }

    fn detach(&self, path: &str, force: bool) -> Result<(), FsError> {
        let m =
            self.mounts.lock().unwrap().remove(path).ok_or_else(|| FsError::new(libc::ENOENT, format!("nothing is mounted at {path}")))?;
        if m.ended() {
            // Unmounted in the guest already: nothing left to unmount, only to let go of.
            m.stop();
            tracing::info!(path, "detached (it had been unmounted in the guest)");
            return Ok(());
        }
        let p = m.local.clone();
        syncfs(&p);
        let c = cpath(&p);
        // SAFETY: umount2 with a NUL-terminated path.
        let rc = unsafe { libc::umount2(c.as_ptr(), if force { libc::MNT_DETACH } else { 0 }) };
        let e = std::io::Error::last_os_error();
        if rc != 0 && e.raw_os_error() == Some(libc::EINVAL) && !is_mountpoint(&p) {
            // Unmounted in the guest between the check above and now (the session thread may
            // not have seen it yet).
            m.stop();
            tracing::info!(path, "detached (it had been unmounted in the guest)");
            return Ok(());
        }
        if rc != 0 {
            self.mounts.lock().unwrap().insert(path.to_string(), m);
            return Err(FsError::new(
                e.raw_os_error().unwrap_or(libc::EBUSY),
                format!("cannot unmount {path}: {e} (a process is using it; detach with --force to detach it lazily)"),
            ));
        }
        m.stop();
        tracing::info!(path, "unmounted");
        Ok(())
    }

    /// A FUSE session ended. If it is still the live mount at `path` (the agent's own unmounts
    /// take the mount out of the table first), it was unmounted inside the guest: tell the host
    /// and let the path be attached again.
    fn session_ended(&self, path: &str, id: u64) {
        let m = {
            let mut mounts = self.mounts.lock().unwrap();
            match mounts.get(path) {
                Some(m) if m.id == id => mounts.remove(path),
                _ => None,
            }
        };
        if let Some(m) = m {
            tracing::warn!(path, volume = %m.spec.volume, "unmounted in the guest: releasing the volume");
            m.finish_unmounted();
        }
    }

    fn hibernate(&self) -> Result<(), FsError> {
        let mut h = self.hibernated.lock().unwrap();
        if *h {
            return Ok(());
        }
        let mounts = self.mounts.lock().unwrap();
        for m in mounts.values() {
            if !m.spec.read_only {
                syncfs(&m.local);
            }
            m.client.hibernate(LIFECYCLE_TIMEOUT)?;
        }
        *h = true;
        tracing::info!("hibernated: every lease released");
        Ok(())
    }

    fn resume(&self) -> Result<(), FsError> {
        let mut h = self.hibernated.lock().unwrap();
        let mounts = self.mounts.lock().unwrap();
        for m in mounts.values() {
            m.client.wake(LIFECYCLE_TIMEOUT)?;
        }
        *h = false;
        tracing::info!("resumed: every lease taken again");
        Ok(())
    }

    fn status(&self) -> Vec<MountStatus> {
        let hibernated = *self.hibernated.lock().unwrap();
        self.mounts
            .lock()
            .unwrap()
            .values()
            .map(|m| {
                let g = m.client.granted();
                MountStatus { path: m.spec.path.clone(), volume: g.volume, read_only: g.read_only, session: g.session, hibernated }
            })
            .collect()
    }
}

/// Runs a program for `exec`, feeding `stdin`, killing it after `timeout`.
fn exec(argv: &[String], stdin: &[u8], timeout: Duration) -> Result<AgentReply, FsError> {
    use std::io::{Read, Write};
    let (prog, args) = argv.split_first().ok_or_else(|| FsError::new(libc::EINVAL, "exec needs a command"))?;
    let mut child = std::process::Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| FsError::new(e.raw_os_error().unwrap_or(libc::ENOENT), format!("cannot run {prog}: {e}")))?;
    let mut input = child.stdin.take();
    let data = stdin.to_vec();
    let feeder = std::thread::spawn(move || {
        if let Some(i) = input.as_mut() {
            let _ = i.write_all(&data);
        }
    });
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let o = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_end(&mut b);
        }
        b
    });
    let e = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_end(&mut b);
        }
        b
    });
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(FsError::from)? {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().map_err(FsError::from)?;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = feeder.join();
    let stdout = o.join().unwrap_or_default();
    let mut stderr = e.join().unwrap_or_default();
    use std::os::unix::process::ExitStatusExt;
    let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    if status.signal().is_some() && std::time::Instant::now() > deadline {
        stderr.extend_from_slice(format!("volumefs-guest: killed after {timeout:?}\n").as_bytes());
    }
    Ok(AgentReply::Exec { code, stdout, stderr })
}

/// Where the agent takes commands: vsock port 1025 in a VM, else `agent.sock` beside the
/// sandbox's guest socket.
pub fn control_endpoint(server: &Endpoint) -> Option<Endpoint> {
    match server {
        Endpoint::Vsock { .. } => Some(Endpoint::Vsock { cid: libc::VMADDR_CID_ANY, port: AGENT_CONTROL_PORT }),
        Endpoint::Unix(p) => p.parent().map(|d| Endpoint::Unix(d.join("agent.sock"))),
        Endpoint::Hybrid { .. } => None,
    }
}

fn serve_control(agent: Arc<Agent>, listener: Listener) {
    loop {
        let mut stream = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let agent = agent.clone();
        std::thread::spawn(move || {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
            let cmd: AgentCommand = match proto::read_frame(&mut stream) {
                Ok(Some(c)) => c,
                _ => return,
            };
            let _ = stream.set_read_timeout(None);
            let reply = agent.handle(cmd);
            let _ = proto::write_frame(&mut stream, &reply);
        });
    }
}

/// `volumefs-guest agent`: mounts the sandbox's attachments, takes commands, serves until
/// SIGTERM or a shutdown command.
pub fn run(server: Endpoint, control: Option<Endpoint>, host_timeout: Duration, mount_root: Option<PathBuf>) -> Result<(), String> {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let in_vm = matches!(server, Endpoint::Vsock { .. });
    let (ended, ends) = mpsc::channel::<(String, u64)>();
    let agent = Arc::new(Agent {
        server: server.clone(),
        host_timeout,
        mount_root,
        mounts: Mutex::new(BTreeMap::new()),
        hibernated: Mutex::new(false),
        ended: Mutex::new(ended),
        in_vm,
    });
    {
        let a = agent.clone();
        std::thread::Builder::new()
            .name("vfs-ends".into())
            .spawn(move || {
                for (path, id) in ends {
                    a.session_ended(&path, id);
                }
            })
            .map_err(|e| e.to_string())?;
    }
    let control = control.or_else(|| control_endpoint(&server));
    let listener = match &control {
        Some(Endpoint::Unix(p)) => Some(Listener::bind_unix(p).map_err(|e| format!("cannot listen on {}: {e}", p.display()))?),
        Some(Endpoint::Vsock { port, .. }) => {
            Some(Listener::bind_vsock(*port).map_err(|e| format!("cannot listen on vsock port {port}: {e}"))?)
        }
        _ => None,
    };
    let (sandbox, attachments) = connect_with_retry(&server)?;
    tracing::info!(sandbox, attachments = attachments.len(), "agent started");
    let mut failed = 0;
    for spec in &attachments {
        if let Err(e) = agent.mount(spec) {
            tracing::error!("{e}");
            failed += 1;
        }
    }
    if let Some(l) = listener {
        let a = agent.clone();
        std::thread::Builder::new().name("vfs-control".into()).spawn(move || serve_control(a, l)).map_err(|e| e.to_string())?;
    }
    println!("ready");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mounts = std::mem::take(&mut *agent.mounts.lock().unwrap());
    tracing::info!(mounts = mounts.len(), "stopping: flushing and unmounting");
    for m in mounts.values() {
        m.client.stopping(STOP_GRACE);
    }
    if *agent.hibernated.lock().unwrap() {
        for m in mounts.values() {
            let _ = m.client.wake(STOP_GRACE);
        }
    }
    for (_, m) in mounts {
        m.stop();
    }
    if let Some(Endpoint::Unix(p)) = &control {
        let _ = std::fs::remove_file(p);
    }
    if agent.in_vm && STOP.load(Ordering::SeqCst) {
        // SAFETY: sync then power off; only ever inside the sandbox VM (vsock transport).
        unsafe {
            libc::sync();
            libc::reboot(libc::RB_POWER_OFF);
        }
    }
    if failed == 0 {
        Ok(())
    } else {
        Err(format!("{failed} attachment(s) could not be mounted"))
    }
}

/// The host may not be listening yet when a VM boots, or be busy: retry for a while.
fn connect_with_retry(server: &Endpoint) -> Result<(String, Vec<AttachmentSpec>), String> {
    let mut delay = Duration::from_millis(20);
    let mut busy = Backoff::new(BUSY_FIRST, BUSY_MAX);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match control_hello(server) {
            Ok(r) => return Ok(r),
            Err(e) if e.errno == libc::ENOTCONN && std::time::Instant::now() < deadline && !STOP.load(Ordering::SeqCst) => {
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            // A busy host said "not now": ask again, with jitter, within the same deadline.
            Err(e) if e.errno == libc::EAGAIN && std::time::Instant::now() < deadline && !STOP.load(Ordering::SeqCst) => {
                let d = busy.next_delay();
                tracing::info!("host busy ({}); asking again in {d:?}", e.msg);
                std::thread::sleep(d);
            }
            Err(e) => return Err(format!("cannot reach the host at {server}: {e}")),
        }
    }
}

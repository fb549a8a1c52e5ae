//! The guest agent: asks the host which volumes this sandbox has, mounts each one with FUSE and
//! serves them until told to stop.
//!
//! Shutdown (SIGTERM or SIGINT) is orderly: each mount is synced (`syncfs`, which makes the
//! kernel write back its dirty pages through us) and unmounted before the agent exits, so nothing
//! written before the signal is lost.

use super::client::{control_hello, MountClient};
use super::fuse::VolumeFs;
use crate::proto::AttachmentSpec;
use crate::transport::Endpoint;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
}

impl Mount {
    /// Connects to the host for `spec` and mounts it at `spec.path`.
    pub fn start(endpoint: &Endpoint, spec: &AttachmentSpec) -> Result<Mount, String> {
        let path = PathBuf::from(&spec.path);
        std::fs::create_dir_all(&path).map_err(|e| format!("cannot create mount point {}: {e}", path.display()))?;
        if is_mountpoint(&path) {
            return Err(format!("{} is already a mount point", path.display()));
        }
        let client = MountClient::connect(endpoint.clone(), spec.id).map_err(|e| format!("volume {} at {}: {e}", spec.volume, spec.path))?;
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
        let fs = VolumeFs::new(client.clone(), granted.read_only);
        let session = fuser::Session::new(fs, &path, &config).map_err(|e| format!("cannot mount {}: {e}", path.display()))?;
        install_notifier(&client, session.notifier());
        let session = session.spawn().map_err(|e| format!("cannot start FUSE session for {}: {e}", path.display()))?;
        Ok(Mount { spec: spec.clone(), client, session: Some(session) })
    }

    /// Flushes and unmounts. A mount still busy is detached lazily so the agent can exit.
    pub fn stop(mut self) {
        let path = PathBuf::from(&self.spec.path);
        syncfs(&path);
        if let Some(session) = self.session.take() {
            if let Err(e) = session.umount_and_join() {
                log::warn!("unmount of {} failed ({e}); detaching it", path.display());
                lazy_unmount(&path);
            }
        }
        self.client.close();
    }
}

/// Routes pushed invalidations to the kernel. Attribute invalidation is cheap and takes no page
/// locks, so it runs inline on the connection's reader thread, in order with replies; page and
/// entry invalidation can wait on locks held by requests whose replies that same thread must
/// deliver, so they go to their own thread.
fn install_notifier(client: &Arc<MountClient>, notifier: fuser::Notifier) {
    use crate::proto::Notice;
    let (tx, rx) = std::sync::mpsc::channel::<Notice>();
    let inline = notifier.clone();
    std::thread::Builder::new()
        .name("vfs-notify".into())
        .spawn(move || {
            for n in rx {
                match n {
                    Notice::InvalInode { ino } => {
                        let _ = notifier.inval_inode(fuser::INodeNo(ino), 0, 0);
                    }
                    Notice::InvalEntry { parent, name } => {
                        let _ = notifier.inval_entry(fuser::INodeNo(parent), std::ffi::OsStr::from_bytes(&name));
                    }
                }
            }
        })
        .expect("spawn notifier thread");
    let tx = std::sync::Mutex::new(tx);
    client.on_notice(move |n| {
        if let Notice::InvalInode { ino } = &n {
            let _ = inline.inval_inode(fuser::INodeNo(*ino), -1, 0);
        }
        let _ = tx.lock().unwrap().send(n);
    });
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

/// `volumefs-guest agent`: mounts the sandbox's attachments and serves until SIGTERM.
pub fn run(server: Endpoint) -> Result<(), String> {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let (sandbox, attachments) = connect_with_retry(&server)?;
    eprintln!("volumefs-guest: sandbox {sandbox}: {} attachment(s)", attachments.len());
    let mut mounts = Vec::new();
    let mut failed = Vec::new();
    for spec in &attachments {
        match Mount::start(&server, spec) {
            Ok(m) => {
                println!("mounted {} {}{}", spec.path, spec.volume, if spec.read_only { " ro" } else { "" });
                mounts.push(m);
            }
            Err(e) => {
                eprintln!("volumefs-guest: {e}");
                failed.push(e);
            }
        }
    }
    println!("ready");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("volumefs-guest: stopping: flushing and unmounting {} volume(s)", mounts.len());
    for m in mounts {
        m.stop();
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("{} attachment(s) could not be mounted", failed.len()))
    }
}

/// The host may not be listening yet when a VM boots: retry for a while.
fn connect_with_retry(server: &Endpoint) -> Result<(String, Vec<AttachmentSpec>), String> {
    let mut delay = Duration::from_millis(20);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match control_hello(server) {
            Ok(r) => return Ok(r),
            Err(e) if e.errno == libc::ENOTCONN && std::time::Instant::now() < deadline && !STOP.load(Ordering::SeqCst) => {
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(format!("cannot reach the host at {server}: {e}")),
        }
    }
}

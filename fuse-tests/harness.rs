//! The harness of the real-FUSE suite: one server, its CLI, sandboxes and guest agents per test.
//!
//! Every test builds its own [`Cluster`]: a fresh temporary directory under `/tmp`, a
//! `volumefs server` listening on an ephemeral port with its data in that directory, and a CLI
//! wired to it through `VOLUMEFS_SERVER` / `VOLUMEFS_TOKEN`. Guest agents ([`Agent`]) mount the
//! sandbox's attachments under the same directory, so tests running in parallel threads never
//! share a name, a port, a socket or a mount point.
//!
//! Cleanup is the contract that matters most: a failing test must not leave a process or a
//! mount behind. Both guards clean up in `Drop`, which also runs while a test panics:
//! - [`Agent`]: SIGTERM, wait up to 5 s, SIGKILL if needed, then `umount -l` whatever of its
//!   mount points is still in `/proc/self/mountinfo`.
//! - [`Cluster`]: `umount -l` of any mount left under its directory (before anything else, so
//!   the recursive delete can never walk into a live volume), kill and reap the server, remove
//!   the directory.
//!
//! A watchdog thread per cluster SIGKILLs the cluster's agents if the test is still running
//! after [`WATCHDOG`]: a FUSE request the product never answers would otherwise hang the whole
//! suite; killing the daemon aborts the connection, so the stuck syscall fails with ENOTCONN
//! and the test reports a failure instead.
//!
//! Declare the cluster before the agents in a test (`let c = Cluster::new(); let a = ...`):
//! locals drop in reverse order, so the agents stop before their server does.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const SERVER_BIN: &str = env!("CARGO_BIN_EXE_volumefs");
pub const GUEST_BIN: &str = env!("CARGO_BIN_EXE_volumefs-guest");

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const GIB: u64 = 1024 * MIB;

/// How long a test may run before the watchdog kills its agents.
const WATCHDOG: Duration = Duration::from_secs(150);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The skip rule, shared by every test that mounts: FUSE mounts need root and `/dev/fuse`.
/// Without them the test is skipped loudly, unless `VOLUMEFS_REQUIRE_FUSE=1` (CI), where a
/// missing prerequisite is a failure.
pub fn fuse_available() -> bool {
    static UMASK: Once = Once::new();
    // Tests assert exact modes of new files; pin the umask once for the whole process.
    UMASK.call_once(|| unsafe {
        libc::umask(0o022);
    });
    let root = unsafe { libc::geteuid() } == 0;
    let dev = Path::new("/dev/fuse").exists();
    if root && dev {
        return true;
    }
    let why = format!("euid 0: {root}, /dev/fuse present: {dev}");
    if std::env::var("VOLUMEFS_REQUIRE_FUSE").as_deref() == Ok("1") {
        panic!("VOLUMEFS_REQUIRE_FUSE=1 but this machine cannot run FUSE tests: {why}");
    }
    eprintln!("\n**************************************************************");
    eprintln!("*** SKIPPED: needs root and /dev/fuse ({why})");
    eprintln!("**************************************************************\n");
    false
}

/// `require_fuse!()` at the top of a test: returns early (skip) or panics, see [`fuse_available`].
macro_rules! require_fuse {
    () => {
        if !$crate::harness::fuse_available() {
            return;
        }
    };
}

fn unique_dir() -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
    // Short on purpose: unix socket paths are limited to 108 bytes.
    PathBuf::from(format!("/tmp/vfst-{}-{}-{}", std::process::id(), n, nanos))
}

/// With `VOLUMEFS_TEST_PG` set to a PostgreSQL database, the metadata store of the server of
/// test directory `dir`: a schema of its own in that database (kept across restarts, since the
/// server arguments are), so that the suite runs against PostgreSQL as it does against SQLite.
pub fn test_meta(dir: &Path) -> Option<String> {
    let base = std::env::var("VOLUMEFS_TEST_PG").ok().filter(|s| !s.is_empty())?;
    let name = dir.file_name()?.to_string_lossy().replace(['-', '.'], "_");
    Some(format!("{base}{}schema={name}", if base.contains('?') { '&' } else { '?' }))
}

/// With `VOLUMEFS_TEST_BLOCKS` set (`file:///...` or `s3://bucket?...`), the block store of the
/// server of test directory `dir`: a directory inside it, or a prefix of its own in the bucket.
pub fn test_blocks(dir: &Path) -> Option<String> {
    let base = std::env::var("VOLUMEFS_TEST_BLOCKS").ok().filter(|s| !s.is_empty())?;
    if base.starts_with("file://") {
        return Some(format!("file://{}", dir.join("blocks").display()));
    }
    let name = dir.file_name()?.to_string_lossy().into_owned();
    Some(format!("{base}{}prefix={name}", if base.contains('?') { '&' } else { '?' }))
}

/// The mount points currently listed in `/proc/self/mountinfo`.
pub fn mount_table() -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    text.lines().filter_map(|line| line.split(' ').nth(4)).map(|p| PathBuf::from(unescape_mountinfo(p))).collect()
}

/// The mount options (per-mount and superblock) of the mount at `path`, if mounted.
pub fn mount_options(path: &Path) -> Option<String> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() > 5 && Path::new(&unescape_mountinfo(fields[4])) == path {
            let sep = fields.iter().position(|f| *f == "-")?;
            let super_opts = fields.get(sep + 3).copied().unwrap_or("");
            return Some(format!("{},{}", fields[5], super_opts));
        }
    }
    None
}

fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 4]).ok().and_then(|o| u8::from_str_radix(o, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn is_mounted(path: &Path) -> bool {
    mount_table().iter().any(|p| p == path)
}

/// `umount -l` every mount at or below `path`, deepest first.
fn lazy_unmount_under(path: &Path) {
    let mut points: Vec<PathBuf> = mount_table().into_iter().filter(|p| p.starts_with(path)).collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    points.dedup();
    for p in points {
        lazy_unmount(&p);
    }
}

fn lazy_unmount(path: &Path) {
    while is_mounted(path) {
        let out = Command::new("umount").arg("-l").arg(path).output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => {
                eprintln!("harness: umount -l {} failed: {}", path.display(), String::from_utf8_lossy(&o.stderr));
                return;
            }
            Err(e) => {
                eprintln!("harness: cannot run umount: {e}");
                return;
            }
        }
    }
}

fn tail(path: &Path, max: usize) -> String {
    let text = fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    if text.len() <= max {
        text
    } else {
        let mut start = text.len() - max;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        format!("...{}", &text[start..])
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// Waits up to `timeout` for `child` to exit.
fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => return None,
        }
    }
}

/// Polls `f` until it returns true or `timeout` passes; returns how long it took.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if f() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn spawn_server(data: &Path, log_path: &Path, extra: &[String]) -> Child {
    let log = OpenOptions::new().create(true).append(true).open(log_path).unwrap();
    Command::new(SERVER_BIN)
        .arg("server")
        .arg("--data")
        .arg(data)
        .arg("--http")
        .arg("127.0.0.1:0")
        .args(extra)
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn volumefs server")
}

/// A volume as `volume list --json` reports it.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub name: String,
    pub cap: u64,
    pub used: u64,
}

/// One server, its data directory and its CLI. See the module docs for the cleanup contract.
pub struct Cluster {
    pub dir: PathBuf,
    pub data: PathBuf,
    pub addr: String,
    pub token: String,
    server: Child,
    server_log: PathBuf,
    /// Extra `volumefs server` arguments (e.g. `--lease-ttl 2`), kept for restarts.
    server_args: Vec<String>,
    agent_pids: Arc<Mutex<Vec<u32>>>,
    done: Arc<AtomicBool>,
}

impl Cluster {
    pub fn new() -> Cluster {
        Cluster::with_server_args(&[])
    }

    /// Like [`Cluster::new`], with extra `volumefs server` arguments, e.g. `&["--lease-ttl", "2"]`
    /// (`{dir}` in one stands for the test's directory).
    pub fn with_server_args(server_args: &[&str]) -> Cluster {
        let dir = unique_dir();
        let mut server_args: Vec<String> = server_args.iter().map(|a| a.replace("{dir}", &dir.to_string_lossy())).collect();
        if let Some(url) = test_meta(&dir).filter(|_| !server_args.iter().any(|a| a == "--meta")) {
            server_args.extend(["--meta".to_string(), url]);
        }
        if let Some(url) = test_blocks(&dir).filter(|_| !server_args.iter().any(|a| a == "--blocks")) {
            server_args.extend(["--blocks".to_string(), url]);
        }
        fs::create_dir(&dir).expect("create test dir");
        // Non-root callers of the permission tests must be able to traverse to the mounts.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let dir = fs::canonicalize(&dir).unwrap();
        let data = dir.join("data");
        let server_log = dir.join("server.log");
        let server = spawn_server(&data, &server_log, &server_args);
        let mut cluster = Cluster {
            dir,
            data,
            addr: String::new(),
            token: String::new(),
            server,
            server_log,
            server_args,
            agent_pids: Arc::new(Mutex::new(Vec::new())),
            done: Arc::new(AtomicBool::new(false)),
        };
        cluster.spawn_watchdog();
        cluster.wait_ready();
        cluster
    }

    /// Waits for the server to write `http-addr`, then reads the address and the token.
    fn wait_ready(&mut self) {
        let addr_file = self.data.join("http-addr");
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Ok(a) = fs::read_to_string(&addr_file) {
                if !a.trim().is_empty() {
                    self.addr = a.trim().to_string();
                    break;
                }
            }
            if let Ok(Some(status)) = self.server.try_wait() {
                panic!("volumefs server exited early ({status}):\n{}", self.server_log());
            }
            if Instant::now() > deadline {
                panic!("volumefs server did not write {} within {:?}:\n{}", addr_file.display(), STARTUP_TIMEOUT, self.server_log());
            }
            thread::sleep(Duration::from_millis(20));
        }
        let token = fs::read_to_string(self.data.join("api-token")).expect("read api-token");
        self.token = token.trim().to_string();
    }

    /// Stops the server (SIGTERM; it must exit within 5 s) and starts a new one on the same data
    /// directory. Agents are not touched.
    pub fn restart_server(&mut self) {
        signal(&self.server, libc::SIGTERM);
        let status = wait_timeout(&mut self.server, STOP_TIMEOUT);
        if status.is_none() {
            let _ = self.server.kill();
            let _ = self.server.wait();
        }
        assert!(status.is_some(), "server ignored SIGTERM for {STOP_TIMEOUT:?}:\n{}", self.server_log());
        self.start_server();
    }

    /// The server's process id (for reading its /proc entries).
    pub fn server_pid(&self) -> u32 {
        self.server.id()
    }

    /// Kills the server with SIGKILL, as a crash would, and reaps it. Agents are not touched;
    /// [`Cluster::start_server`] brings a server back on the same data directory.
    pub fn kill_server(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }

    /// Starts a server on the cluster's data directory after [`Cluster::kill_server`].
    pub fn start_server(&mut self) {
        let _ = fs::remove_file(self.data.join("http-addr"));
        self.server = spawn_server(&self.data, &self.server_log, &self.server_args);
        self.wait_ready();
    }

    fn spawn_watchdog(&self) {
        let done = self.done.clone();
        let pids = self.agent_pids.clone();
        let dir = self.dir.clone();
        thread::spawn(move || {
            let start = Instant::now();
            while !done.load(Ordering::SeqCst) {
                if start.elapsed() > WATCHDOG {
                    eprintln!(
                        "harness: watchdog: test in {} still running after {:?}; killing its \
                         agents to abort hung FUSE requests",
                        dir.display(),
                        WATCHDOG
                    );
                    for pid in pids.lock().unwrap().iter() {
                        unsafe {
                            libc::kill(*pid as libc::pid_t, libc::SIGKILL);
                        }
                    }
                    return;
                }
                thread::sleep(Duration::from_millis(250));
            }
        });
    }

    /// A path inside the cluster's temporary directory (not inside any volume).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn server_log(&self) -> String {
        tail(&self.server_log, 4000)
    }

    /// Runs the CLI with the server and token in the environment.
    pub fn cli_output(&self, args: &[&str]) -> Output {
        Command::new(SERVER_BIN)
            .args(args)
            .env("VOLUMEFS_SERVER", format!("http://{}", self.addr))
            .env("VOLUMEFS_TOKEN", &self.token)
            .stdin(Stdio::null())
            .output()
            .expect("run volumefs CLI")
    }

    /// Runs the CLI, asserts success, returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.cli_output(args);
        assert!(
            out.status.success(),
            "`volumefs {}` failed ({}):\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("CLI stdout is UTF-8")
    }

    /// Runs the CLI, asserts failure (non-zero exit, a message on stderr), returns stderr.
    pub fn cli_fail(&self, args: &[&str]) -> String {
        let out = self.cli_output(args);
        assert!(
            !out.status.success(),
            "`volumefs {}` succeeded but should have failed:\nstdout: {}\nstderr: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!stderr.trim().is_empty(), "`volumefs {}` failed ({}) without a message on stderr", args.join(" "), out.status);
        stderr
    }

    pub fn create_volume(&self, name: &str, cap: Option<&str>) {
        let mut args = vec!["volume", "create", name];
        if let Some(cap) = cap {
            args.extend(["--cap", cap]);
        }
        self.cli(&args);
    }

    pub fn volumes(&self) -> Vec<VolumeInfo> {
        let out = self.cli(&["volume", "list", "--json"]);
        let json: serde_json::Value =
            serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("volume list --json is not JSON ({e}): {out}"));
        let list = json.as_array().unwrap_or_else(|| panic!("volume list --json: not an array: {out}"));
        list.iter()
            .map(|v| VolumeInfo {
                name: v["name"].as_str().unwrap_or_else(|| panic!("no name in {v}")).to_string(),
                cap: v["cap_bytes"].as_u64().unwrap_or_else(|| panic!("no numeric cap_bytes in {v}")),
                used: v["used_bytes"].as_u64().unwrap_or_else(|| panic!("no numeric used_bytes in {v}")),
            })
            .collect()
    }

    pub fn volume(&self, name: &str) -> Option<VolumeInfo> {
        self.volumes().into_iter().find(|v| v.name == name)
    }

    pub fn volume_used(&self, name: &str) -> u64 {
        self.volume(name).unwrap_or_else(|| panic!("volume {name} not listed")).used
    }

    /// Registers a sandbox, returns its guest socket.
    pub fn sandbox(&self, name: &str) -> PathBuf {
        let out = self.cli(&["sandbox", "create", name, "--json"]);
        let json: serde_json::Value =
            serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("sandbox create --json is not JSON ({e}): {out}"));
        assert_eq!(json["name"].as_str(), Some(name), "sandbox create --json: {out}");
        let socket = json["guest_socket"].as_str().unwrap_or_else(|| panic!("no guest_socket in {out}"));
        PathBuf::from(socket)
    }

    /// `volumefs attach SB VOLUME --at AT [extra...]`.
    pub fn attach(&self, sandbox: &str, volume: &str, at: &Path, extra: &[&str]) {
        let at = at.to_str().unwrap();
        let mut args = vec!["attach", sandbox, volume, "--at", at];
        args.extend_from_slice(extra);
        self.cli(&args);
    }

    /// Starts `volumefs-guest agent` on `guest_socket` and waits until every path in `mounts`
    /// is mounted.
    pub fn start_agent(&self, guest_socket: &Path, mounts: &[&Path]) -> Agent {
        self.start_agent_with(guest_socket, mounts, &[])
    }

    /// [`Cluster::start_agent`] with extra agent arguments (e.g. `--host-timeout 3`).
    pub fn start_agent_with(&self, guest_socket: &Path, mounts: &[&Path], extra: &[&str]) -> Agent {
        static N: AtomicU64 = AtomicU64::new(0);
        let log = self.dir.join(format!("agent-{}.log", N.fetch_add(1, Ordering::SeqCst)));
        let file = fs::File::create(&log).unwrap();
        let child = Command::new(GUEST_BIN)
            .arg("agent")
            .arg("--server")
            .arg(format!("unix:{}", guest_socket.display()))
            .args(extra)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn volumefs-guest agent");
        self.agent_pids.lock().unwrap().push(child.id());
        let mut agent =
            Agent { child, mounts: mounts.iter().map(|p| p.to_path_buf()).collect(), log, pids: self.agent_pids.clone(), stopped: None };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let table: BTreeSet<PathBuf> = mount_table().into_iter().collect();
            if agent.mounts.iter().all(|m| table.contains(m)) {
                return agent;
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                agent.stopped = Some(status);
                panic!("volumefs-guest agent exited early ({status}):\n{}\nserver log:\n{}", agent.log(), self.server_log());
            }
            if Instant::now() > deadline {
                panic!(
                    "agent did not mount {:?} within {:?}:\nagent log:\n{}\nserver log:\n{}",
                    agent.mounts,
                    STARTUP_TIMEOUT,
                    agent.log(),
                    self.server_log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Cluster {
    /// `volume fsck` of every volume; what it found wrong, by volume.
    pub fn fsck_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let list = self.cli_output(&["volume", "list", "--json"]);
        let names: Vec<String> = match serde_json::from_slice::<serde_json::Value>(&list.stdout) {
            Ok(serde_json::Value::Array(vs)) => vs.iter().filter_map(|v| v["name"].as_str().map(str::to_string)).collect(),
            _ => return vec![format!("volume list failed: {}", String::from_utf8_lossy(&list.stderr))],
        };
        for name in names {
            let o = self.cli_output(&["volume", "fsck", &name, "--json"]);
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(r) => {
                    for p in r["problems"].as_array().into_iter().flatten() {
                        out.push(format!("{name}: {}", p.as_str().unwrap_or_default()));
                    }
                }
                Err(_) => out.push(format!("{name}: fsck failed: {text}{}", String::from_utf8_lossy(&o.stderr))),
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        // Every test ends with every volume consistent (`volume fsck`), when it ends well and
        // its server still runs: the agents go first, so nothing changes under the check.
        let check = !thread::panicking() && matches!(self.server.try_wait(), Ok(None));
        // First: nothing under the directory may stay mounted, or the recursive delete below
        // would delete volume contents through a live mount (or hang on a dead one).
        for pid in self.agent_pids.lock().unwrap().iter() {
            unsafe {
                libc::kill(*pid as libc::pid_t, libc::SIGKILL);
            }
        }
        lazy_unmount_under(&self.dir);
        let problems = if check { self.fsck_problems() } else { Vec::new() };
        signal(&self.server, libc::SIGTERM);
        if wait_timeout(&mut self.server, STOP_TIMEOUT).is_none() {
            let _ = self.server.kill();
            let _ = self.server.wait();
        }
        if std::env::var_os("VOLUMEFS_KEEP_TEST_DIRS").is_none() {
            lazy_unmount_under(&self.dir);
            if mount_table().iter().any(|p| p.starts_with(&self.dir)) {
                eprintln!("harness: mounts remain under {}, not deleting it", self.dir.display());
            } else if let Err(e) = fs::remove_dir_all(&self.dir) {
                eprintln!("harness: cannot remove {}: {e}", self.dir.display());
            }
        }
        assert!(problems.is_empty(), "volume fsck after the test found problems:\n{}", problems.join("\n"));
    }
}

/// A running `volumefs-guest agent`. See the module docs for the cleanup contract.
pub struct Agent {
    child: Child,
    pub mounts: Vec<PathBuf>,
    log: PathBuf,
    pids: Arc<Mutex<Vec<u32>>>,
    stopped: Option<ExitStatus>,
}

impl Agent {
    /// The agent's process id (to stop and continue it, as a paused VM would be).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        tail(&self.log, 4000)
    }

    /// SIGTERM, then waits up to 5 s (SIGKILL after that). Returns the exit status and whether
    /// the agent exited by itself; leftover mounts are lazily unmounted either way.
    fn shutdown(&mut self) -> (ExitStatus, bool) {
        let (status, clean) = match (self.stopped, self.child.try_wait()) {
            (Some(status), _) | (None, Ok(Some(status))) => (status, true),
            _ => {
                signal(&self.child, libc::SIGTERM);
                match wait_timeout(&mut self.child, STOP_TIMEOUT) {
                    Some(status) => (status, true),
                    None => {
                        let _ = self.child.kill();
                        (self.child.wait().expect("wait for agent"), false)
                    }
                }
            }
        };
        self.stopped = Some(status);
        // Reaped: its pid may be reused from now on, so the cluster must never signal it.
        self.pids.lock().unwrap().retain(|p| *p != self.child.id());
        (status, clean)
    }

    fn unmount_leftovers(&self) -> Vec<PathBuf> {
        let left: Vec<PathBuf> = self.mounts.iter().filter(|m| is_mounted(m)).cloned().collect();
        for m in &left {
            lazy_unmount(m);
        }
        left
    }

    /// SIGTERM, and how long the agent took to exit, if it did within `limit` (else it is
    /// killed and `None` returned). Leftover mounts are lazily unmounted either way.
    pub fn terminate_within(mut self, limit: Duration) -> Option<(ExitStatus, Duration)> {
        let start = Instant::now();
        signal(&self.child, libc::SIGTERM);
        let status = wait_timeout(&mut self.child, limit);
        let took = start.elapsed();
        self.shutdown();
        self.unmount_leftovers();
        status.map(|s| (s, took))
    }

    /// Stops the agent the way the platform does (SIGTERM) and asserts the documented outcome:
    /// exit status 0 within 5 s and every mount gone.
    pub fn stop(mut self) {
        let (status, clean) = self.shutdown();
        let left = self.unmount_leftovers();
        assert!(clean, "agent ignored SIGTERM for {STOP_TIMEOUT:?}; log:\n{}", self.log());
        assert!(status.success(), "agent exited with {status} on SIGTERM; log:\n{}", self.log());
        assert!(left.is_empty(), "agent exited but left mounts {left:?}; log:\n{}", self.log());
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown();
        self.unmount_leftovers();
    }
}

/// The bytes a file stores, summed over the data runs SEEK_DATA / SEEK_HOLE find (what the
/// volume charges for it: holes are free).
pub fn stored_bytes(p: &Path) -> u64 {
    use std::os::unix::io::AsRawFd;
    let f = fs::File::open(p).unwrap();
    let len = f.metadata().unwrap().len() as i64;
    let (mut pos, mut sum) = (0i64, 0u64);
    while pos < len {
        // SAFETY: lseek on a descriptor this function owns.
        let start = unsafe { libc::lseek(f.as_raw_fd(), pos, libc::SEEK_DATA) };
        if start < 0 {
            break; // ENXIO: no data after pos
        }
        let stop = unsafe { libc::lseek(f.as_raw_fd(), start, libc::SEEK_HOLE) };
        assert!(stop > start, "SEEK_HOLE after {start} in {}: {stop}", p.display());
        sum += (stop - start) as u64;
        pos = stop;
    }
    sum
}

/// Runs `sh -c script` as `uid:gid` with the given supplementary groups (none if empty).
pub fn run_as(uid: u32, gid: u32, groups: &[u32], script: &str) -> Output {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={uid}")).arg(format!("--regid={gid}"));
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        let list: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        cmd.arg(format!("--groups={}", list.join(",")));
    }
    cmd.arg("sh").arg("-c").arg(format!("umask 022; {script}"));
    cmd.stdin(Stdio::null()).output().expect("run setpriv")
}

/// [`run_as`] and assert success.
pub fn run_as_ok(uid: u32, gid: u32, groups: &[u32], script: &str) -> String {
    let out = run_as(uid, gid, groups, script);
    assert!(
        out.status.success(),
        "as uid {uid} gid {gid} groups {groups:?}: `{script}` failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// [`run_as`] and assert failure with `message` (e.g. "Permission denied") on stderr.
pub fn run_as_denied(uid: u32, gid: u32, groups: &[u32], script: &str, message: &str) {
    let out = run_as(uid, gid, groups, script);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "as uid {uid} gid {gid} groups {groups:?}: `{script}` succeeded, expected `{message}`");
    assert!(
        stderr.contains(message),
        "as uid {uid} gid {gid} groups {groups:?}: `{script}` failed with `{}`, expected `{message}`",
        stderr.trim()
    );
}

/// Runs a shell command line (as the test's own user) and asserts success; returns stdout.
pub fn sh(script: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(script).stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "`{script}` failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Small filesystem helpers shared by the tests.
// ---------------------------------------------------------------------------------------------

pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

pub fn errno_name(e: i32) -> String {
    format!("{e} {}", volumefs::fs::errno_name(e))
}

/// Opens an existing file for reading and writing.
pub fn rw(p: &Path) -> fs::File {
    fs::OpenOptions::new().read(true).write(true).open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

/// A `struct flock` of `typ` on [start, start+len).
pub fn flock_struct(typ: i32, start: i64, len: i64) -> libc::flock {
    // SAFETY: a zeroed flock is valid; every field used is set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start as libc::off_t;
    fl.l_len = len as libc::off_t;
    fl
}

/// fcntl(F_SETLK / F_SETLKW) of `typ` on [start, start+len).
pub fn setlk(f: &fs::File, cmd: i32, typ: i32, start: i64, len: i64) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let fl = flock_struct(typ, start, len);
    cvt(unsafe { libc::fcntl(f.as_raw_fd(), cmd, &fl) }).map(|_| ())
}

/// The errno of `r`, with a message naming the operation if it unexpectedly succeeded.
#[track_caller]
pub fn errno_of<T: std::fmt::Debug>(what: &str, r: io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("{what}: succeeded ({v:?}), expected an error"),
        Err(e) => e.raw_os_error().unwrap_or_else(|| panic!("{what}: non-OS error {e}")),
    }
}

/// Asserts that `r` failed with errno `expected`.
#[track_caller]
pub fn assert_errno<T: std::fmt::Debug>(what: &str, r: io::Result<T>, expected: i32) {
    let got = errno_of(what, r);
    assert_eq!(got, expected, "{what}: errno {}, expected {}", errno_name(got), errno_name(expected));
}

/// Converts a libc `-1 / errno` return into an `io::Result`.
pub fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub const RENAME_NOREPLACE: libc::c_uint = 1;
pub const RENAME_EXCHANGE: libc::c_uint = 2;

pub fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (a, b) = (cpath(from), cpath(to));
    let r = unsafe { libc::syscall(libc::SYS_renameat2, libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), flags) };
    cvt(r as libc::c_int).map(|_| ())
}

pub fn setxattr(path: &Path, name: &str, value: &[u8], flags: libc::c_int) -> io::Result<()> {
    let (p, n) = (cpath(path), CString::new(name).unwrap());
    let r = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), flags) };
    cvt(r).map(|_| ())
}

pub fn getxattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (p, n) = (cpath(path), CString::new(name).unwrap());
    let mut buf = vec![0u8; 64 * 1024];
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// `getxattr` with a zero-size buffer: the value's length.
pub fn getxattr_len(path: &Path, name: &str) -> io::Result<usize> {
    let (p, n) = (cpath(path), CString::new(name).unwrap());
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

pub fn listxattr(path: &Path) -> io::Result<Vec<String>> {
    let p = cpath(path);
    let mut buf = vec![0u8; 64 * 1024];
    let r = unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf.split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect())
}

pub fn removexattr(path: &Path, name: &str) -> io::Result<()> {
    let (p, n) = (cpath(path), CString::new(name).unwrap());
    cvt(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) }).map(|_| ())
}

pub fn mkfifo(path: &Path, mode: libc::mode_t) -> io::Result<()> {
    let p = cpath(path);
    cvt(unsafe { libc::mkfifo(p.as_ptr(), mode) }).map(|_| ())
}

pub fn mknod(path: &Path, mode: libc::mode_t) -> io::Result<()> {
    let p = cpath(path);
    cvt(unsafe { libc::mknod(p.as_ptr(), mode, 0) }).map(|_| ())
}

/// `utimensat` setting atime and mtime to (seconds, nanoseconds), following symlinks.
pub fn set_times(path: &Path, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
    let p = cpath(path);
    let mut ts: [libc::timespec; 2] = unsafe { std::mem::zeroed() };
    ts[0].tv_sec = atime.0 as libc::time_t;
    ts[0].tv_nsec = atime.1 as _;
    ts[1].tv_sec = mtime.0 as libc::time_t;
    ts[1].tv_nsec = mtime.1 as _;
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), ts.as_ptr(), 0) }).map(|_| ())
}

pub fn statvfs(path: &Path) -> io::Result<libc::statvfs> {
    let p = cpath(path);
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    cvt(unsafe { libc::statvfs(p.as_ptr(), &mut st) })?;
    Ok(st)
}

/// Drops the kernel page cache of one file (after writing it back), so that the next read is
/// served by the filesystem daemon, not by the guest's page cache.
pub fn drop_cache(path: &Path) {
    use std::os::unix::io::AsRawFd;
    let f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.sync_all().unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise(DONTNEED) on {}", path.display());
}

/// Names in a directory (without `.` and `..`), sorted.
pub fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A deterministic, non-repeating-looking byte pattern (seeded).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Reads a whole file, panicking with the path on error.
pub fn read(path: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    fs::File::open(path).and_then(|mut f| f.read_to_end(&mut v)).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    v
}

/// Writes a whole file (create/truncate) and closes it, panicking on error.
pub fn write(path: &Path, data: &[u8]) {
    fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Asserts two byte strings are equal without printing megabytes on failure.
#[track_caller]
pub fn assert_bytes_eq(what: &str, got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
    panic!(
        "{what}: contents differ: got {} bytes, want {} bytes, first difference at offset {first} \
         (got {:?}, want {:?})",
        got.len(),
        want.len(),
        got.get(first..(first + 16).min(got.len())),
        want.get(first..(first + 16).min(want.len()))
    );
}

/// One sandbox with one volume attached read-write at `mnt`: the setup of most tests.
/// Field order matters: the agent drops (stops) before the cluster.
pub struct Single {
    pub agent: Option<Agent>,
    pub mnt: PathBuf,
    pub socket: PathBuf,
    pub volume: String,
    pub c: Cluster,
}

impl Single {
    pub fn new() -> Single {
        Single::with_cap(None)
    }

    pub fn with_cap(cap: Option<&str>) -> Single {
        Single::with(cap, &[])
    }

    /// With extra `volumefs server` arguments (see [`Cluster::with_server_args`]).
    pub fn with_server_args(server_args: &[&str]) -> Single {
        Single::with(None, server_args)
    }

    fn with(cap: Option<&str>, server_args: &[&str]) -> Single {
        let c = Cluster::with_server_args(server_args);
        c.create_volume("vol", cap);
        let socket = c.sandbox("sb");
        let mnt = c.path("mnt");
        c.attach("sb", "vol", &mnt, &[]);
        let agent = c.start_agent(&socket, &[&mnt]);
        Single { agent: Some(agent), mnt, socket, volume: "vol".into(), c }
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn used(&self) -> u64 {
        self.c.volume_used(&self.volume)
    }

    /// Stops the agent (asserting a clean SIGTERM shutdown: exit 0, mount gone) and starts a
    /// new one on the same sandbox.
    pub fn restart_agent(&mut self) {
        self.agent.take().expect("agent running").stop();
        self.agent = Some(self.c.start_agent(&self.socket, &[&self.mnt]));
    }
}

/// Two sandboxes, `sb-a` and `sb-b`, each with the whole volume `vol` mounted (at `ma` and `mb`):
/// the setup of the coherence and locking tests. The agents drop (stop) before the cluster.
pub struct Pair {
    #[allow(dead_code)] // held for its Drop
    agent_a: Agent,
    #[allow(dead_code)] // held for its Drop
    agent_b: Agent,
    pub ma: PathBuf,
    pub mb: PathBuf,
    pub c: Cluster,
}

impl Pair {
    pub fn new(cap: &str) -> Pair {
        let c = Cluster::new();
        c.create_volume("vol", Some(cap));
        let (sa, sb) = (c.sandbox("sb-a"), c.sandbox("sb-b"));
        let (ma, mb) = (c.path("mnt-a"), c.path("mnt-b"));
        c.attach("sb-a", "vol", &ma, &[]);
        c.attach("sb-b", "vol", &mb, &[]);
        let agent_a = c.start_agent(&sa, &[&ma]);
        let agent_b = c.start_agent(&sb, &[&mb]);
        Pair { agent_a, agent_b, ma, mb, c }
    }
}

/// xorshift64*: reproducible randomness for the randomized tests, without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn pick<T: Clone>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize].clone()
    }
}

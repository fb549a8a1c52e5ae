//! The life of an attachment: runtime attach and detach, hibernate and resume with work in
//! flight, connection resets (snapshot restore) with exactly-once replay of mutations, an agent
//! that dies (its lease expires, its locks go), fork, and two sandboxes working on one volume
//! (coherent changes, locks, SQLite).
//!
//! States are read with `volumefs sandbox attachments SB --json` and every transition a test
//! observes is printed as a `TRANSITION` line (run with `--nocapture` to see them). Lifecycle
//! CLI calls run with a time limit ([`run_cli`]) so a product that hangs fails the test instead
//! of stalling the suite.
//!
//! Two pieces of scaffolding: descriptors that must live across hibernation or a detach are held
//! by a separate process ([`App`], see there why), and a forked sandbox's agent runs in its own
//! mount namespace ([`NsAgent`]) because the child mounts at the same paths as its parent.

use crate::harness::*;
use crate::protocol::Raw;
use serde_json::Value;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};
use volumefs::fs::{FsError, SetAttr};
use volumefs::proto::{self, Op, Reply, Request, Role, ServerMsg, Welcome};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Runs the CLI with a time limit; `None` if it had to be killed.
fn run_cli(c: &Cluster, args: &[&str], limit: Duration) -> Option<Output> {
    let mut child = Command::new(SERVER_BIN)
        .args(args)
        .env("VOLUMEFS_SERVER", format!("http://{}", c.addr))
        .env("VOLUMEFS_TOKEN", &c.token)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run volumefs CLI");
    // Drain the pipes in threads so a chatty CLI cannot block on a full pipe.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let to = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let te = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(10));
    };
    let stdout = to.join().unwrap();
    let stderr = te.join().unwrap();
    status.map(|status| Output { status, stdout, stderr })
}

/// [`run_cli`] that must succeed within `limit`; returns stdout.
#[track_caller]
fn cli_ok(c: &Cluster, args: &[&str], limit: Duration) -> String {
    let out = run_cli(c, args, limit)
        .unwrap_or_else(|| panic!("`volumefs {}` did not finish within {limit:?}\nserver log:\n{}", args.join(" "), c.server_log()));
    assert!(
        out.status.success(),
        "`volumefs {}` failed ({}):\nstdout: {}\nstderr: {}\nserver log:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        c.server_log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// [`run_cli`] that must fail (non-zero exit) within `limit`; returns (stdout, stderr).
#[track_caller]
fn cli_err(c: &Cluster, args: &[&str], limit: Duration) -> (String, String) {
    let out = run_cli(c, args, limit).unwrap_or_else(|| panic!("`volumefs {}` did not finish within {limit:?}", args.join(" ")));
    let (so, se) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(!out.status.success(), "`volumefs {}` succeeded but should have failed:\nstdout: {so}\nstderr: {se}", args.join(" "));
    (so, se)
}

const T: Duration = Duration::from_secs(60);

/// `sandbox attachments SB --json`.
fn attachments(c: &Cluster, sb: &str) -> Vec<Value> {
    let out = cli_ok(c, &["sandbox", "attachments", sb, "--json"], T);
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("attachments --json is not JSON ({e}): {out}"));
    v.as_array().unwrap_or_else(|| panic!("attachments --json: not an array: {out}")).clone()
}

/// The record of the attachment at `path` in `sb`, if any.
fn record(c: &Cluster, sb: &str, path: &Path) -> Option<Value> {
    let p = path.to_str().unwrap();
    attachments(c, sb).into_iter().find(|a| a["path"].as_str() == Some(p))
}

/// (state, reason) of the attachment at `path`; panics if there is none.
fn state(c: &Cluster, sb: &str, path: &Path) -> (String, String) {
    let r = record(c, sb, path).unwrap_or_else(|| panic!("sandbox {sb} has no attachment at {}: {:?}", path.display(), attachments(c, sb)));
    (r["state"].as_str().unwrap_or("").to_string(), r["reason"].as_str().unwrap_or("").to_string())
}

fn transition(what: &str, sb: &str, path: &Path, st: &(String, String)) {
    eprintln!("TRANSITION {what}: sandbox {sb} {} -> state `{}` reason {:?}", path.display(), st.0, st.1);
}

/// Asserts the state now, and prints the transition.
#[track_caller]
fn expect_state(c: &Cluster, what: &str, sb: &str, path: &Path, want: &str) -> (String, String) {
    let st = state(c, sb, path);
    transition(what, sb, path, &st);
    assert_eq!(st.0, want, "after {what}: attachment {} of {sb} is `{}` (reason {:?}), expected `{want}`", path.display(), st.0, st.1);
    st
}

/// Polls until the state is `want` (or `timeout`); returns it and how long it took.
#[track_caller]
fn wait_state(c: &Cluster, what: &str, sb: &str, path: &Path, want: &str, timeout: Duration) -> ((String, String), Duration) {
    let start = Instant::now();
    loop {
        let st = state(c, sb, path);
        if st.0 == want {
            transition(what, sb, path, &st);
            return (st, start.elapsed());
        }
        if start.elapsed() > timeout {
            panic!(
                "after {what}: attachment {} of {sb} still `{}` (reason {:?}) after {timeout:?}, \
                 expected `{want}`\nserver log:\n{}",
                path.display(),
                st.0,
                st.1,
                c.server_log()
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The pid of the `volumefs-guest agent` serving `socket` (a child of this test process).
fn agent_pid(socket: &Path) -> libc::pid_t {
    let want = format!("unix:{}", socket.display());
    let me = std::process::id().to_string();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<libc::pid_t>() else { continue };
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<String> = cmd.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if !args.iter().any(|a| a == &want) || !args.iter().any(|a| a == "agent") {
            continue;
        }
        let stat = fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // Field 4 (after the parenthesised command name) is the parent pid.
        let ppid = stat.rsplit(')').next().unwrap_or("").split_whitespace().nth(1);
        if ppid == Some(me.as_str()) {
            return pid;
        }
    }
    panic!("no agent process for {}", socket.display());
}

/// SIGKILLs the agent serving `socket`: no flush, no lease release, a stale FUSE mount left.
fn sigkill_agent(socket: &Path) {
    let pid = agent_pid(socket);
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill -9 {pid}");
    eprintln!("killed agent {pid} of {} with SIGKILL", socket.display());
}

/// A 64-bit FNV-1a checksum.
fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn is_would_block(e: i32) -> bool {
    e == libc::EAGAIN || e == libc::EACCES
}

/// Two sandboxes `sb-a`, `sb-b` with the whole volume `vol` mounted; agents drop first.
struct Pair {
    a: Option<Agent>,
    b: Option<Agent>,
    sa: PathBuf,
    ma: PathBuf,
    mb: PathBuf,
    c: Cluster,
}

fn pair(server_args: &[&str]) -> Pair {
    let c = Cluster::with_server_args(server_args);
    c.create_volume("vol", Some("256MiB"));
    let (sa, sb) = (c.sandbox("sb-a"), c.sandbox("sb-b"));
    let (ma, mb) = (c.path("mnt-a"), c.path("mnt-b"));
    c.attach("sb-a", "vol", &ma, &[]);
    c.attach("sb-b", "vol", &mb, &[]);
    let a = c.start_agent(&sa, &[&ma]);
    let b = c.start_agent(&sb, &[&mb]);
    Pair { a: Some(a), b: Some(b), sa, ma, mb, c }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.a.take();
        self.b.take();
    }
}

// ---------------------------------------------------------------------------------------------
// An application process
// ---------------------------------------------------------------------------------------------

/// The "application" side of the lifecycle tests: a python3 process that holds descriptors on
/// a mount and runs a streaming writer, driven line by line over its stdin/stdout.
///
/// Why not in the test process: every fork+exec of the test process (each CLI call, each agent
/// start, in this test or in the one running beside it) closes the child's copies of the test's
/// descriptors at exec, and close(2) on a FUSE file sends FLUSH and waits for the daemon. With a
/// descriptor on a hibernated mount, every spawn would block until resume, including the
/// `resume` CLI call itself.
const APP: &str = r#"
import os, sys, threading, time
lock = threading.Lock()
def say(*a):
    with lock:
        sys.stdout.write(" ".join(str(x) for x in a) + "\n")
        sys.stdout.flush()
fds = {}
writer = None
def stream(src, dst, chunk, n):
    try:
        with open(src, "rb") as s:
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            for i in range(n):
                view = memoryview(s.read(chunk))
                while view:
                    view = view[os.write(fd, view):]
                if i % 16 == 15:
                    os.fsync(fd)
                say("progress", i + 1)
                time.sleep(0.025)
            os.fsync(fd)
            os.close(fd)
        say("writer-done")
    except OSError as e:
        say("writer-error", e.errno, e)
for line in sys.stdin:
    c = line.split()
    try:
        if c[0] == "open":
            fds[c[1]] = os.open(c[2], os.O_RDWR if c[3] == "rw" else os.O_RDONLY)
            say("ok")
        elif c[0] == "write":
            say("ok", os.write(fds[c[1]], c[2].encode()))
        elif c[0] == "read":
            say("ok", os.read(fds[c[1]], int(c[2])).hex())
        elif c[0] == "pread":
            say("ok", os.pread(fds[c[1]], int(c[2]), int(c[3])).hex())
        elif c[0] == "tell":
            say("ok", os.lseek(fds[c[1]], 0, os.SEEK_CUR))
        elif c[0] == "ino":
            say("ok", os.fstat(fds[c[1]]).st_ino)
        elif c[0] == "fsync":
            os.fsync(fds[c[1]])
            say("ok")
        elif c[0] == "close":
            os.close(fds.pop(c[1]))
            say("ok")
        elif c[0] == "stream":
            writer = threading.Thread(target=stream, args=(c[1], c[2], int(c[3]), int(c[4])))
            writer.start()
            say("ok")
        elif c[0] == "join":
            writer.join()
            say("ok")
        else:
            say("err", 0, "unknown command")
    except OSError as e:
        say("err", e.errno, e.strerror)
"#;

struct App {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    replies: mpsc::Receiver<String>,
    progress: Arc<AtomicUsize>,
    writer: Arc<std::sync::Mutex<Option<String>>>,
}

impl App {
    fn start() -> App {
        let mut child = Command::new("python3")
            .args(["-u", "-c", APP])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn python3");
        let stdin = child.stdin.take();
        let out = child.stdout.take().unwrap();
        let (tx, replies) = mpsc::channel();
        let progress = Arc::new(AtomicUsize::new(0));
        let writer = Arc::new(std::sync::Mutex::new(None));
        {
            let (progress, writer) = (progress.clone(), writer.clone());
            thread::spawn(move || {
                use std::io::BufRead;
                for line in io::BufReader::new(out).lines() {
                    let Ok(line) = line else { return };
                    if let Some(n) = line.strip_prefix("progress ") {
                        progress.store(n.parse().unwrap_or(0), Ordering::SeqCst);
                    } else if line.starts_with("writer-") {
                        *writer.lock().unwrap() = Some(line);
                    } else if tx.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        App { child, stdin, replies, progress, writer }
    }

    /// Sends a command (none if empty) and waits up to `limit` for its answer line.
    fn cmd(&mut self, cmd: &str, limit: Duration) -> Option<String> {
        if !cmd.is_empty() {
            let w = self.stdin.as_mut().expect("app stdin");
            writeln!(w, "{cmd}").expect("write to app");
            w.flush().unwrap();
        }
        self.replies.recv_timeout(limit).ok()
    }

    /// A command that must answer `ok` within 60 s; returns what follows `ok`.
    #[track_caller]
    fn ok(&mut self, cmd: &str) -> String {
        match self.cmd(cmd, T) {
            Some(line) if line == "ok" || line.starts_with("ok ") => line[2..].trim().to_string(),
            Some(line) => panic!("app `{cmd}`: {line}"),
            None => panic!("app `{cmd}`: no answer within {T:?}"),
        }
    }

    fn progress(&self) -> usize {
        self.progress.load(Ordering::SeqCst)
    }

    fn writer_result(&self) -> Option<String> {
        self.writer.lock().unwrap().clone()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("lifecycle: app process {} did not exit", self.child.id());
    }
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex")).collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Runtime attach and detach
// ---------------------------------------------------------------------------------------------

#[test]
fn runtime_attach_and_detach() {
    require_fuse!();
    let c = Cluster::new();
    c.create_volume("vol", Some("64MiB"));
    let sock = c.sandbox("sb");
    let boot = c.path("boot");
    c.attach("sb", "vol", &boot, &[]);
    let agent = c.start_agent(&sock, &[&boot]);
    expect_state(&c, "agent start (boot attachment)", "sb", &boot, "mounted");

    // Files written earlier through another mount.
    fs::create_dir(boot.join("dir")).unwrap();
    write(&boot.join("dir/a.txt"), b"alpha\n");
    write(&boot.join("b.bin"), &pattern(200 * KIB as usize, 7));

    // Runtime attach: the command returns once the mount is live.
    let live = c.path("live");
    let out = cli_ok(&c, &["attach", "sb", "vol", "--at", live.to_str().unwrap(), "--json"], T);
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["state"], "mounted", "attach --json: {out}");
    assert!(is_mounted(&live), "attach returned but {} is not mounted", live.display());
    expect_state(&c, "runtime attach", "sb", &live, "mounted");
    assert_eq!(list(&live), vec!["b.bin".to_string(), "dir".to_string()]);
    assert_eq!(list(&live.join("dir")), vec!["a.txt".to_string()]);
    assert_eq!(read(&live.join("dir/a.txt")), b"alpha\n");
    assert_bytes_eq("cat b.bin", &read(&live.join("b.bin")), &pattern(200 * KIB as usize, 7));
    let ls = sh(&format!("ls {}", live.join("dir").display()));
    assert_eq!(ls.trim(), "a.txt");
    let cat = sh(&format!("cat {}", live.join("dir/a.txt").display()));
    assert_eq!(cat, "alpha\n");

    // A second attach at a path the sandbox already uses is refused by the server.
    let (_, err) = cli_err(&c, &["attach", "sb", "vol", "--at", live.to_str().unwrap()], T);
    assert!(!err.trim().is_empty());
    assert_eq!(
        attachments(&c, "sb").iter().filter(|a| a["path"].as_str() == live.to_str()).count(),
        1,
        "a refused attach must not add a record"
    );

    // Attach at a path that is already a mount point (a tmpfs the server knows nothing about):
    // the agent cannot mount it, the record says why, the CLI fails.
    let busy = c.path("busy");
    fs::create_dir(&busy).unwrap();
    sh(&format!("mount -t tmpfs vfst-busy {}", busy.display()));
    let (so, se) = cli_err(&c, &["attach", "sb", "vol", "--at", busy.to_str().unwrap(), "--json"], T);
    let st = expect_state(&c, "attach on an existing mount point", "sb", &busy, "failed");
    assert!(st.1.contains("already a mount point"), "reason of the failed attach: {:?} (stdout {so}, stderr {se})", st.1);
    assert!(se.contains("failed"), "CLI stderr: {se}");
    // The tmpfs is untouched, and the failed record can be detached.
    assert_eq!(mount_options(&busy).map(|o| o.contains("rw")), Some(true), "tmpfs at {} disappeared", busy.display());
    cli_ok(&c, &["detach", "sb", "--at", busy.to_str().unwrap()], T);
    assert!(record(&c, "sb", &busy).is_none(), "detached failed record still listed");
    sh(&format!("umount {}", busy.display()));

    // Detach with a file open on the mount is refused and the mount stays. The file is held by
    // a separate process (see [`App`]).
    let mut app = App::start();
    app.ok(&format!("open h {} ro", live.join("dir/a.txt").display()));
    let (_, err) = cli_err(&c, &["detach", "sb", "--at", live.to_str().unwrap()], T);
    assert!(err.contains("open") || err.contains("--force"), "refused detach should mention open files / --force: {err}");
    assert!(is_mounted(&live), "refused detach unmounted {}", live.display());
    expect_state(&c, "refused detach", "sb", &live, "mounted");
    assert_eq!(hex_decode(&app.ok("read h 100")), b"alpha\n", "the held file still reads after the refused detach");
    app.ok("close h");
    // FUSE sends RELEASE asynchronously after close(2): allow it a moment to arrive.
    let mut last_err = String::new();
    let took = eventually(Duration::from_secs(5), || match run_cli(&c, &["detach", "sb", "--at", live.to_str().unwrap()], T) {
        Some(o) if o.status.success() => true,
        Some(o) => {
            last_err = String::from_utf8_lossy(&o.stderr).into_owned();
            false
        }
        None => false,
    });
    assert!(took.is_some(), "detach after closing the file still refused: {last_err}");
    eprintln!("TRANSITION detach after close: succeeded after {took:?}; record gone");
    assert!(!is_mounted(&live), "{} still mounted after detach", live.display());
    assert!(record(&c, "sb", &live).is_none(), "record still listed after detach");

    // --force detaches even with a file open (lazy unmount).
    let forced = c.path("forced");
    cli_ok(&c, &["attach", "sb", "vol", "--at", forced.to_str().unwrap()], T);
    expect_state(&c, "runtime attach (for --force)", "sb", &forced, "mounted");
    app.ok(&format!("open h {} ro", forced.join("b.bin").display()));
    cli_ok(&c, &["detach", "sb", "--at", forced.to_str().unwrap(), "--force"], Duration::from_secs(30));
    assert!(!is_mounted(&forced), "{} still mounted after detach --force", forced.display());
    assert!(record(&c, "sb", &forced).is_none(), "record still listed after detach --force");
    eprintln!("TRANSITION detach --force with an open file: succeeded; record gone");
    // The boot mount was never disturbed.
    assert_eq!(read(&boot.join("dir/a.txt")), b"alpha\n");
    expect_state(&c, "after the detaches", "sb", &boot, "mounted");
    // The process holding a file on the force-detached mount must not hang: a read may fail
    // (the volume is gone from the sandbox) or succeed, and close must return.
    let read_after = app.cmd("read h 4096", Duration::from_secs(10));
    let close_after = if read_after.is_some() { app.cmd("close h", Duration::from_secs(10)) } else { None };
    if read_after.is_none() || close_after.is_none() {
        // Stopping the agent aborts the FUSE connection and frees the stuck process.
        drop(agent);
        let late = app.cmd("", Duration::from_secs(10));
        panic!(
            "after `detach --force`, a process with a file open on the detached mount hangs: \
             read -> {read_after:?}, close -> {close_after:?} (no answer within 10 s each; \
             after the agent was stopped: {late:?})"
        );
    }
    eprintln!("after detach --force: read -> {read_after:?}, close -> {close_after:?}");
    drop(app);
}

/// Issue #13: a plain `umount` inside the guest. The agent notices the FUSE session end,
/// reports the attachment `released` ("unmounted in the guest"), and the path can be attached
/// again (same record) or detached, with or without `--force`.
#[test]
fn umount_in_the_guest_releases_the_attachment_and_it_can_be_attached_again() {
    require_fuse!();
    let c = Cluster::new();
    c.create_volume("vol", Some("64MiB"));
    let sock = c.sandbox("sb");
    let mnt = c.path("mnt");
    let other = c.path("other");
    c.attach("sb", "vol", &mnt, &[]);
    c.attach("sb", "vol", &other, &[]);
    let agent = c.start_agent(&sock, &[&mnt, &other]);
    expect_state(&c, "agent start", "sb", &mnt, "mounted");
    write(&mnt.join("kept.txt"), b"written before the umount\n");
    let id = record(&c, "sb", &mnt).unwrap()["id"].clone();

    sh(&format!("umount {}", mnt.display()));
    assert!(!is_mounted(&mnt), "{} still mounted after umount", mnt.display());
    let ((_, reason), took) = wait_state(&c, "umount in the guest", "sb", &mnt, "released", Duration::from_secs(20));
    assert!(reason.contains("unmounted in the guest"), "reason after a guest umount: {reason:?}");
    eprintln!("guest umount reported after {took:?}");
    // The other mount of the same volume is untouched.
    expect_state(&c, "umount of the other path", "sb", &other, "mounted");
    assert_eq!(read(&other.join("kept.txt")), b"written before the umount\n");

    // Attach again at the same path: mounted now, under the same record, data intact.
    let out = cli_ok(&c, &["attach", "sb", "vol", "--at", mnt.to_str().unwrap(), "--json"], T);
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["state"], "mounted", "attach again --json: {out}\nagent log:\n{}", agent.log());
    assert_eq!(v["id"], id, "attach again should reuse the record: {out}");
    assert!(is_mounted(&mnt), "attach again returned but {} is not mounted", mnt.display());
    assert_eq!(attachments(&c, "sb").len(), 2, "{:?}", attachments(&c, "sb"));
    assert_eq!(read(&mnt.join("kept.txt")), b"written before the umount\n");
    write(&mnt.join("again.txt"), b"after the second attach");
    assert_eq!(read(&other.join("again.txt")), b"after the second attach");
    // Attaching again while it is mounted is still refused.
    cli_err(&c, &["attach", "sb", "vol", "--at", mnt.to_str().unwrap()], T);
    // A different volume at the released path is refused too (detach first).
    sh(&format!("umount {}", mnt.display()));
    wait_state(&c, "second umount in the guest", "sb", &mnt, "released", Duration::from_secs(20));
    c.create_volume("vol2", Some("16MiB"));
    let (_, err) = cli_err(&c, &["attach", "sb", "vol2", "--at", mnt.to_str().unwrap()], T);
    assert!(err.contains("already has a volume"), "attach of another volume at a released path: {err}");

    // detach --force of an attachment unmounted in the guest: works, record gone.
    cli_ok(&c, &["attach", "sb", "vol", "--at", mnt.to_str().unwrap()], T);
    expect_state(&c, "third attach", "sb", &mnt, "mounted");
    // Detach right after the umount, before the agent may have noticed: must work either way.
    sh(&format!("umount {}", mnt.display()));
    cli_ok(&c, &["detach", "sb", "--at", mnt.to_str().unwrap(), "--force"], T);
    assert!(record(&c, "sb", &mnt).is_none(), "record still listed after detach --force");
    assert!(!is_mounted(&mnt));
    // And a fresh attach there mounts, then a detach --force of a live mount unmounts it.
    cli_ok(&c, &["attach", "sb", "vol2", "--at", mnt.to_str().unwrap()], T);
    expect_state(&c, "fresh attach after detach", "sb", &mnt, "mounted");
    assert!(is_mounted(&mnt));
    write(&mnt.join("v2.txt"), b"vol2");
    cli_ok(&c, &["detach", "sb", "--at", mnt.to_str().unwrap(), "--force"], T);
    assert!(!is_mounted(&mnt), "{} still mounted after detach --force", mnt.display());
    assert!(record(&c, "sb", &mnt).is_none());
    expect_state(&c, "after everything", "sb", &other, "mounted");

    // An umount while the sandbox is hibernated: like every access it waits (the kernel's
    // forgets at unmount are held with the rest), and is reported once the sandbox resumes.
    cli_ok(&c, &["attach", "sb", "vol", "--at", mnt.to_str().unwrap()], T);
    expect_state(&c, "attach before hibernation", "sb", &mnt, "mounted");
    cli_ok(&c, &["sandbox", "hibernate", "sb"], T);
    expect_state(&c, "hibernate", "sb", &mnt, "released");
    // umount(2) itself, not umount(8), which stats the path first (and would wait too).
    let out = Command::new("timeout")
        .args([
            "-s",
            "KILL",
            "20",
            "python3",
            "-c",
            "import ctypes,os,sys; l=ctypes.CDLL(None, use_errno=True); r=l.umount2(sys.argv[1].encode(), 0); \
             sys.exit(0 if r == 0 else os.strerror(ctypes.get_errno()))",
            mnt.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "umount while hibernated: {out:?}");
    assert!(!is_mounted(&mnt));
    cli_ok(&c, &["sandbox", "resume", "sb"], T);
    expect_state(&c, "resume", "sb", &other, "mounted");
    let mut last = (String::new(), String::new());
    let took = eventually(Duration::from_secs(20), || {
        last = state(&c, "sb", &mnt);
        last.0 == "released" && last.1.contains("unmounted in the guest")
    });
    assert!(took.is_some(), "umount while hibernated not reported after the resume: {last:?}\nserver log:\n{}", c.server_log());
    transition("resume after an umount while hibernated", "sb", &mnt, &last);
    assert_eq!(read(&other.join("again.txt")), b"after the second attach");
    cli_ok(&c, &["attach", "sb", "vol", "--at", mnt.to_str().unwrap()], T);
    expect_state(&c, "attach after resume", "sb", &mnt, "mounted");
    assert_eq!(read(&mnt.join("again.txt")), b"after the second attach");
    agent.stop();
}

// ---------------------------------------------------------------------------------------------
// 2. Hibernate, resume and a storm of connection resets under a streaming writer
// ---------------------------------------------------------------------------------------------

const CHUNK: usize = 192 * 1024;
const CHUNKS: usize = 160; // 30 MiB

fn chunk(i: usize) -> Vec<u8> {
    pattern(CHUNK, 1000 + i as u64)
}

#[test]
fn hibernate_resume_and_connection_resets_under_a_streaming_writer() {
    require_fuse!();
    let p = pair(&[]);
    let c = &p.c;
    let (ma, mb) = (p.ma.clone(), p.mb.clone());
    let mut want = Vec::with_capacity(CHUNK * CHUNKS);
    for i in 0..CHUNKS {
        want.extend_from_slice(&chunk(i));
    }
    // The writer copies this local file (not on a volume) into the mount, chunk by chunk.
    let src = c.path("expected-stream.bin");
    write(&src, &want);
    let mut app = App::start();

    // Descriptors opened before hibernation, used across it.
    let keep_path = ma.join("keep.txt");
    write(&keep_path, b"");
    app.ok(&format!("open keep {} rw", keep_path.display()));
    assert_eq!(app.ok("write keep hello_"), "6");
    let keep_ino: u64 = app.ok("ino keep").parse().unwrap();
    let reader_path = ma.join("reader.bin");
    let reader_data = pattern(256 * KIB as usize, 99);
    write(&reader_path, &reader_data);
    app.ok(&format!("open reader {} ro", reader_path.display()));
    let half = reader_data.len() / 2;
    let first_half = hex_decode(&app.ok(&format!("read reader {half}")));

    // The writer: sequential writes with a deterministic pattern, an fsync every 16 chunks.
    let stream_path = ma.join("stream.bin");
    app.ok(&format!("stream {} {} {CHUNK} {CHUNKS}", src.display(), stream_path.display()));
    assert!(
        eventually(Duration::from_secs(30), || app.progress() >= 20).is_some(),
        "writer made no progress before hibernation: {:?}",
        app.writer_result()
    );

    // Hibernate: leases released, accesses block (they do not fail).
    let before = app.progress();
    let out = cli_ok(c, &["sandbox", "hibernate", "sb-a", "--json"], Duration::from_secs(100));
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v[0]["state"], "released", "hibernate --json: {out}");
    expect_state(c, "hibernate", "sb-a", &ma, "released");
    // A new name created while hibernated: the call waits for resume.
    let during = ma.join("created-while-hibernated.txt");
    let mut blocked = Command::new("sh").arg("-c").arg(format!("printf 'made while hibernated' > {}", during.display())).spawn().unwrap();
    thread::sleep(Duration::from_secs(1));
    let st = state(c, "sb-a", &ma);
    assert_eq!(st.0, "released", "1 s into hibernation: {st:?}");
    assert!(blocked.try_wait().unwrap().is_none(), "a create on the hibernated mount returned while hibernated");
    assert!(app.writer_result().is_none(), "writer ended during hibernation: {:?}", app.writer_result());
    eprintln!("hibernated with the writer at chunk {before}, 1 s later at {} (page cache absorbs some)", app.progress());
    // The other sandbox is unaffected.
    write(&mb.join("b-during-hibernation"), b"b works");
    assert_eq!(read(&mb.join("b-during-hibernation")), b"b works");

    // Resume: leases back, blocked calls continue.
    let out = cli_ok(c, &["sandbox", "resume", "sb-a", "--json"], Duration::from_secs(100));
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v[0]["state"], "mounted", "resume --json: {out}");
    expect_state(c, "resume", "sb-a", &ma, "mounted");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = blocked.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = blocked.kill();
            let _ = blocked.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let status = status.expect("the create blocked by hibernation did not finish 30 s after resume");
    assert!(status.success(), "the create blocked by hibernation failed after resume: {status}");
    assert_eq!(read(&during), b"made while hibernated");

    // Descriptors opened before hibernation: same inode, same offset, same data.
    assert_eq!(app.ok("write keep world"), "5");
    assert_eq!(app.ok("tell keep"), "11", "offset continues after resume");
    assert_eq!(app.ok("ino keep").parse::<u64>().unwrap(), keep_ino, "same inode after resume");
    assert_eq!(hex_decode(&app.ok("pread keep 100 0")), b"hello_world");
    let second_half = hex_decode(&app.ok(&format!("read reader {}", reader_data.len())));
    assert_bytes_eq("reader before hibernation", &first_half, &reader_data[..half]);
    assert_bytes_eq("reader after resume (same offset)", &second_half, &reader_data[half..]);

    // Snapshot-restore storm: 20 host-side resets while the writer keeps going.
    let mut closed = Vec::new();
    let storm_start = app.progress();
    for i in 0..20 {
        let out = cli_ok(c, &["sandbox", "reset-connections", "sb-a"], T);
        closed.push(out.trim().trim_start_matches("closed ").split(' ').next().unwrap_or("").to_string());
        // The descriptor kept across hibernation keeps working through the storm too.
        if i % 5 == 0 {
            assert_eq!(app.ok(&format!("write keep {}", i / 5)), "1");
        }
        thread::sleep(Duration::from_millis(100 + (i as u64 * 37) % 100));
    }
    eprintln!("connections closed by each reset: {:?}; writer chunks {storm_start} -> {} during the storm", closed, app.progress());
    app.ok("join");
    match app.writer_result() {
        Some(r) if r == "writer-done" => {}
        other => panic!("the writer saw an error: {other:?}\nserver log:\n{}", c.server_log()),
    }
    expect_state(c, "20 x reset-connections", "sb-a", &ma, "mounted");

    // The kept descriptor: "hello_world" + one digit per fifth reset, at the right offsets.
    app.ok("fsync keep");
    assert_eq!(app.ok("tell keep"), "15");
    app.ok("close keep");
    app.ok("close reader");
    drop(app);
    assert_eq!(read(&mb.join("keep.txt")), b"hello_world0123", "keep.txt through B");

    // The stream: every byte as written, checked through B and, after dropping A's page cache,
    // through A.
    let via_b = read(&mb.join("stream.bin"));
    assert_bytes_eq("stream.bin through B", &via_b, &want);
    assert_eq!(fnv(&via_b), fnv(&want), "checksum through B");
    drop_cache(&stream_path);
    let via_a = read(&stream_path);
    assert_bytes_eq("stream.bin through A after drop_cache", &via_a, &want);
    assert_eq!(fnv(&via_a), fnv(&want), "checksum through A");

    // Every descriptor is closed: no handle may have been left open on the host by the
    // replays (a detach without --force is refused while the host counts open files).
    let mut last = String::new();
    let took = eventually(Duration::from_secs(5), || match run_cli(c, &["detach", "sb-a", "--at", ma.to_str().unwrap()], T) {
        Some(o) if o.status.success() => true,
        Some(o) => {
            last = String::from_utf8_lossy(&o.stderr).into_owned();
            false
        }
        None => false,
    });
    assert!(took.is_some(), "detach of A after every file was closed is refused (leaked handles?): {last}");
    assert!(!is_mounted(&ma), "{} still mounted after detach", ma.display());
}

// ---------------------------------------------------------------------------------------------
// 3. Exactly-once replay with the raw protocol client
// ---------------------------------------------------------------------------------------------

/// A raw mount connection with explicit request ids and sequence numbers.
struct Wire {
    raw: Raw,
    session: u64,
    next_id: u64,
}

impl Wire {
    fn open(socket: &Path, path: &str, resume: Option<u64>) -> Wire {
        let mut raw = Raw::connect(socket);
        match raw.hello(Role::Mount { path: path.to_string(), resume }) {
            Welcome::Mount { session, .. } => Wire { raw, session, next_id: 1 },
            other => panic!("mount hello (resume {resume:?}): {other:?}"),
        }
    }

    /// Sends `op` with sequence number `seq`, waits for its reply.
    fn call(&mut self, seq: u64, op: Op) -> Result<Reply, FsError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = Request { id, seq, caller: volumefs::fs::Caller::root(), op };
        proto::write_frame(&mut self.raw.s, &req).unwrap();
        loop {
            match proto::read_frame::<ServerMsg>(&mut self.raw.s).unwrap().expect("a reply") {
                ServerMsg::Reply { id: got, result } if got == id => return result,
                _ => continue,
            }
        }
    }

    fn close(self) {
        let _ = self.raw.s.shutdown(std::net::Shutdown::Both);
    }
}

fn name(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn root_names(w: &mut Wire) -> Vec<String> {
    match w.call(0, Op::ReadDir { ino: 1, fh: 0, cookie: 0, plus: false, max_entries: 1000 }) {
        Ok(Reply::Dir(entries)) => {
            let mut v: Vec<String> =
                entries.iter().map(|d| String::from_utf8_lossy(&d.name).into_owned()).filter(|n| n != "." && n != "..").collect();
            v.sort();
            v
        }
        other => panic!("readdir: {other:?}"),
    }
}

fn size_of(w: &mut Wire, ino: u64) -> u64 {
    match w.call(0, Op::GetAttr { ino }) {
        Ok(Reply::Attr(a)) => a.size,
        other => panic!("getattr {ino}: {other:?}"),
    }
}

#[test]
fn mutations_replayed_after_reconnect_are_applied_once() {
    require_fuse!();
    let c = Cluster::new();
    c.create_volume("vol", Some("64MiB"));
    let sock = c.sandbox("raw");
    let at = c.path("raw-mnt");
    c.attach("raw", "vol", &at, &[]);
    let path = at.to_str().unwrap();

    let mut w = Wire::open(&sock, path, None);
    let session = w.session;
    expect_state(&c, "raw mount hello", "raw", &at, "mounted");

    // Reconnects (the old connection closed from the guest side), resuming the session.
    let reconnect = |w: Wire| -> Wire {
        w.close();
        let w2 = Wire::open(&sock, path, Some(session));
        assert_eq!(w2.session, session, "resume must give back the same session");
        w2
    };

    // Create.
    let create = Op::Create { parent: 1, name: name("a"), mode: 0o644, umask: 0, flags: libc::O_RDWR };
    let first = w.call(10, create.clone());
    let (a_ino, a_fh) = match &first {
        Ok(Reply::Created { attr, fh }) => (attr.ino, *fh),
        other => panic!("create: {other:?}"),
    };
    let mut w = reconnect(w);
    let again = w.call(10, create.clone());
    assert_eq!(again, first, "the replayed Create (same seq) must return the recorded reply");
    match w.call(11, create.clone()) {
        Err(e) => assert_eq!(e.errno, libc::EEXIST, "a new Create of `a` (new seq): {e}"),
        Ok(r) => panic!("a new Create of an existing name succeeded: {r:?}"),
    }
    assert_eq!(root_names(&mut w), vec!["a"], "one entry after create + replay");

    // MkDir.
    let mkdir = Op::MkDir { parent: 1, name: name("d"), mode: 0o755, umask: 0 };
    let first = w.call(20, mkdir.clone());
    assert!(matches!(first, Ok(Reply::Entry(_))), "mkdir: {first:?}");
    let mut w = reconnect(w);
    assert_eq!(w.call(20, mkdir.clone()), first, "replayed MkDir");
    match w.call(21, mkdir.clone()) {
        Err(e) => assert_eq!(e.errno, libc::EEXIST, "a new MkDir of `d`: {e}"),
        Ok(r) => panic!("a new MkDir of an existing name succeeded: {r:?}"),
    }
    assert_eq!(root_names(&mut w), vec!["a", "d"]);

    // Unlink.
    let u = Op::Create { parent: 1, name: name("u"), mode: 0o644, umask: 0, flags: libc::O_RDONLY };
    let u_fh = match w.call(30, u) {
        Ok(Reply::Created { attr, fh }) => (attr.ino, fh),
        other => panic!("create u: {other:?}"),
    };
    w.call(0, Op::Release { ino: u_fh.0, fh: u_fh.1, lock_owner: None }).unwrap();
    let unlink = Op::Unlink { parent: 1, name: name("u") };
    assert_eq!(w.call(31, unlink.clone()), Ok(Reply::Empty));
    let mut w = reconnect(w);
    assert_eq!(w.call(31, unlink.clone()), Ok(Reply::Empty), "replayed Unlink must not be ENOENT");
    match w.call(32, unlink.clone()) {
        Err(e) => assert_eq!(e.errno, libc::ENOENT, "a new Unlink of `u`: {e}"),
        Ok(r) => panic!("a second Unlink (new seq) succeeded: {r:?}"),
    }
    assert_eq!(root_names(&mut w), vec!["a", "d"]);

    // Rename; this time the host closes the connection (as a snapshot restore does).
    let rename = Op::Rename { parent: 1, name: name("a"), new_parent: 1, new_name: name("b"), flags: 0 };
    assert_eq!(w.call(40, rename.clone()), Ok(Reply::Empty));
    let out = cli_ok(&c, &["sandbox", "reset-connections", "raw"], T);
    assert!(w.raw.closed(), "reset-connections left the raw connection open ({out})");
    let mut w = Wire::open(&sock, path, Some(session));
    assert_eq!(w.session, session, "resume after a host-side reset must give back the same session");
    assert_eq!(w.call(40, rename.clone()), Ok(Reply::Empty), "replayed Rename must not be ENOENT");
    match w.call(41, rename.clone()) {
        Err(e) => assert_eq!(e.errno, libc::ENOENT, "a new Rename of the old name: {e}"),
        Ok(r) => panic!("a second Rename (new seq) succeeded: {r:?}"),
    }
    assert_eq!(root_names(&mut w), vec!["b", "d"]);
    match w.call(0, Op::Lookup { parent: 1, name: name("b") }) {
        Ok(Reply::Entry(attr)) => assert_eq!(attr.ino, a_ino, "`b` is the renamed `a`"),
        other => panic!("lookup b: {other:?}"),
    }

    // A write, then an O_APPEND write (placed by the host at its end of file) and a truncate
    // after it: replaying the append must return its recorded reply without writing again (a
    // second application would grow the file back).
    assert_eq!(w.call(50, Op::Write { ino: a_ino, fh: a_fh, offset: 0, append: false, data: vec![b'x'; 100] }), Ok(Reply::Written(100)));
    assert_eq!(size_of(&mut w, a_ino), 100);
    // The guest's offset is only its kernel's guess: the host appends at 100 whatever it says.
    let append = Op::Write { ino: a_ino, fh: a_fh, offset: 7, append: true, data: vec![b'y'; 50] };
    let appended_at = |r: Result<Reply, FsError>| match r {
        Ok(Reply::Appended { written: 50, offset, attr }) => (offset, attr.size),
        other => panic!("append: {other:?}"),
    };
    assert_eq!(appended_at(w.call(51, append.clone())), (100, 150));
    assert_eq!(size_of(&mut w, a_ino), 150, "the append grew the file once");
    let mut w = reconnect(w);
    assert_eq!(appended_at(w.call(51, append.clone())), (100, 150), "replayed append answers from the record");
    assert_eq!(size_of(&mut w, a_ino), 150, "the replayed append did not grow the file again");
    let trunc = Op::SetAttr { ino: a_ino, set: SetAttr { size: Some(120), ..Default::default() } };
    assert!(matches!(w.call(52, trunc), Ok(Reply::Attr(a)) if a.size == 120));
    let mut w = reconnect(w);
    assert_eq!(appended_at(w.call(51, append.clone())), (100, 150), "replayed append after truncate");
    assert_eq!(size_of(&mut w, a_ino), 120, "a replay of an applied write must not write again");
    // A new seq of the same append does apply, at the end as it now stands.
    assert_eq!(appended_at(w.call(53, append.clone())), (120, 170));
    assert_eq!(size_of(&mut w, a_ino), 170);
    match w.call(0, Op::Read { ino: a_ino, fh: a_fh, offset: 0, size: 1000 }) {
        Ok(Reply::Data(d)) => {
            let mut want = vec![b'x'; 100];
            want.extend_from_slice(&[b'y'; 20]);
            want.extend_from_slice(&[b'y'; 50]);
            assert_bytes_eq("contents of b", &d, &want);
        }
        other => panic!("read: {other:?}"),
    }
    w.close();
}

// ---------------------------------------------------------------------------------------------
// 4. A killed agent: the lease expires, a new agent mounts again, fsynced data is intact
// ---------------------------------------------------------------------------------------------

#[test]
fn killed_agent_lease_expires_and_a_new_agent_mounts_again() {
    require_fuse!();
    let c = Cluster::with_server_args(&["--lease-ttl", "2"]);
    c.create_volume("vol", Some("64MiB"));
    let sock = c.sandbox("sb");
    let mnt = c.path("mnt");
    c.attach("sb", "vol", &mnt, &[]);
    let agent = c.start_agent(&sock, &[&mnt]);
    expect_state(&c, "agent start", "sb", &mnt, "mounted");
    let data = pattern(3 * MIB as usize + 123, 4);
    {
        let mut f = File::create(mnt.join("durable.bin")).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    fs::create_dir(mnt.join("dir")).unwrap();
    write(&mnt.join("dir/small"), b"small");
    File::open(mnt.join("dir/small")).unwrap().sync_all().unwrap();
    // Still mounted well past the TTL while the agent lives (renewals work).
    thread::sleep(Duration::from_secs(3));
    expect_state(&c, "3 s with a live agent (ttl 2 s)", "sb", &mnt, "mounted");
    // A hibernated sandbox gave its lease up on purpose: it does not expire.
    cli_ok(&c, &["sandbox", "hibernate", "sb"], T);
    expect_state(&c, "hibernate (ttl 2 s)", "sb", &mnt, "released");
    thread::sleep(Duration::from_secs(4));
    expect_state(&c, "4 s hibernated (ttl 2 s)", "sb", &mnt, "released");
    cli_ok(&c, &["sandbox", "resume", "sb"], T);
    expect_state(&c, "resume after 4 s (ttl 2 s)", "sb", &mnt, "mounted");
    assert_eq!(read(&mnt.join("dir/small")), b"small", "reading after resume");

    sigkill_agent(&sock);
    let ((_, reason), took) = wait_state(&c, "SIGKILL of the agent", "sb", &mnt, "failed", Duration::from_secs(10));
    assert!(reason.contains("lease expired"), "reason of the failed record: {reason:?}");
    eprintln!("lease expired {took:?} after the kill was observed");
    // Clean the stale mount (the harness guard reaps the dead agent and lazily unmounts).
    drop(agent);
    assert!(!is_mounted(&mnt), "stale mount left at {}", mnt.display());

    let agent = c.start_agent(&sock, &[&mnt]);
    expect_state(&c, "new agent after expiry", "sb", &mnt, "mounted");
    assert_bytes_eq("durable.bin after the kill", &read(&mnt.join("durable.bin")), &data);
    assert_eq!(read(&mnt.join("dir/small")), b"small");
    write(&mnt.join("after"), b"new agent writes");
    assert_eq!(read(&mnt.join("after")), b"new agent writes");
    agent.stop();
}

// ---------------------------------------------------------------------------------------------
// 5. Fork
// ---------------------------------------------------------------------------------------------

/// A guest agent in its own mount namespace, as a forked VM has: the child's mounts are at the
/// same paths as the parent's, so they cannot share one namespace. The test reaches the child's
/// view through `/proc/PID/root`. When the agent ends its namespace (and its mounts) go too.
struct NsAgent {
    child: Child,
    log: PathBuf,
}

impl NsAgent {
    fn start(c: &Cluster, socket: &Path, mounts: &[&Path]) -> NsAgent {
        let log = c.path(&format!("ns-agent-{}.log", socket.parent().unwrap().file_name().unwrap().to_string_lossy()));
        let file = File::create(&log).unwrap();
        // Drop the copies of every FUSE mount of the parent namespace first, then become the
        // agent (same pid).
        let script = format!(
            "awk '{{for(i=7;i<=NF;i++) if($i==\"-\"){{ if($(i+1) ~ /^fuse/) print $5; break }}}}' \
             /proc/self/mountinfo | sort -r | while read m; do umount -l \"$m\"; done; \
             exec {} agent --server unix:{}",
            GUEST_BIN,
            socket.display()
        );
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn unshare");
        let mut a = NsAgent { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let info = fs::read_to_string(format!("/proc/{}/mountinfo", a.child.id())).unwrap_or_default();
            // The copies of the parent's mounts are there from the start: wait for the agent to
            // say it mounted (its stdout) as well as for the mount table.
            let log = fs::read_to_string(&a.log).unwrap_or_default();
            let ok = log.lines().any(|l| l == "ready")
                && mounts.iter().all(|m| {
                    log.lines().any(|l| l.contains(" mounted ") && l.contains(&format!(" path={} ", m.display())))
                        && info.lines().any(|l| {
                            let f: Vec<&str> = l.split(' ').collect();
                            f.len() > 4 && Path::new(f[4]) == *m && l.contains(" - fuse")
                        })
                });
            if ok {
                return a;
            }
            if let Ok(Some(st)) = a.child.try_wait() {
                panic!("namespaced agent exited ({st}):\n{}", fs::read_to_string(&a.log).unwrap_or_default());
            }
            if Instant::now() > deadline {
                let log = fs::read_to_string(&a.log).unwrap_or_default();
                panic!("namespaced agent did not mount {mounts:?}:\n{log}\nserver log:\n{}", c.server_log());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `path` as the namespaced agent's processes see it.
    fn view(&self, path: &Path) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{}", self.child.id(), path.display()))
    }
}

impl Drop for NsAgent {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn fork_gives_the_child_the_parents_volumes() {
    require_fuse!();
    let c = Cluster::new();
    c.create_volume("vol", Some("64MiB"));
    let s1 = c.sandbox("sb1");
    let mnt = c.path("work");
    c.attach("sb1", "vol", &mnt, &[]);
    let parent = c.start_agent(&s1, &[&mnt]);
    expect_state(&c, "parent agent start", "sb1", &mnt, "mounted");
    let big = pattern(2 * MIB as usize, 55);
    write(&mnt.join("from-parent.bin"), &big);
    fs::create_dir(mnt.join("d")).unwrap();
    write(&mnt.join("d/note"), b"parent note");

    let out = cli_ok(&c, &["sandbox", "fork", "sb1", "sb2", "--json"], T);
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    let s2 = PathBuf::from(v["guest_socket"].as_str().unwrap_or_else(|| panic!("no guest_socket: {out}")));
    let (_, reason) = expect_state(&c, "fork sb1 -> sb2 (child)", "sb2", &mnt, "released");
    assert!(reason.contains("fork"), "child record reason should mention the fork: {reason:?}");
    expect_state(&c, "fork sb1 -> sb2 (parent)", "sb1", &mnt, "mounted");
    assert_eq!(attachments(&c, "sb2").len(), 1, "{:?}", attachments(&c, "sb2"));

    let child = NsAgent::start(&c, &s2, &[&mnt]);
    expect_state(&c, "child agent start", "sb2", &mnt, "mounted");
    let cm = child.view(&mnt);
    assert_bytes_eq("child reads the parent's file", &read(&cm.join("from-parent.bin")), &big);
    assert_eq!(read(&cm.join("d/note")), b"parent note");

    // Child writes, parent sees (ls + cat, close-to-open); and back.
    write(&cm.join("from-child.txt"), b"hello from the child");
    assert!(list(&mnt).contains(&"from-child.txt".to_string()), "parent ls: {:?}", list(&mnt));
    assert_eq!(read(&mnt.join("from-child.txt")), b"hello from the child");
    write(&mnt.join("d/note"), b"parent note, edited");
    assert_eq!(read(&cm.join("d/note")), b"parent note, edited");
    expect_state(&c, "after both wrote", "sb1", &mnt, "mounted");
    expect_state(&c, "after both wrote", "sb2", &mnt, "mounted");
    drop(child);
    parent.stop();
}

/// Asserts `f()` == `want` now (close-to-open: no polling); on failure says whether and when
/// the other mount caught up, to tell "stale for a TTL" from "never".
#[track_caller]
fn coherent<T: PartialEq + std::fmt::Debug>(what: &str, want: T, mut f: impl FnMut() -> T) {
    let got = f();
    if got == want {
        return;
    }
    let why = match eventually(Duration::from_secs(5), || f() == want) {
        Some(d) => format!("it caught up after {d:?}"),
        None => "it had not caught up after 5 s".to_string(),
    };
    panic!("{what}: got {got:?}, want {want:?} ({why})");
}

/// Metadata seen without an open (`stat`, a name) is promised within the attribute/entry TTL
/// (1 s; in practice the pushed invalidation lands within milliseconds), not at once: see
/// docs/semantics.md. Asserts it converges within twice the TTL.
#[track_caller]
fn coherent_within_ttl<T: PartialEq + std::fmt::Debug>(what: &str, want: T, mut f: impl FnMut() -> T) {
    if eventually(Duration::from_secs(2), || f() == want).is_none() {
        panic!("{what}: got {:?}, want {want:?} (not within 2 s)", f());
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Two sandboxes, one volume: coherent changes both ways
// ---------------------------------------------------------------------------------------------

#[test]
fn two_sandboxes_see_each_others_changes() {
    require_fuse!();
    let p = pair(&[]);
    let (ma, mb) = (&p.ma, &p.mb);
    for (x, y, tag) in [(ma, mb, "A->B"), (mb, ma, "B->A")] {
        let f = format!("f-{}", tag.replace("->", ""));
        // Write: a fresh open on the other side reads it.
        write(&x.join(&f), format!("v1 {tag}").as_bytes());
        coherent(&format!("{tag}: new file"), format!("v1 {tag}").into_bytes(), || read(&y.join(&f)));
        // Overwrite with a different size.
        write(&x.join(&f), format!("version two {tag}").as_bytes());
        coherent(&format!("{tag}: overwrite with a longer text"), format!("version two {tag}").into_bytes(), || read(&y.join(&f)));
        // Append: size growth seen by stat and read.
        {
            let mut h = OpenOptions::new().append(true).open(x.join(&f)).unwrap();
            h.write_all(b"+appended").unwrap();
        }
        let want = format!("version two {tag}+appended");
        coherent_within_ttl(&format!("{tag}: size after append"), want.len() as u64, || fs::metadata(y.join(&f)).unwrap().len());
        coherent(&format!("{tag}: contents after append"), want.clone().into_bytes(), || read(&y.join(&f)));
        // chmod.
        fs::set_permissions(x.join(&f), fs::Permissions::from_mode(0o600)).unwrap();
        coherent_within_ttl(&format!("{tag}: chmod"), 0o600, || fs::metadata(y.join(&f)).unwrap().mode() & 0o7777);
        // rename.
        let g = format!("{f}-renamed");
        fs::rename(x.join(&f), x.join(&g)).unwrap();
        coherent_within_ttl(&format!("{tag}: stat of the old name after rename"), Some(libc::ENOENT), || {
            fs::metadata(y.join(&f)).err().and_then(|e| e.raw_os_error())
        });
        coherent(&format!("{tag}: renamed file"), want.clone().into_bytes(), || read(&y.join(&g)));
        assert!(list(y).contains(&g) && !list(y).contains(&f), "{tag}: listing {:?}", list(y));
        // unlink.
        fs::remove_file(x.join(&g)).unwrap();
        coherent_within_ttl(&format!("{tag}: stat after unlink"), Some(libc::ENOENT), || {
            fs::metadata(y.join(&g)).err().and_then(|e| e.raw_os_error())
        });
        assert!(!list(y).contains(&g), "{tag}: listing after unlink {:?}", list(y));
    }
    // Growth seen by an fd the other side keeps open (fresh stat per step).
    write(&ma.join("log"), b"");
    let held = File::open(mb.join("log")).unwrap();
    let mut wa = OpenOptions::new().append(true).open(ma.join("log")).unwrap();
    for i in 1..=5u64 {
        wa.write_all(&pattern(10_000, i)).unwrap();
        wa.sync_all().unwrap();
        coherent_within_ttl(&format!("B's stat after A's append #{i}"), 10_000 * i, || fs::metadata(mb.join("log")).unwrap().len());
    }
    drop(wa);
    let mut got = Vec::new();
    (&held).read_to_end(&mut got).unwrap();
    let want: Vec<u8> = (1..=5u64).flat_map(|i| pattern(10_000, i)).collect();
    assert_bytes_eq("B reads the appended log through its old fd", &got, &want);
}

// ---------------------------------------------------------------------------------------------
// 7. Locks across sandboxes, and locks of a dead sandbox
// ---------------------------------------------------------------------------------------------

#[test]
fn locks_across_sandboxes_and_expiry_of_a_dead_holder() {
    require_fuse!();
    let mut p = pair(&["--lease-ttl", "2"]);
    write(&p.ma.join("f"), &[0u8; 1000]);
    write(&p.ma.join("g"), b"flock");

    // A's lock holder: a thread that keeps the fd open and unlocks on request.
    let clock = Arc::new(AtomicU64::new(1));
    let (to_a, a_rx) = mpsc::channel::<&'static str>();
    let (a_tx, from_a) = mpsc::channel::<(String, u64)>();
    let holder = {
        let (path, clock) = (p.ma.join("f"), clock.clone());
        thread::spawn(move || {
            let f = rw(&path);
            let r = setlk(&f, libc::F_SETLK, libc::F_WRLCK, 0, 100);
            a_tx.send((format!("locked {r:?}"), 0)).unwrap();
            for cmd in a_rx {
                match cmd {
                    "unlock" => {
                        let t = clock.fetch_add(1, Ordering::SeqCst);
                        let r = setlk(&f, libc::F_SETLK, libc::F_UNLCK, 0, 100);
                        a_tx.send((format!("unlocked {r:?}"), t)).unwrap();
                    }
                    _ => return,
                }
            }
        })
    };
    let (msg, _) = from_a.recv_timeout(Duration::from_secs(30)).expect("A's holder thread");
    assert_eq!(msg, "locked Ok(())");

    let fb = rw(&p.mb.join("f"));
    let e = errno_of("overlapping F_SETLK in B", setlk(&fb, libc::F_SETLK, libc::F_WRLCK, 50, 100));
    assert!(is_would_block(e), "overlapping F_SETLK in B: {}", errno_name(e));
    let e = errno_of("overlapping read lock in B", setlk(&fb, libc::F_SETLK, libc::F_RDLCK, 99, 1));
    assert!(is_would_block(e), "overlapping F_RDLCK in B: {}", errno_name(e));
    setlk(&fb, libc::F_SETLK, libc::F_WRLCK, 100, 100).expect("non-overlapping lock in B");
    setlk(&fb, libc::F_SETLK, libc::F_UNLCK, 100, 100).unwrap();

    // F_SETLKW in B waits for A's unlock.
    let (b_tx, from_b) = mpsc::channel::<(io::Result<()>, u64)>();
    let waiter = {
        let (path, clock) = (p.mb.join("f"), clock.clone());
        thread::spawn(move || {
            let f = rw(&path);
            let r = setlk(&f, libc::F_SETLKW, libc::F_WRLCK, 0, 100);
            let t = clock.fetch_add(1, Ordering::SeqCst);
            b_tx.send((r, t)).unwrap();
            // Keep the lock until told to go (the channel closes).
            thread::sleep(Duration::from_millis(300));
            drop(f);
        })
    };
    assert!(from_b.recv_timeout(Duration::from_millis(700)).is_err(), "F_SETLKW in B returned while A held the lock");
    to_a.send("unlock").unwrap();
    let (msg, t_unlock) = from_a.recv_timeout(Duration::from_secs(30)).expect("A unlock");
    assert_eq!(msg, "unlocked Ok(())");
    let (r, t_locked) = from_b.recv_timeout(Duration::from_secs(15)).expect("F_SETLKW in B still waiting 15 s after A unlocked");
    r.expect("F_SETLKW in B");
    assert!(t_locked > t_unlock, "B's F_SETLKW returned (t={t_locked}) before A's unlock started (t={t_unlock})");
    to_a.send("quit").unwrap();
    holder.join().unwrap();
    waiter.join().unwrap();

    // flock across sandboxes.
    let (ga, gb) = (rw(&p.ma.join("g")), rw(&p.mb.join("g")));
    let flock = |f: &File, op: i32| cvt(unsafe { libc::flock(f.as_raw_fd(), op) }).map(|_| ());
    flock(&ga, libc::LOCK_EX | libc::LOCK_NB).expect("LOCK_EX in A");
    assert_errno("flock LOCK_EX|LOCK_NB in B", flock(&gb, libc::LOCK_EX | libc::LOCK_NB), libc::EWOULDBLOCK);
    flock(&ga, libc::LOCK_UN).unwrap();
    flock(&gb, libc::LOCK_EX | libc::LOCK_NB).expect("LOCK_EX in B after A unlocked");
    flock(&gb, libc::LOCK_UN).unwrap();
    drop(gb);

    // A takes a lock, then A's agent dies: once its lease expires, B gets the lock.
    let fa = rw(&p.ma.join("f"));
    setlk(&fa, libc::F_SETLK, libc::F_WRLCK, 0, 0).expect("A locks the whole file");
    flock(&ga, libc::LOCK_EX | libc::LOCK_NB).expect("A flocks g");
    let e = errno_of("B while A holds", setlk(&fb, libc::F_SETLK, libc::F_WRLCK, 0, 0));
    assert!(is_would_block(e), "{}", errno_name(e));
    sigkill_agent(&p.sa);
    let start = Instant::now();
    let mut last = 0;
    let got = eventually(Duration::from_secs(15), || match setlk(&fb, libc::F_SETLK, libc::F_WRLCK, 0, 0) {
        Ok(()) => true,
        Err(e) => {
            last = e.raw_os_error().unwrap_or(0);
            false
        }
    });
    assert!(got.is_some(), "B never got the dead sandbox's lock in 15 s (last errno {})", errno_name(last));
    eprintln!("B got the lock {:?} after A's agent was killed", start.elapsed());
    let gb = rw(&p.mb.join("g"));
    flock(&gb, libc::LOCK_EX | libc::LOCK_NB).expect("B gets the dead sandbox's flock");
    let (_, reason) = expect_state(&p.c, "SIGKILL of A's agent", "sb-a", &p.ma, "failed");
    assert!(reason.contains("lease expired"), "{reason:?}");
    // Descriptors on the dead mount: closing them must not hang.
    drop(fa);
    drop(ga);
    p.a.take();
}

// ---------------------------------------------------------------------------------------------
// 8. SQLite from two sandboxes
// ---------------------------------------------------------------------------------------------

const SQLITE_WRITER: &str = r#"
import sqlite3, sys
path, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
db = sqlite3.connect(path, timeout=30, isolation_level=None)
assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
for i in range(n):
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO t (who, i, payload) VALUES (?, ?, ?)", (who, i, ("%s-%d;" % (who, i)) * 20))
    db.execute("COMMIT")
db.close()
print("done", who)
"#;

#[test]
fn sqlite_from_two_sandboxes() {
    require_fuse!();
    let p = pair(&[]);
    let (da, db) = (p.ma.join("app.db"), p.mb.join("app.db"));
    let py = |args: &[&str]| -> Command {
        let mut cmd = Command::new("python3");
        cmd.args(args);
        cmd
    };
    let out = py(&[
        "-c",
        "import sqlite3,sys; d=sqlite3.connect(sys.argv[1]); \
         d.execute('PRAGMA journal_mode=DELETE'); \
         d.execute('CREATE TABLE t (id INTEGER PRIMARY KEY, who TEXT, i INTEGER, payload TEXT)'); \
         d.commit(); d.close()",
        da.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "create table: {}", String::from_utf8_lossy(&out.stderr));

    let spawn = |path: &Path, who: &str| {
        py(&["-c", SQLITE_WRITER, path.to_str().unwrap(), who, "200"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    };
    let (wa, wb) = (spawn(&da, "a"), spawn(&db, "b"));
    let (oa, ob) = (wa.wait_with_output().unwrap(), wb.wait_with_output().unwrap());
    for (who, o) in [("A", &oa), ("B", &ob)] {
        assert!(
            o.status.success(),
            "sqlite writer in {who} failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let check = "import sqlite3,sys; d=sqlite3.connect(sys.argv[1], timeout=30); \
                 print(d.execute('PRAGMA integrity_check').fetchone()[0]); \
                 print(d.execute('SELECT count(*) FROM t').fetchone()[0]); \
                 print(d.execute(\"SELECT count(DISTINCT i) FROM t WHERE who='a'\").fetchone()[0]); \
                 print(d.execute(\"SELECT count(DISTINCT i) FROM t WHERE who='b'\").fetchone()[0])";
    for (side, path) in [("A", &da), ("B", &db)] {
        let o = py(&["-c", check, path.to_str().unwrap()]).output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success(), "check from {side}: {}", String::from_utf8_lossy(&o.stderr));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines, vec!["ok", "400", "200", "200"], "integrity_check, count(*), rows of a, rows of b, read from {side}");
    }
    assert!(!p.ma.join("app.db-journal").exists(), "a hot journal was left behind");
}

#[test]
fn open_files_survive_a_server_restart() {
    // The server forgets every session when it restarts; the guest reconnects, gets a fresh
    // session, opens its handles again and goes on: a descriptor opened before the restart keeps
    // its offset and its data, for reading and for writing.
    require_fuse!();
    let mut s = Single::new();
    write(&s.p("f"), b"0123456789");
    let mut app = App::start();
    app.ok(&format!("open h {} rw", s.p("f").display()));
    assert_eq!(hex_decode(&app.ok("read h 4")), b"0123");
    s.c.restart_server();
    assert_eq!(hex_decode(&app.ok("read h 100")), b"456789", "reading on through a descriptor opened before the restart");
    assert_eq!(app.ok("write h abc"), "3");
    app.ok("fsync h");
    app.ok("close h");
    assert_eq!(read(&s.p("f")), b"0123456789abc");
    write(&s.p("after"), b"after the restart");
    assert_eq!(read(&s.p("after")), b"after the restart");
}

#[test]
fn descriptors_opened_before_and_after_a_server_restart_reach_their_own_files() {
    // A restarted server numbers its handles from 1 again. The guest once handed the kernel the
    // session's numbers, so a file opened after the restart could get the number of one opened
    // before it: writes through the old descriptor then reached the new file, or failed with
    // EBADF (seen once in CI as `write h abc` in open_files_survive_a_server_restart).
    require_fuse!();
    let mut s = Single::new();
    let mut app = App::start();
    for i in 0..3 {
        write(&s.p(&format!("old{i}")), b"");
        app.ok(&format!("open old{i} {} rw", s.p(&format!("old{i}")).display()));
    }
    s.c.restart_server();
    for i in 0..3 {
        write(&s.p(&format!("new{i}")), b"");
        app.ok(&format!("open new{i} {} rw", s.p(&format!("new{i}")).display()));
    }
    for round in 0..2 {
        for name in ["old0", "old1", "old2", "new0", "new1", "new2"] {
            assert_eq!(app.ok(&format!("write {name} {name}.{round};")), (name.len() + 3).to_string(), "write through {name}");
        }
    }
    for name in ["old0", "old1", "old2", "new0", "new1", "new2"] {
        app.ok(&format!("close {name}"));
        assert_eq!(String::from_utf8_lossy(&read(&s.p(name))), format!("{name}.0;{name}.1;"), "{name} after the restart");
    }
}

/// SIGCONTs a process on drop: a frozen agent must run again before the cluster cleans up, or
/// the cleanup waits on its mount.
struct Frozen(libc::pid_t);

impl Frozen {
    fn stop(pid: libc::pid_t) -> Frozen {
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "kill -STOP {pid}");
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// A process holding a descriptor; killed (by its pid) and reaped on drop, panics included.
struct Holder(Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn server_restarts_promptly_while_an_agent_is_frozen() {
    // A host-side agent stopped with SIGSTOP (a paused VM does the same to its mounts) must not
    // hold up a server restart: the new server answers at once, and the agent reconnects with
    // its files intact when it runs again. (The server never touches a mount. What once made a
    // restart wait for the agent was a descriptor on the mount held by the test process itself:
    // the spawned server closes its inherited copy at exec, and that close is a FUSE FLUSH
    // the frozen agent cannot answer. Hence the holder process here.)
    require_fuse!();
    let mut c = Cluster::new();
    c.create_volume("vol", Some("64MiB"));
    let sock = c.sandbox("sb");
    let mnt = c.path("mnt");
    c.attach("sb", "vol", &mnt, &[]);
    let agent = c.start_agent(&sock, &[&mnt]);
    let data = pattern(MIB as usize + 17, 9);
    write(&mnt.join("before.bin"), &data);
    File::open(mnt.join("before.bin")).unwrap().sync_all().unwrap();
    // Another process holds a file open on the mount across the restart (a descriptor held
    // by this test process would be closed in every child it spawns, with a FLUSH that waits
    // for the frozen agent: see [`App`]).
    let holder = Holder(Command::new("sleep").arg("300").stdin(File::open(mnt.join("before.bin")).unwrap()).spawn().unwrap());
    let frozen = Frozen::stop(agent_pid(&sock));
    let start = Instant::now();
    c.restart_server();

    let up = start.elapsed();
    let out = run_cli(&c, &["volume", "list", "--json"], Duration::from_secs(10));
    let answered = start.elapsed();
    assert!(out.as_ref().is_some_and(|o| o.status.success()), "the new server did not answer `volume list` within 10 s: {out:?}");
    eprintln!("restart with a frozen agent: server up after {up:?}, answered after {answered:?}");
    assert!(up < Duration::from_secs(10), "the server took {up:?} to start while an agent was frozen\n{}", c.server_log());
    drop(frozen);
    let ((_, _), took) = wait_state(&c, "agent thawed after the restart", "sb", &mnt, "mounted", Duration::from_secs(30));
    eprintln!("thawed agent mounted again after {took:?}");
    assert_bytes_eq("before.bin after the restart", &read(&mnt.join("before.bin")), &data);
    write(&mnt.join("after.txt"), b"after the thaw");
    assert_eq!(read(&mnt.join("after.txt")), b"after the thaw");
    drop(holder);
    agent.stop();
}

#[test]
fn a_busy_host_is_asked_again_with_backoff() {
    // The server answers a mount hello with EAGAIN while the sandbox is at its limit of mount
    // sessions (256). The agent must keep asking (bounded backoff with jitter) and mount once
    // sessions free up, instead of failing the mount.
    require_fuse!();
    let c = Cluster::with_server_args(&["--lease-ttl", "3"]);
    c.create_volume("vol", Some("64MiB"));
    let sock = c.sandbox("sb");
    let mnt = c.path("mnt");
    c.attach("sb", "vol", &mnt, &[]);
    write_through_api(&c);
    // Fill the sandbox's session table with sessions whose guests vanish: they lapse after the
    // lease TTL.
    let path = mnt.to_str().unwrap().to_string();
    let mut n = 0;
    loop {
        let mut raw = Raw::connect(&sock);
        match raw.hello(Role::Mount { path: path.clone(), resume: None }) {
            Welcome::Mount { .. } => n += 1,
            Welcome::Refused(e) if e.errno == libc::EAGAIN => break,
            other => panic!("mount hello {n}: {other:?}"),
        }
        assert!(n <= 4096, "no session limit was hit");
    }
    let full = Instant::now();
    eprintln!("sandbox at its session limit after {n} sessions");
    let agent = c.start_agent(&sock, &[&mnt]);
    let took = full.elapsed();
    eprintln!("agent mounted {took:?} after the limit was hit");
    expect_state(&c, "agent start on a busy host", "sb", &mnt, "mounted");
    assert_eq!(read(&mnt.join("hello.txt")), b"through the API\n");
    write(&mnt.join("after.txt"), b"mounted after backoff");
    assert_eq!(read(&mnt.join("after.txt")), b"mounted after backoff");
    agent.stop();
}

fn write_through_api(c: &Cluster) {
    let src = c.path("hello-src.txt");
    fs::write(&src, b"through the API\n").unwrap();
    cli_ok(c, &["volume", "write", "vol", "/hello.txt", "--from", src.to_str().unwrap()], T);
}

#[test]
fn fork_with_the_child_agent_on_the_same_host_under_a_mount_root() {
    // A forked sandbox's agent on the parent's host (not in a VM, not in its own namespace):
    // the attachments keep their paths, `--mount-root` puts the child's mounts under a
    // directory of its own so they do not collide with the parent's.
    require_fuse!();
    let c = Cluster::new();
    c.create_volume("vol", Some("64MiB"));
    let s1 = c.sandbox("sb1");
    let mnt = c.path("work");
    c.attach("sb1", "vol", &mnt, &[]);
    let parent = c.start_agent(&s1, &[&mnt]);
    write(&mnt.join("from-parent.txt"), b"parent data");

    let out = cli_ok(&c, &["sandbox", "fork", "sb1", "sb2", "--json"], T);
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    let s2 = PathBuf::from(v["guest_socket"].as_str().unwrap_or_else(|| panic!("no guest_socket: {out}")));
    expect_state(&c, "fork sb1 -> sb2 (child)", "sb2", &mnt, "released");

    let root = c.path("child-root");
    let cm = root.join(mnt.strip_prefix("/").unwrap());
    let child = c.start_agent_with(&s2, &[&cm], &["--mount-root", root.to_str().unwrap()]);
    expect_state(&c, "same-host child agent start", "sb2", &mnt, "mounted");
    expect_state(&c, "same-host child agent start (parent)", "sb1", &mnt, "mounted");
    assert!(is_mounted(&mnt) && is_mounted(&cm), "both mounts should be live");
    assert_eq!(read(&cm.join("from-parent.txt")), b"parent data");
    write(&cm.join("from-child.txt"), b"child data");
    assert_eq!(read(&mnt.join("from-child.txt")), b"child data");

    // Runtime commands name the attachment's path; the child acts on its own mount only.
    let extra = c.path("extra");
    cli_ok(&c, &["attach", "sb2", "vol", "--at", extra.to_str().unwrap()], T);
    let cextra = root.join(extra.strip_prefix("/").unwrap());
    expect_state(&c, "runtime attach in the child", "sb2", &extra, "mounted");
    assert!(is_mounted(&cextra) && !is_mounted(&extra), "the child's runtime attach belongs under its mount root");
    assert_eq!(read(&cextra.join("from-child.txt")), b"child data");
    cli_ok(&c, &["detach", "sb2", "--at", extra.to_str().unwrap()], T);
    assert!(!is_mounted(&cextra));
    // A guest umount in the child is reported for the child only.
    sh(&format!("umount {}", cm.display()));
    wait_state(&c, "umount in the child", "sb2", &mnt, "released", Duration::from_secs(20));
    expect_state(&c, "umount in the child (parent)", "sb1", &mnt, "mounted");
    assert_eq!(read(&mnt.join("from-child.txt")), b"child data");
    child.stop();
    parent.stop();
}

#[test]
fn an_unmounted_report_ends_only_its_own_session() {
    // `Op::Unmounted` from a raw guest: the host answers, closes that connection, records the
    // attachment released, and drops the session (a resume naming it gets a fresh one). Another
    // attachment's session of the same sandbox keeps working.
    require_fuse!();
    let c = Cluster::new();
    c.create_volume("vol", Some("16MiB"));
    let sock = c.sandbox("sb");
    let (pa, pb) = (c.path("a"), c.path("b"));
    c.attach("sb", "vol", &pa, &[]);
    c.attach("sb", "vol", &pb, &[]);
    let (sa, sb) = (pa.to_str().unwrap(), pb.to_str().unwrap());
    let mut a = Wire::open(&sock, sa, None);
    let mut b = Wire::open(&sock, sb, None);
    a.call(1, Op::MkDir { parent: 1, name: name("made-by-a"), mode: 0o755, umask: 0 }).expect("mkdir through a");
    expect_state(&c, "two raw sessions", "sb", &pa, "mounted");
    assert_eq!(a.call(2, Op::Unmounted), Ok(Reply::Empty));
    // The host closes the connection after answering.
    a.raw.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    match proto::read_frame::<ServerMsg>(&mut a.raw.s) {
        Ok(None) => {}
        Err(e) if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::TimedOut => {}
        other => panic!("the connection should be closed after Unmounted: {other:?}"),
    }
    let (st, reason) = expect_state(&c, "Unmounted from a raw guest", "sb", &pa, "released");
    assert!(reason.contains("unmounted in the guest"), "{st} {reason:?}");
    expect_state(&c, "Unmounted from a raw guest (other attachment)", "sb", &pb, "mounted");
    assert!(root_names(&mut b).contains(&"made-by-a".to_string()), "the other session still serves");
    // The ended session is gone: naming it again gives a fresh session.
    let old = a.session;
    let again = Wire::open(&sock, sa, Some(old));
    assert_ne!(again.session, old, "a resume of an ended session must not get it back");
    expect_state(&c, "new session after Unmounted", "sb", &pa, "mounted");
    again.close();
    b.close();
}

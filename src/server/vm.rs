//! MicroVMs for sandboxes: the development and test stand-in for a platform's VMM.
//!
//! `volumefs sandbox run` boots the guest image (`vm-images/build.sh`) under QEMU's `microvm`
//! machine with a vhost-user vsock device served by `vhost-device-vsock` in hybrid mode, whose
//! unix socket is the sandbox's `vsock` file: the guest's connections to the host's port 1024
//! arrive on the sandbox's guest listener (`vsock_1024`), and the host reaches the agent's
//! control port through `vsock` + `CONNECT 1025`. The server owns both processes: they die with
//! it (parent-death signal) and are stopped with the sandbox.
//!
//! QEMU runs with the software CPU (TCG) unless `VOLUMEFS_ACCEL=kvm`: on the machines this is
//! developed on, /dev/kvm is a PVM host on which stock kernels do not boot.

use crate::fs::{FsError, FsResult};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Vm {
    qemu: Child,
    backend: Child,
    pub console: PathBuf,
    qmp: PathBuf,
    uds: PathBuf,
    pub paused: bool,
}

fn vm_err(msg: impl Into<String>) -> FsError {
    FsError::new(libc::EIO, msg.into())
}

/// Finds the guest image: `--images`, `$VOLUMEFS_IMAGES`, or `vm-images/build` above the binary.
pub fn find_images(configured: Option<&Path>) -> FsResult<PathBuf> {
    let mut candidates: Vec<PathBuf> = configured.map(Path::to_path_buf).into_iter().collect();
    if let Ok(p) = std::env::var("VOLUMEFS_IMAGES") {
        candidates.push(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        candidates.extend(exe.ancestors().skip(1).map(|d| d.join("vm-images/build")));
    }
    candidates
        .into_iter()
        .find(|d| d.join("initramfs.gz").exists())
        .ok_or_else(|| vm_err("no guest image found: run vm-images/build.sh (or pass --images DIR to the server)"))
}

fn kernel(images: &Path) -> FsResult<PathBuf> {
    let named = std::fs::read_to_string(images.join("kernel.txt"))
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("kernel=").map(str::to_string)));
    named
        .map(|n| images.join(n))
        .into_iter()
        .chain([images.join("vmlinux"), images.join("vmlinuz")])
        .find(|p| p.exists())
        .ok_or_else(|| vm_err(format!("no kernel in {}: run vm-images/build.sh", images.display())))
}

fn find_program(name: &str, env: &str) -> FsResult<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Ok(PathBuf::from(p));
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    if let Some(home) =
        std::env::var_os("CARGO_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
    {
        dirs.push(home.join("bin"));
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| vm_err(format!("{name} not found (set {env}, or install it: vm-images/build.sh does)")))
}

fn tsc_khz() -> u64 {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("cpu MHz").and_then(|r| r.split(':').nth(1)).and_then(|v| v.trim().parse::<f64>().ok()))
        .map(|mhz| (mhz * 1000.0) as u64)
        .unwrap_or(2_000_000)
}

/// Children die with the server.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl in the child between fork and exec; async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

impl Vm {
    /// Starts the vsock backend and QEMU for the sandbox whose files live in `dir`.
    pub fn boot(dir: &Path, images: &Path, memory: &str) -> FsResult<Vm> {
        let kernel = kernel(images)?;
        let initrd = images.join("initramfs.gz");
        let qemu_bin = find_program("qemu-system-x86_64", "VOLUMEFS_QEMU")?;
        let backend_bin = find_program("vhost-device-vsock", "VOLUMEFS_VHOST_VSOCK")?;
        let uds = dir.join("vsock");
        let vhost = dir.join("vhost-vsock.sock");
        let console = dir.join("console.log");
        let qmp = dir.join("qmp.sock");
        for stale in [&uds, &vhost, &qmp] {
            let _ = std::fs::remove_file(stale);
        }
        let backend_log = std::fs::File::create(dir.join("vhost-vsock.log")).map_err(FsError::from)?;
        let mut cmd = Command::new(&backend_bin);
        cmd.arg("--guest-cid=3")
            .arg(format!("--socket={}", vhost.display()))
            .arg(format!("--uds-path={}", uds.display()))
            .stdin(Stdio::null())
            .stdout(backend_log.try_clone().map_err(FsError::from)?)
            .stderr(backend_log);
        die_with_parent(&mut cmd);
        let mut backend = cmd.spawn().map_err(|e| vm_err(format!("cannot start {}: {e}", backend_bin.display())))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !vhost.exists() {
            if Instant::now() > deadline || backend.try_wait().ok().flatten().is_some() {
                let _ = backend.kill();
                let _ = backend.wait();
                let log = std::fs::read_to_string(dir.join("vhost-vsock.log")).unwrap_or_default();
                return Err(vm_err(format!("vhost-device-vsock did not start: {log}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let memory = if memory.chars().all(|c| c.is_ascii_digit()) { format!("{memory}M") } else { memory.to_string() };
        let accel = std::env::var("VOLUMEFS_ACCEL").unwrap_or_else(|_| "tcg".into());
        let cmdline = format!("console=ttyS0 panic=-1 quiet tsc_early_khz={}", tsc_khz());
        let mut cmd = Command::new(&qemu_bin);
        cmd.args(["-M", "microvm,memory-backend=mem,rtc=on", "-accel", &accel, "-cpu", "qemu64", "-smp", "1", "-m", &memory])
            .arg("-object")
            .arg(format!("memory-backend-memfd,id=mem,size={memory},share=on"))
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &cmdline, "-nographic", "-no-reboot", "-nodefaults", "-no-user-config"])
            .arg("-chardev")
            .arg(format!("socket,id=vsock0,path={}", vhost.display()))
            .args(["-device", "vhost-user-vsock-device,chardev=vsock0", "-monitor", "none"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu.log")).map_err(FsError::from)?);
        die_with_parent(&mut cmd);
        let qemu = match cmd.spawn() {
            Ok(q) => q,
            Err(e) => {
                let _ = backend.kill();
                let _ = backend.wait();
                return Err(vm_err(format!("cannot start {}: {e}", qemu_bin.display())));
            }
        };
        Ok(Vm { qemu, backend, console, qmp, uds, paused: false })
    }

    /// Whether QEMU is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.qemu.try_wait(), Ok(None))
    }

    /// The last lines of the guest console, for error messages.
    pub fn console_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Freezes the VM by stopping the QEMU process (SIGSTOP), not with QMP `stop`: QMP stops the
    /// vhost-user vsock device (GET_VRING_BASE), and after `cont` the guest's vsock sometimes
    /// never answers again (a descriptor in flight at the stop is lost and the rings' event
    /// indices no longer agree; measured here: 6 of 8 hibernate/resume cycles wedged with
    /// vhost-device-vsock 0.3.0). A stopped process keeps the device and its rings exactly as
    /// they were; the backend may queue into shared memory meanwhile, and QEMU delivers it on
    /// `cont`.
    pub fn pause(&mut self) -> FsResult<()> {
        self.signal(libc::SIGSTOP)?;
        self.paused = true;
        Ok(())
    }

    pub fn cont(&mut self) -> FsResult<()> {
        self.signal(libc::SIGCONT)?;
        self.paused = false;
        Ok(())
    }

    fn signal(&self, sig: libc::c_int) -> FsResult<()> {
        // SAFETY: kill(2) on the QEMU child this server started and has not reaped.
        if unsafe { libc::kill(self.qemu.id() as libc::pid_t, sig) } != 0 {
            return Err(vm_err(format!("cannot signal QEMU: {}", std::io::Error::last_os_error())));
        }
        Ok(())
    }

    /// Waits up to `grace` for the guest to power off, then kills what is left.
    pub fn stop(mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while self.running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        let _ = self.backend.kill();
        let _ = self.backend.wait();
        for f in [&self.uds, &self.qmp] {
            let _ = std::fs::remove_file(f);
        }
    }
}

//! Tier 3: real microVMs. The server boots the guest image (`vm-images/build.sh`) under QEMU
//! with the software CPU; the agent inside mounts volumes over virtio-vsock through
//! vhost-device-vsock's hybrid socket; commands run in the guest through `sandbox exec`.
//!
//! Needs QEMU, vhost-device-vsock and a built image. `scripts/test.sh` installs and builds them
//! and sets `VOLUMEFS_REQUIRE_VM=1`, which turns a missing piece into a failure; elsewhere the
//! tests print `SKIPPED`. VM tests run one at a time (a TCG guest wants a whole core).

use crate::harness::*;
use std::path::Path;
use std::process::Output;
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ONE_VM_AT_A_TIME: Mutex<()> = Mutex::new(());

fn vm_available() -> bool {
    if !fuse_available() {
        return false;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let image = root.join("vm-images/build/initramfs.gz").exists();
    let on_path = |p: &str| {
        std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(p).is_file()))
            || std::env::var_os("HOME").is_some_and(|h| Path::new(&h).join(".cargo/bin").join(p).is_file())
    };
    let ok = image && on_path("qemu-system-x86_64") && on_path("vhost-device-vsock");
    if !ok {
        let why = format!(
            "image built: {image}, qemu-system-x86_64: {}, vhost-device-vsock: {} (run vm-images/build.sh)",
            on_path("qemu-system-x86_64"),
            on_path("vhost-device-vsock")
        );
        if std::env::var("VOLUMEFS_REQUIRE_VM").as_deref() == Ok("1") {
            panic!("VM tests required but cannot run: {why}");
        }
        eprintln!("*** SKIPPED: VM test ({why})");
    }
    ok
}

macro_rules! require_vm {
    () => {
        if !vm_available() {
            return;
        }
        let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    };
}

/// `sandbox exec SB -- sh -c SCRIPT`
fn guest(c: &Cluster, sb: &str, script: &str) -> Output {
    c.cli_output(&["sandbox", "exec", sb, "--", "sh", "-c", script])
}

fn guest_ok(c: &Cluster, sb: &str, script: &str) -> String {
    let out = guest(c, sb, script);
    assert!(
        out.status.success(),
        "in the guest: {script}\nexit: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn states(c: &Cluster, sb: &str) -> Vec<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(&c.cli(&["sandbox", "attachments", sb, "--json"])).unwrap();
    v.as_array().unwrap().iter().map(|a| (a["path"].as_str().unwrap().to_string(), a["state"].as_str().unwrap().to_string())).collect()
}

fn api_read(c: &Cluster, vol: &str, path: &str) -> Vec<u8> {
    let out = c.cli_output(&["file", "read", vol, path]);
    assert!(out.status.success(), "file read {vol} {path}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn api_write(c: &Cluster, vol: &str, path: &str, data: &[u8]) {
    use std::io::Write;
    let mut child = std::process::Command::new(SERVER_BIN)
        .args(["file", "write", vol, path])
        .env("VOLUMEFS_SERVER", format!("http://{}", c.addr))
        .env("VOLUMEFS_TOKEN", &c.token)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    assert!(child.wait().unwrap().success(), "file write {vol} {path}");
}

/// Boots `sb` with `volumes`, asserting every attachment is mounted; stops it on drop.
struct Running<'a> {
    c: &'a Cluster,
    sb: String,
}

impl<'a> Running<'a> {
    fn boot(c: &'a Cluster, sb: &str, volumes: &[&str]) -> Running<'a> {
        let mut args = vec!["sandbox", "run", sb];
        for v in volumes {
            args.extend(["--volume", v]);
        }
        let started = Instant::now();
        let out = c.cli_output(&args);
        let r = Running { c, sb: sb.to_string() };
        assert!(
            out.status.success(),
            "sandbox run failed:\n{}\n{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            c.server_log()
        );
        eprintln!("vm: sandbox {sb} booted with {} volume(s) in {:?}", volumes.len(), started.elapsed());
        for (path, state) in states(c, sb) {
            assert_eq!(state, "mounted", "{path} after boot");
        }
        r
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let out = self.c.cli_output(&["sandbox", "stop", &self.sb]);
        if !out.status.success() && !std::thread::panicking() {
            panic!("sandbox stop: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

#[test]
fn vm_boot_mounts_rw_and_ro_subpath_volumes() {
    require_vm!();
    let c = Cluster::new();
    c.create_volume("data", Some("64MiB"));
    c.create_volume("docs", None);
    api_write(&c, "docs", "/shared/readme.txt", b"hello from the host\n");
    api_write(&c, "docs", "/secret.txt", b"not for the guest\n");
    let _vm = Running::boot(&c, "sb", &["data:/mnt/data", "docs:/mnt/docs:ro:subpath=/shared"]);

    // ls, cat, write, mv, rm inside the guest.
    let listing = guest_ok(&c, "sb", "ls -la /mnt/docs");
    assert!(listing.contains("readme.txt") && !listing.contains("secret.txt"), "{listing}");
    assert_eq!(guest_ok(&c, "sb", "cat /mnt/docs/readme.txt"), "hello from the host\n");
    guest_ok(&c, "sb", "echo written in the guest > /mnt/data/a.txt && mkdir /mnt/data/d && mv /mnt/data/a.txt /mnt/data/d/b.txt");
    assert_eq!(guest_ok(&c, "sb", "cat /mnt/data/d/b.txt"), "written in the guest\n");
    guest_ok(&c, "sb", "echo temp > /mnt/data/t && rm /mnt/data/t && test ! -e /mnt/data/t");

    // The read-only mount refuses writes with EROFS.
    let out = guest(&c, "sb", "echo x > /mnt/docs/new.txt");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Read-only file system"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = guest(&c, "sb", "rm /mnt/docs/readme.txt");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Read-only"));

    // Guest → HTTP API and HTTP API → guest.
    assert_eq!(api_read(&c, "data", "/d/b.txt"), b"written in the guest\n");
    api_write(&c, "data", "/from-host.txt", b"written through the API\n");
    assert_eq!(guest_ok(&c, "sb", "cat /mnt/data/from-host.txt"), "written through the API\n");
    api_write(&c, "data", "/from-host.txt", b"replaced through the API\n");
    assert_eq!(guest_ok(&c, "sb", "cat /mnt/data/from-host.txt"), "replaced through the API\n");

    // A transcript for the record.
    eprintln!("vm: sandbox exec sb -- ls -la /mnt/data:\n{}", guest_ok(&c, "sb", "ls -la /mnt/data"));

    // Stopped and run again with the same volumes: the attachments are reused, nothing is lost;
    // a different volume at a taken path is refused with a message that says what to do.
    drop(_vm);
    let err = c.cli_fail(&["sandbox", "run", "sb", "--volume", "docs:/mnt/data"]);
    assert!(err.contains("already has volume `data` attached at /mnt/data") && err.contains("detach it first"), "{err}");
    let _vm = Running::boot(&c, "sb", &["data:/mnt/data", "docs:/mnt/docs:ro:subpath=/shared"]);
    assert_eq!(guest_ok(&c, "sb", "cat /mnt/data/d/b.txt"), "written in the guest\n");
}

#[test]
fn vm_runtime_attach_of_a_third_volume() {
    require_vm!();
    let c = Cluster::new();
    for v in ["one", "two", "three"] {
        c.create_volume(v, None);
    }
    api_write(&c, "three", "/hello.txt", b"third volume\n");
    let _vm = Running::boot(&c, "sb", &["one:/mnt/one", "two:/mnt/two:ro"]);
    let out = c.cli(&["attach", "sb", "three", "--at", "/mnt/three"]);
    assert!(out.contains("mounted"), "{out}");
    assert_eq!(guest_ok(&c, "sb", "cat /mnt/three/hello.txt"), "third volume\n");
    guest_ok(&c, "sb", "echo more > /mnt/three/more.txt");
    assert_eq!(api_read(&c, "three", "/more.txt"), b"more\n");
    // Attaching at a path that is already a mount fails with a reason, and says so.
    c.create_volume("four", None);
    let err = c.cli_fail(&["attach", "sb", "four", "--at", "/mnt/one"]);
    assert!(err.contains("/mnt/one"), "{err}");
    // Detach unmounts in the guest.
    c.cli(&["detach", "sb", "--at", "/mnt/three"]);
    let mounts = guest_ok(&c, "sb", "cat /proc/mounts");
    assert!(!mounts.contains("/mnt/three"), "{mounts}");
}

#[test]
fn vm_hibernate_and_resume_with_a_file_held_open() {
    require_vm!();
    let c = Cluster::new();
    c.create_volume("data", None);
    let _vm = Running::boot(&c, "sb", &["data:/mnt/data"]);
    // A guest process holds a file open across the hibernation and keeps writing to it.
    guest_ok(
        &c,
        "sb",
        "(exec 3>/mnt/data/held; echo before >&3; while [ ! -e /tmp/go ]; do sleep 0.1; done; echo after >&3; exec 3>&-; touch /tmp/done) \
         >/dev/null 2>&1 </dev/null &",
    );
    c.cli(&["sandbox", "hibernate", "sb"]);
    assert!(states(&c, "sb").iter().all(|(_, s)| s == "released"), "{:?}", states(&c, "sb"));
    std::thread::sleep(Duration::from_secs(2));
    c.cli(&["sandbox", "resume", "sb"]);
    assert!(states(&c, "sb").iter().all(|(_, s)| s == "mounted"), "{:?}", states(&c, "sb"));
    guest_ok(&c, "sb", "touch /tmp/go; i=0; while [ ! -e /tmp/done ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; test -e /tmp/done");
    assert_eq!(guest_ok(&c, "sb", "cat /mnt/data/held"), "before\nafter\n");
    assert_eq!(api_read(&c, "data", "/held"), b"before\nafter\n");
}

#[test]
fn vm_connection_resets_while_the_guest_streams_writes() {
    require_vm!();
    let c = Cluster::new();
    c.create_volume("data", None);
    let _vm = Running::boot(&c, "sb", &["data:/mnt/data"]);
    // The guest writes 400 blocks of numbers with an fsync-like sync every 50 blocks while
    // the host cuts its connections again and again.
    let script = "i=0; while [ $i -lt 400 ]; do seq $((i*1000)) $((i*1000+999)); i=$((i+1)); \
                  if [ $((i % 50)) = 0 ]; then sync; fi; done > /mnt/data/stream && sync && md5sum /mnt/data/stream";
    let writer = {
        let (addr, token) = (c.addr.clone(), c.token.clone());
        let script = script.to_string();
        std::thread::spawn(move || {
            std::process::Command::new(SERVER_BIN)
                .args(["sandbox", "exec", "sb", "--", "sh", "-c", &script])
                .env("VOLUMEFS_SERVER", format!("http://{addr}"))
                .env("VOLUMEFS_TOKEN", token)
                .output()
                .unwrap()
        })
    };
    let mut resets = 0;
    while !writer.is_finished() && resets < 20 {
        std::thread::sleep(Duration::from_millis(150));
        c.cli(&["sandbox", "reset-connections", "sb"]);
        resets += 1;
    }
    let out = writer.join().unwrap();
    assert!(out.status.success(), "guest writer failed: {}", String::from_utf8_lossy(&out.stderr));
    let mut expected = String::new();
    for i in 0..400u64 {
        for n in i * 1000..i * 1000 + 1000 {
            expected.push_str(&n.to_string());
            expected.push('\n');
        }
    }
    let got = api_read(&c, "data", "/stream");
    assert_eq!(got.len(), expected.len(), "stream length after {resets} resets");
    assert!(got == expected.as_bytes(), "stream contents differ after {resets} resets");
    eprintln!("vm: {resets} connection resets during the stream; guest md5: {}", String::from_utf8_lossy(&out.stdout).trim());
    assert!(resets >= 3, "the writer finished before the resets could interfere ({resets})");
}

/// Two microVMs append to one file of a shared volume at once, with no lock: the host places
/// each O_APPEND write at its end of file, so every record is there exactly once.
#[test]
fn vm_appends_from_two_microvms_keep_every_record() {
    use crate::appends::{check_records, record, Locking};
    require_vm!();
    let c = Cluster::new();
    c.create_volume("data", None);
    api_write(&c, "data", "/log", b"");
    let _a = Running::boot(&c, "sb1", &["data:/mnt/data"]);
    let _b = Running::boot(&c, "sb2", &["data:/mnt/data"]);
    const N: usize = 150;
    // The shell's `>>` opens with O_APPEND; printf writes each 40-byte record in one write.
    let pad = ".".repeat(39 - format!("w00 r0000 {:?}", Locking::NoLock).len());
    assert_eq!(record(1, 7, Locking::NoLock), format!("w01 r0007 NoLock{pad}\n").into_bytes(), "the guest's record format");
    let writers: Vec<_> = [(0, "sb1"), (1, "sb2")]
        .into_iter()
        .map(|(w, sb)| {
            let script =
                format!("i=0; while [ $i -lt {N} ]; do printf 'w{w:02} r%04d NoLock{pad}\\n' $i >> /mnt/data/log; i=$((i+1)); done");
            let (addr, token) = (c.addr.clone(), c.token.clone());
            std::thread::spawn(move || {
                std::process::Command::new(SERVER_BIN)
                    .args(["sandbox", "exec", sb, "--", "sh", "-c", &script])
                    .env("VOLUMEFS_SERVER", format!("http://{addr}"))
                    .env("VOLUMEFS_TOKEN", token)
                    .output()
                    .unwrap()
            })
        })
        .collect();
    for w in writers {
        let out = w.join().unwrap();
        assert!(out.status.success(), "guest appender failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let n = check_records("appends from two microVMs", &api_read(&c, "data", "/log"), 2, N, Locking::NoLock);
    let inside = guest_ok(&c, "sb2", "cat /mnt/data/log");
    check_records("read back inside sb2", inside.as_bytes(), 2, N, Locking::NoLock);
    eprintln!("vm: two microVMs appended {n} records, each exactly once");
}

/// Inside a microVM: preallocation charges the volume and shows in `st_blocks`; a sparse file
/// costs what it stores; preallocating past the cap is EDQUOT.
#[test]
fn vm_fallocate_and_sparse_files() {
    require_vm!();
    let c = Cluster::new();
    c.create_volume("data", Some("64MiB"));
    let _vm = Running::boot(&c, "sb", &["data:/mnt/data"]);
    guest_ok(&c, "sb", "fallocate -l 4194304 /mnt/data/pre");
    assert_eq!(guest_ok(&c, "sb", "stat -c '%s %b' /mnt/data/pre"), "4194304 8192\n");
    assert!(eventually(Duration::from_secs(3), || c.volume_used("data") == 4 << 20).is_some(), "used {}", c.volume_used("data"));
    guest_ok(&c, "sb", "dd if=/dev/zero of=/mnt/data/sparse bs=1 count=1 seek=1073741824 2>/dev/null");
    assert_eq!(guest_ok(&c, "sb", "stat -c '%s %b' /mnt/data/sparse"), "1073741825 1\n");
    assert_eq!(c.volume_used("data"), (4 << 20) + 1, "a sparse GiB costs its one byte");
    let out = guest(&c, "sb", "fallocate -l 134217728 /mnt/data/too-big");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("quota"), "{out:?}");
}

/// Inside a microVM: a POSIX ACL (set through another sandbox's mount with setfacl) lets a
/// named user read a 0600 file it does not own and no other user; the guest kernel enforces it
/// and so does the host.
#[test]
fn vm_acl_grants_a_named_user_and_no_one_else() {
    require_vm!();
    let c = Cluster::new();
    c.create_volume("data", Some("64MiB"));
    // A sandbox on this host with the volume mounted, to run setfacl (not in the VM image).
    let host_sock = c.sandbox("host");
    let host_mnt = c.path("host-mnt");
    c.attach("host", "data", &host_mnt, &[]);
    let _agent = c.start_agent(&host_sock, &[&host_mnt]);
    std::fs::write(host_mnt.join("f"), b"for 1001 only\n").unwrap();
    sh(&format!("chown 1000:1000 '{0}' && chmod 0600 '{0}' && setfacl -m u:1001:r '{0}'", host_mnt.join("f").display()));
    let _vm = Running::boot(&c, "sb", &["data:/mnt/data"]);
    assert_eq!(guest_ok(&c, "sb", "su -s /bin/sh u1001 -c 'cat /mnt/data/f'"), "for 1001 only\n");
    let out = guest(&c, "sb", "su -s /bin/sh u1002 -c 'cat /mnt/data/f'");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "{out:?}");
    let out = guest(&c, "sb", "su -s /bin/sh u1001 -c 'echo x >> /mnt/data/f'");
    assert!(!out.status.success(), "the ACL grants reading only: {out:?}");
    // The mode's group bits show the ACL's mask, as on any Linux filesystem.
    assert_eq!(guest_ok(&c, "sb", "stat -c %A /mnt/data/f"), "-rw-r-----\n");
}

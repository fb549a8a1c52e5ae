//! Volume-level behaviour: statfs, durability across agent restarts, the byte cap (quota), and
//! the volume/sandbox/attach CLI.

use crate::harness::*;
use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::IntoRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[test]
fn statfs_reports_cap_and_free_space() {
    require_fuse!();
    let s = Single::with_cap(Some("64MiB"));
    let st = statvfs(&s.mnt).unwrap();
    let frsize = st.f_frsize as u64;
    assert!(frsize > 0, "f_frsize is 0");
    let total = st.f_blocks as u64 * frsize;
    assert!(
        total.abs_diff(64 * MIB) <= frsize,
        "statfs total {total} (f_blocks {} * f_frsize {frsize}) is not the 64 MiB cap",
        st.f_blocks
    );
    let free0 = st.f_bfree as u64 * frsize;
    let avail0 = st.f_bavail as u64 * frsize;
    assert!(free0 <= total && avail0 <= free0, "free {free0} avail {avail0} total {total}");
    assert!(free0 > 60 * MIB, "an empty 64 MiB volume has only {free0} bytes free");

    let mut f = fs::File::create(s.p("one-mib")).unwrap();
    f.write_all(&pattern(MIB as usize, 1)).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let st = statvfs(&s.mnt).unwrap();
    assert_eq!(st.f_blocks as u64 * st.f_frsize as u64, total, "total changed after a write");
    let free1 = st.f_bfree as u64 * st.f_frsize as u64;
    let avail1 = st.f_bavail as u64 * st.f_frsize as u64;
    let dropped = free0.saturating_sub(free1);
    assert!(
        dropped + frsize >= MIB && dropped <= MIB + 256 * KIB,
        "free space went from {free0} to {free1} (dropped {dropped}) after writing 1 MiB"
    );
    let avail_dropped = avail0.saturating_sub(avail1);
    assert!(
        avail_dropped + frsize >= MIB && avail_dropped <= MIB + 256 * KIB,
        "available space went from {avail0} to {avail1} after writing 1 MiB"
    );
    // statfs through any path of the mount reports the same volume.
    fs::create_dir(s.p("d")).unwrap();
    let sub = statvfs(&s.p("d")).unwrap();
    assert_eq!(sub.f_blocks, st.f_blocks);
}

#[test]
fn default_cap_is_2gib_in_statfs() {
    require_fuse!();
    let s = Single::new();
    let st = statvfs(&s.mnt).unwrap();
    let total = st.f_blocks as u64 * st.f_frsize as u64;
    assert!(total.abs_diff(2 * GIB) <= st.f_frsize as u64, "statfs total {total}, want 2 GiB");
    assert_eq!(s.c.volume("vol").unwrap().cap, 2 * GIB);
}

#[test]
fn fsync_fdatasync_and_data_survives_agent_restart() {
    require_fuse!();
    let mut s = Single::new();
    let data = pattern(3 * MIB as usize + 123, 5);
    let mut f = fs::File::create(s.p("durable.bin")).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().expect("fsync");
    f.write_all(b"more").unwrap();
    f.sync_data().expect("fdatasync");
    drop(f);
    fs::create_dir(s.p("dir")).unwrap();
    write(&s.p("dir/closed-not-fsynced"), b"closed before SIGTERM");
    fs::File::open(s.p("dir")).unwrap().sync_all().expect("fsync of a directory");

    s.restart_agent();

    let mut want = data;
    want.extend_from_slice(b"more");
    assert_bytes_eq("durable.bin after agent restart", &read(&s.p("durable.bin")), &want);
    assert_eq!(read(&s.p("dir/closed-not-fsynced")), b"closed before SIGTERM");
    assert_eq!(list(&s.mnt), ["dir", "durable.bin"]);
}

#[test]
fn inode_numbers_stable_across_agent_restart() {
    require_fuse!();
    let mut s = Single::new();
    fs::create_dir(s.p("d")).unwrap();
    write(&s.p("d/f"), b"f");
    std::os::unix::fs::symlink("d/f", s.p("l")).unwrap();
    let names = ["d", "d/f", "l"];
    let before: Vec<u64> = names.iter().map(|n| fs::symlink_metadata(s.p(n)).unwrap().ino()).collect();
    s.restart_agent();
    let after: Vec<u64> = names.iter().map(|n| fs::symlink_metadata(s.p(n)).unwrap().ino()).collect();
    assert_eq!(before, after, "inode numbers of {names:?} changed across an agent restart");
}

/// Where a write to a full volume failed: "write at OFFSET", "fsync" or "close".
type Stage = String;

/// Creates `path` and writes `len` bytes of pattern in 1 MiB chunks, then fsync, then close;
/// returns the first failure and where it happened. Closing explicitly (not by `Drop`) so that
/// an error reported by close(2) is seen.
fn write_checked(path: &Path, len: u64, seed: u64) -> Result<(), (Stage, io::Error)> {
    let data = pattern(len as usize, seed);
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(path).unwrap();
    let mut first: Option<(Stage, io::Error)> = None;
    for (i, chunk) in data.chunks(MIB as usize).enumerate() {
        if let Err(e) = f.write_all(chunk) {
            first = Some((format!("write at {}", i as u64 * MIB), e));
            break;
        }
    }
    if let Err(e) = f.sync_all() {
        first.get_or_insert(("fsync".into(), e));
    }
    let fd = f.into_raw_fd();
    if unsafe { libc::close(fd) } != 0 {
        first.get_or_insert(("close".into(), io::Error::last_os_error()));
    }
    match first {
        Some(f) => Err(f),
        None => Ok(()),
    }
}

#[test]
fn quota_full_volume_fails_with_edquot_and_recovers() {
    require_fuse!();
    let s = Single::with_cap(Some("8MiB"));
    let check_used = |when: &str| {
        let v = s.c.volume("vol").unwrap();
        assert_eq!(v.cap, 8 * MIB);
        assert!(v.used <= v.cap, "{when}: used {} > cap {}", v.used, v.cap);
        v.used
    };
    let keep = pattern(MIB as usize, 11);
    write(&s.p("keep.bin"), &keep);
    drop_cache(&s.p("keep.bin"));
    check_used("after keep.bin");

    let (stage, err) =
        write_checked(&s.p("big.bin"), 12 * MIB, 12).expect_err("writing 12 MiB to an 8 MiB volume succeeded (write, fsync and close)");
    let errno = err.raw_os_error().unwrap_or(0);
    assert!(
        errno == libc::EDQUOT || errno == libc::ENOSPC,
        "writing past the cap failed at {stage} with errno {} ({err}), expected EDQUOT or ENOSPC",
        errno_name(errno)
    );
    eprintln!("quota: writing past the cap failed at {stage}: {err}");
    check_used("after the failed write");
    drop_cache(&s.p("keep.bin"));
    assert_bytes_eq("keep.bin after the volume filled up", &read(&s.p("keep.bin")), &keep);

    fs::remove_file(s.p("big.bin")).unwrap();
    let freed = eventually(Duration::from_secs(5), || s.used() <= MIB + 64 * KIB);
    assert!(freed.is_some(), "after deleting big.bin used is still {}", s.used());

    write_checked(&s.p("four.bin"), 4 * MIB, 4).unwrap_or_else(|(stage, e)| panic!("4 MiB after freeing space failed at {stage}: {e}"));
    drop_cache(&s.p("four.bin"));
    assert_bytes_eq("four.bin", &read(&s.p("four.bin")), &pattern(4 * MIB as usize, 4));
    let used = check_used("after four.bin");
    assert!(used >= 5 * MIB, "used {used} after keeping 1 MiB + 4 MiB");
}

fn caps(c: &Cluster) -> BTreeMap<String, u64> {
    c.volumes().into_iter().map(|v| (v.name, v.cap)).collect()
}

#[test]
fn cli_volume_create_list_delete() {
    // CLI only: no mount, so no root or /dev/fuse needed.
    let c = Cluster::new();
    c.create_volume("small", Some("64MiB"));
    c.create_volume("dflt", None);
    c.create_volume("bytes", Some("1048576"));
    c.create_volume("gig", Some("3GiB"));
    let want: BTreeMap<String, u64> =
        [("bytes".to_string(), MIB), ("dflt".to_string(), 2 * GIB), ("gig".to_string(), 3 * GIB), ("small".to_string(), 64 * MIB)].into();
    assert_eq!(caps(&c), want);
    for v in c.volumes() {
        assert!(v.used < 64 * KIB, "new empty volume {} already uses {}", v.name, v.used);
    }
    let plain = c.cli(&["volume", "list"]);
    for name in want.keys() {
        assert!(plain.contains(name.as_str()), "`volume list` does not mention {name}:\n{plain}");
    }

    let err = c.cli_fail(&["volume", "create", "small", "--cap", "1GiB"]);
    assert!(err.to_lowercase().contains("exists"), "duplicate create: stderr {err:?} does not say it exists");
    assert_eq!(caps(&c)["small"], 64 * MIB, "a failed duplicate create changed the cap");

    c.cli_fail(&["volume", "create", "bad", "--cap", "12parsecs"]);
    assert!(!caps(&c).contains_key("bad"), "a create with a bad size left a volume behind");

    let err = c.cli_fail(&["volume", "delete", "nosuch"]).to_lowercase();
    assert!(err.contains("not found") || err.contains("no volume"), "delete of a missing volume: stderr {err:?}");

    c.cli(&["volume", "delete", "dflt"]);
    let mut after = want.clone();
    after.remove("dflt");
    assert_eq!(caps(&c), after);
    // The name is free again.
    c.create_volume("dflt", Some("16MiB"));
    after.insert("dflt".into(), 16 * MIB);
    assert_eq!(caps(&c), after);
}

#[test]
fn cli_delete_of_attached_volume_needs_force() {
    let c = Cluster::new();
    c.create_volume("v", Some("64MiB"));
    c.create_volume("other", Some("64MiB"));
    c.sandbox("sb");
    c.attach("sb", "v", &c.path("mnt"), &[]);
    let err = c.cli_fail(&["volume", "delete", "v"]);
    assert!(!err.trim().is_empty());
    assert!(c.volume("v").is_some(), "refused delete removed the volume anyway");
    c.cli(&["volume", "delete", "v", "--force"]);
    assert!(c.volume("v").is_none(), "`volume delete --force` left the volume listed");
    assert!(c.volume("other").is_some());
}

#[test]
fn cli_sandbox_create_and_attach_errors() {
    let c = Cluster::new();
    let plain = c.cli(&["sandbox", "create", "plain-sb"]);
    let socket = PathBuf::from(plain.trim());
    assert!(socket.is_absolute(), "sandbox create printed {plain:?}, not a socket path");
    let md = fs::metadata(&socket).unwrap_or_else(|e| panic!("guest socket {plain:?}: {e}"));
    assert!(md.file_type().is_socket(), "{plain:?} is not a socket");
    let socket2 = c.sandbox("json-sb");
    assert_ne!(socket, socket2, "two sandboxes share a guest socket");
    assert!(fs::metadata(&socket2).unwrap().file_type().is_socket());

    c.create_volume("v", Some("64MiB"));
    let at = c.path("m");
    c.cli_fail(&["attach", "json-sb", "missing-volume", "--at", at.to_str().unwrap()]);
    c.cli_fail(&["attach", "json-sb", "v", "--at", at.to_str().unwrap(), "--subpath", "/missing"]);
    // A correct attach still works after the failed ones.
    c.attach("json-sb", "v", &at, &["--read-only"]);
}

/// `volumefs ARGS` without a server, and with neither VOLUMEFS_SERVER nor VOLUMEFS_TOKEN unless
/// `env` sets them: (exit code, stdout, stderr).
fn bare_cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(SERVER_BIN);
    cmd.args(args).env_remove("VOLUMEFS_SERVER").env_remove("VOLUMEFS_TOKEN").stdin(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run volumefs CLI");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn cli_help_typos_and_completions_need_no_server() {
    let (code, out, err) = bare_cli(&["volume", "--help"], &[]);
    assert_eq!(code, 0, "volume --help: {err}");
    assert!(out.contains("create") && out.contains("list") && out.contains("inspect"), "volume --help:\n{out}");
    let (code, out, _) = bare_cli(&["sandbox", "exec", "--help"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("-- <CMD>..."), "sandbox exec --help:\n{out}");

    let (code, _, err) = bare_cli(&["volme", "list"], &[]);
    assert_eq!(code, 2, "a mistyped command is a usage error: {err}");
    assert!(err.contains("'volume'"), "no suggestion for `volme`: {err}");

    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = bare_cli(&["completions", shell], &[]);
        assert_eq!(code, 0, "completions {shell}: {err}");
        assert!(out.contains("volumefs") && out.contains("hibernate"), "completions {shell}:\n{out}");
    }
}

#[test]
fn cli_server_and_token_from_the_environment() {
    let (code, _, err) = bare_cli(&["volume", "list"], &[]);
    assert_eq!(code, 1);
    assert_eq!(err.trim(), "volumefs: no API token: pass --token or set VOLUMEFS_TOKEN (the server writes it to DATA/api-token)");
    // Nothing listens on port 1: the error names the server the environment chose.
    let (code, _, err) = bare_cli(&["volume", "list"], &[("VOLUMEFS_SERVER", "http://127.0.0.1:1"), ("VOLUMEFS_TOKEN", "t")]);
    assert_eq!(code, 1);
    assert!(err.starts_with("volumefs: cannot reach the server at http://127.0.0.1:1"), "{err}");
    // An option after the subcommand wins over the environment.
    let (_, _, err) = bare_cli(
        &["volume", "list", "--server", "http://127.0.0.1:2"],
        &[("VOLUMEFS_SERVER", "http://127.0.0.1:1"), ("VOLUMEFS_TOKEN", "t")],
    );
    assert!(err.starts_with("volumefs: cannot reach the server at http://127.0.0.1:2"), "{err}");

    let c = Cluster::new();
    let (code, out, err) = bare_cli(&["volume", "list", "--token", &c.token], &[("VOLUMEFS_SERVER", &format!("http://{}", c.addr))]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("NAME"), "{out}");
}

#[test]
fn cli_volume_fields() {
    let c = Cluster::new();
    c.create_volume("alpha", Some("64MiB"));
    c.create_volume("beta", Some("1GiB"));

    let out = c.cli(&["volume", "list", "--fields", "cap_bytes,name"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0].split_whitespace().collect::<Vec<_>>(), ["CAP", "NAME"], "{out}");
    assert_eq!(lines[1].split_whitespace().collect::<Vec<_>>(), ["64.0", "MiB", "alpha"], "{out}");
    assert_eq!(lines[2].split_whitespace().collect::<Vec<_>>(), ["1.0", "GiB", "beta"], "{out}");

    let out = c.cli(&["volume", "list", "--json", "--fields", "name,files"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    let vols = v.as_array().unwrap();
    assert_eq!(vols.len(), 2);
    for vol in vols {
        let keys: Vec<&String> = vol.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 2, "only the asked fields: {vol}");
        assert!(vol["name"].is_string() && vol["files"].as_u64() >= Some(1), "{vol}");
    }
    assert!(out.find("\"name\"") < out.find("\"files\""), "keys in the given order: {out}");

    let out = c.cli(&["volume", "inspect", "alpha", "--fields", "used_bytes,cap_bytes"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    assert_eq!(v.as_object().unwrap().len(), 2, "{out}");
    assert_eq!(v["cap_bytes"].as_u64(), Some(64 * MIB));
    assert!(out.find("\"used_bytes\"") < out.find("\"cap_bytes\""), "keys in the given order: {out}");

    // Without --fields: every key.
    let v: serde_json::Value = serde_json::from_str(&c.cli(&["volume", "inspect", "alpha"])).unwrap();
    for key in ["id", "name", "cap_bytes", "used_bytes", "free_bytes", "files", "created_at", "attachments"] {
        assert!(v.get(key).is_some(), "inspect lacks {key}: {v}");
    }

    let out = c.cli_output(&["volume", "list", "--fields", "name,size"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"size\"") && err.contains("id, name, cap_bytes, used_bytes, free_bytes, files, created_at, attachments"),
        "{err}"
    );
}

#[test]
fn data_inodes_and_usage_survive_server_restart() {
    require_fuse!();
    let mut s = Single::with_cap(Some("64MiB"));
    let data = pattern(2 * MIB as usize, 77);
    fs::create_dir(s.p("d")).unwrap();
    write(&s.p("d/f.bin"), &data);
    std::os::unix::fs::symlink("d/f.bin", s.p("l")).unwrap();
    setxattr(&s.p("d/f.bin"), "user.k", b"kept", 0).unwrap();
    let names = ["d", "d/f.bin", "l"];
    let inos: Vec<u64> = names.iter().map(|n| fs::symlink_metadata(s.p(n)).unwrap().ino()).collect();
    let used = s.used();

    s.agent.take().unwrap().stop();
    s.c.restart_server();
    let v = s.c.volume("vol").expect("volume listed after a server restart");
    assert_eq!((v.cap, v.used), (64 * MIB, used), "cap/used after a server restart");
    s.agent = Some(s.c.start_agent(&s.socket, &[&s.mnt]));

    assert_bytes_eq("d/f.bin after a server restart", &read(&s.p("d/f.bin")), &data);
    assert_eq!(fs::read_link(s.p("l")).unwrap(), Path::new("d/f.bin"));
    assert_eq!(getxattr(&s.p("d/f.bin"), "user.k").unwrap(), b"kept");
    let after: Vec<u64> = names.iter().map(|n| fs::symlink_metadata(s.p(n)).unwrap().ino()).collect();
    assert_eq!(inos, after, "inode numbers of {names:?} changed across a server restart");
    // And the volume keeps working.
    write(&s.p("after"), b"written after the restart");
    assert_eq!(read(&s.p("after")), b"written after the restart");
}

#[test]
fn open_handles_survive_connection_reset() {
    // The design: reconnect is normal (snapshot restore closes every vsock connection); open
    // handles and inode numbers survive it.
    require_fuse!();
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::io::AsRawFd;
    let s = Single::new();
    let p = s.p("open-across-reset");
    let first = pattern(MIB as usize, 1);
    let second = pattern(MIB as usize, 2);
    write(&s.p("existing"), b"existing");
    let ino = fs::metadata(s.p("existing")).unwrap().ino();
    let mut f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&p).unwrap();
    f.write_all(&first).unwrap();
    f.sync_all().unwrap();
    let reader = fs::File::open(s.p("existing")).unwrap();

    let out = s.c.cli(&["sandbox", "reset-connections", "sb"]);
    assert!(!out.contains("closed 0 "), "reset-connections closed nothing: {out}");

    f.write_all(&second).expect("write through a handle opened before the reset");
    f.sync_all().expect("fsync through a handle opened before the reset");
    assert_eq!(unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
    let mut got = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut got).expect("read through a handle opened before the reset");
    let mut want = first.clone();
    want.extend_from_slice(&second);
    assert_bytes_eq("file written across a connection reset", &got, &want);
    drop(f);
    let mut buf = Vec::new();
    (&reader).read_to_end(&mut buf).expect("read through a read handle opened before the reset");
    assert_eq!(buf, b"existing");
    assert_eq!(fs::metadata(s.p("existing")).unwrap().ino(), ino);
    write(&s.p("new-after-reset"), b"new");
    assert_eq!(list(&s.mnt), ["existing", "new-after-reset", "open-across-reset"]);
    drop_cache(&p);
    assert_bytes_eq("file after close, cache dropped", &read(&p), &want);
}

#[test]
fn name_length_limit() {
    require_fuse!();
    let s = Single::new();
    let max = statvfs(&s.mnt).unwrap().f_namemax as usize;
    assert!(max >= 255, "f_namemax {max} is below NAME_MAX");
    let longest = "n".repeat(max);
    write(&s.p(&longest), b"longest name");
    assert_eq!(read(&s.p(&longest)), b"longest name");
    assert_eq!(list(&s.mnt), std::slice::from_ref(&longest));
    let too_long = "n".repeat(max + 1);
    assert_errno("create with a name over f_namemax", fs::write(s.p(&too_long), b"x"), libc::ENAMETOOLONG);
    assert_errno("mkdir with a name over f_namemax", fs::create_dir(s.p(&too_long)), libc::ENAMETOOLONG);
}

#[test]
fn sigterm_flushes_dirty_data_of_open_files() {
    // SIGTERM: the agent flushes (the kernel's dirty pages included) and unmounts, even with a
    // file still open and written but neither fsynced nor closed.
    require_fuse!();
    let mut s = Single::new();
    let data = pattern(2 * MIB as usize + 5, 31);
    let mut f = fs::File::create(s.p("dirty.bin")).unwrap();
    f.write_all(&data).unwrap();
    s.agent.take().unwrap().stop();
    drop(f); // its mount is gone; close(2) may fail, which is fine here
    s.agent = Some(s.c.start_agent(&s.socket, &[&s.mnt]));
    assert_bytes_eq("data written before SIGTERM, never fsynced", &read(&s.p("dirty.bin")), &data);
}

#[test]
fn usage_tracks_overwrite_truncate_rename_and_links() {
    require_fuse!();
    let s = Single::with_cap(Some("64MiB"));
    let base = s.used();
    // `used` counts data; allow 64 KiB for metadata and block rounding, and let background
    // releases land.
    let expect = |what: &str, bytes: u64| {
        let ok = eventually(Duration::from_secs(3), || s.used().abs_diff(base + bytes) <= 64 * KIB);
        assert!(ok.is_some(), "{what}: used {} (baseline {base}), expected about {}", s.used(), base + bytes);
    };
    write(&s.p("a"), &pattern(3 * MIB as usize, 1));
    write(&s.p("b"), &pattern(2 * MIB as usize, 2));
    expect("after writing 3 MiB + 2 MiB", 5 * MIB);
    OpenOptions::new().write(true).open(s.p("a")).unwrap().write_all(&pattern(MIB as usize, 3)).unwrap();
    expect("after overwriting 1 MiB in place", 5 * MIB);
    fs::hard_link(s.p("a"), s.p("a-link")).unwrap();
    expect("after a hard link", 5 * MIB);
    OpenOptions::new().write(true).open(s.p("a")).unwrap().set_len(MIB).unwrap();
    expect("after truncating a to 1 MiB", 3 * MIB);
    fs::rename(s.p("a"), s.p("b")).unwrap();
    expect("after renaming a (1 MiB) over b (2 MiB)", MIB);
    fs::remove_file(s.p("b")).unwrap();
    expect("after unlinking one of two links", MIB);
    fs::remove_file(s.p("a-link")).unwrap();
    expect("after unlinking the last link", 0);
}

/// A second server on a data directory that a running server serves is refused at once, names
/// the directory and the holder's PID, and touches nothing: the first server keeps serving.
#[test]
fn a_second_server_on_the_same_data_directory_is_refused() {
    let c = Cluster::new();
    c.create_volume("vol", None);
    let addr_before = std::fs::read_to_string(c.data.join("http-addr")).unwrap();
    let out =
        std::process::Command::new(SERVER_BIN).args(["server", "--data"]).arg(&c.data).args(["--http", "127.0.0.1:0"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second server started: {stderr}");
    assert!(stderr.contains(&c.data.display().to_string()) && stderr.contains("in use"), "{stderr}");
    let holder = std::fs::read_to_string(c.data.join("lock")).unwrap();
    assert!(stderr.contains(&format!("pid {}", holder.trim())), "names the holder's pid ({}): {stderr}", holder.trim());
    assert_eq!(std::fs::read_to_string(c.data.join("http-addr")).unwrap(), addr_before, "http-addr untouched");
    assert!(c.volumes().iter().any(|v| v.name == "vol"), "the first server still answers");
}

/// The server logs lifecycle events: as text by default, as one JSON object per line with
/// `--log-format json` (every line, so a log shipper can parse the whole stream).
#[test]
fn the_server_logs_lifecycle_events_as_text_or_json() {
    require_fuse!();
    let s = Single::new();
    let log = s.c.server_log();
    assert!(log.contains("server started") && log.contains("HTTP API listening"), "{log}");
    assert!(log.contains("session opened") && log.contains("sb"), "a mount's session is logged:\n{log}");
    // The agent logs to its console (stderr) and, with --log-file, to a file too.
    let file = s.c.path("agent.log");
    let socket = s.c.sandbox("logged");
    let mnt = s.c.path("logged-mnt");
    s.c.attach("logged", "vol", &mnt, &[]);
    let agent = s.c.start_agent_with(&socket, &[&mnt], &["--log-file", file.to_str().unwrap()]);
    agent.stop();
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("mounted") && text.contains("stopping"), "agent log file:\n{text}");

    let c = Cluster::with_server_args(&["--log-format", "json"]);
    c.create_volume("vol", None);
    let log = c.server_log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "the JSON log is empty");
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"));
        assert!(v["level"].is_string() && v["fields"]["message"].is_string(), "{l}");
    }
    assert!(lines.iter().any(|l| l.contains("server started")), "{log}");
}

//! The HTTP API driven by the tools a controller would use: real `curl` (ranges, streamed
//! uploads, signed URLs), real GNU `tar` and `unzip` to check archives, and a FUSE mount to
//! check that guests see what the API changed. Most tests need no mount (only the server).

use crate::harness::*;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// `curl -sS` against the cluster's server, with the token unless `anonymous`; `args` may use
/// `{base}` for `http://ADDR`.
fn curl_with(c: &Cluster, anonymous: bool, args: &[&str]) -> Output {
    let base = format!("http://{}", c.addr);
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "300"]);
    if !anonymous {
        cmd.args(["-H", &format!("Authorization: Bearer {}", c.token)]);
    }
    for a in args {
        cmd.arg(a.replace("{base}", &base));
    }
    cmd.output().expect("run curl")
}

fn curl(c: &Cluster, args: &[&str]) -> Output {
    curl_with(c, false, args)
}

/// Runs curl with `-w '\n%{http_code}'`; returns (status, body).
fn call(c: &Cluster, args: &[&str]) -> (u16, String) {
    let mut all = args.to_vec();
    all.extend(["-w", "\n%{http_code}"]);
    let out = curl(c, &all);
    assert!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or_else(|_| panic!("no status in {text:?}")), body.to_string())
}

/// POSTs a tar file to volume v's batch endpoint, unpacking below `dest`.
fn post_tar(c: &Cluster, tarball: &Path, dest: &str) -> (u16, String) {
    let data = format!("@{}", tarball.display());
    let url = format!("{{base}}/v1/volumes/v/batch?path={dest}");
    call(c, &["-H", "Content-Type: application/x-tar", "--data-binary", &data, &url])
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn put(c: &Cluster, vol: &str, path: &str, data: &[u8]) {
    let f = c.path(&format!("put-{}", path.replace('/', "_")));
    std::fs::write(&f, data).unwrap();
    let (code, body) = call(c, &["-T", f.to_str().unwrap(), &format!("{{base}}/v1/volumes/{vol}/files{path}?parents=true")]);
    assert_eq!(code, 200, "PUT {path}: {body}");
}

fn get(c: &Cluster, vol: &str, path: &str) -> Vec<u8> {
    let out = curl(c, &["-f", &format!("{{base}}/v1/volumes/{vol}/files{path}")]);
    assert!(out.status.success(), "GET {path}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn ls(c: &Cluster, vol: &str) -> Vec<String> {
    let (code, body) = call(c, &[&format!("{{base}}/v1/volumes/{vol}/list?path=/&recursive=true")]);
    assert_eq!(code, 200, "{body}");
    // Listings come in directory order (like `find`); sorted here to compare.
    let mut paths: Vec<String> =
        json(&body)["entries"].as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap().to_string()).collect();
    paths.sort();
    paths
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

#[test]
fn http_errors_are_json_with_stable_codes() {
    let c = Cluster::new();
    c.create_volume("v", Some("1MiB"));
    let (code, body) = call(&c, &["{base}/v1/volumes/nope"]);
    assert_eq!((code, json(&body)["code"].as_str()), (404, Some("NotFound")), "{body}");
    let out = curl_with(&c, true, &["-w", "\n%{http_code}", "{base}/v1/volumes"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("401") && text.contains("\"Unauthorized\""), "{text}");
    // No resize: the cap is fixed, and the error says so.
    let (code, body) = call(&c, &["-X", "PATCH", "-H", "Content-Type: application/json", "-d", r#"{"cap":"2GiB"}"#, "{base}/v1/volumes/v"]);
    assert_eq!(code, 400, "{body}");
    assert!(json(&body)["message"].as_str().unwrap().contains("do not grow"), "{body}");
    // Paths are checked: `..` cannot climb out.
    let (code, body) = call(&c, &["{base}/v1/volumes/v/stat?path=/a/../../etc/passwd"]);
    assert_eq!((code, json(&body)["code"].as_str()), (400, Some("InvalidArgument")), "{body}");
    // A full volume is `VolumeFull`, and the write left nothing.
    let big = c.path("big");
    std::fs::write(&big, pattern(2 << 20, 1)).unwrap();
    let (code, body) = call(&c, &["-T", big.to_str().unwrap(), "{base}/v1/volumes/v/files/big"]);
    assert_eq!((code, json(&body)["code"].as_str()), (507, Some("VolumeFull")), "{body}");
    assert_eq!(ls(&c, "v"), Vec::<String>::new(), "nothing half-written");
    assert_eq!(c.volume_used("v"), 0);
    // Field selection, in the order asked; an unknown field names the valid ones.
    let (_, body) = call(&c, &["{base}/v1/volumes/v?fields=used_bytes,name"]);
    assert_eq!(body.trim(), r#"{"used_bytes":0,"name":"v"}"#);
    let (code, body) = call(&c, &["{base}/v1/volumes?fields=size"]);
    assert!(code == 400 && body.contains("cap_bytes"), "{body}");
}

#[test]
fn http_ranges_with_curl() {
    let c = Cluster::new();
    c.create_volume("v", None);
    let data = pattern(3 << 20, 7);
    put(&c, "v", "/d/blob", &data);
    let url = "{base}/v1/volumes/v/files/d/blob";
    let out = curl(&c, &["-f", "-r", "100-199", url]);
    assert_bytes_eq("bytes 100-199", &out.stdout, &data[100..200]);
    let out = curl(&c, &["-f", "-r", "-10", url]);
    assert_bytes_eq("the last 10 bytes", &out.stdout, &data[data.len() - 10..]);
    let out = curl(&c, &["-f", "-r", "3000000-", url]);
    assert_bytes_eq("from 3000000 on", &out.stdout, &data[3_000_000..]);
    let (code, _) = call(&c, &["-r", "5000000-5000001", url]);
    assert_eq!(code, 416, "a range past the end");
    let (code, _) = call(&c, &["-o", "/dev/null", "-r", "0-0", url]);
    assert_eq!(code, 206);
    assert_bytes_eq("whole file", &get(&c, "v", "/d/blob"), &data);
}

/// A tree with an executable, a symlink, an old mtime and a nested directory, packed by GNU
/// tar, uploaded as a batch, downloaded as tar, tar.gz and zip, and unpacked by GNU tar and
/// unzip: the same bytes, modes, link and times come back.
#[test]
fn http_archives_round_trip_through_gnu_tar_and_unzip() {
    let c = Cluster::new();
    c.create_volume("v", None);
    let src = c.path("src");
    sh(&format!(
        "mkdir -p {s}/tree/sub/deep && cd {s}/tree && printf 'hello\\n' > a.txt && head -c 300000 /dev/urandom > sub/bin \
         && printf '#!/bin/sh\\necho hi\\n' > run.sh && chmod 755 run.sh && chmod 600 sub/bin && ln -s sub/bin link \
         && printf 'x' > sub/deep/x && touch -d '2001-02-03 04:05:06' a.txt sub/bin",
        s = src.display()
    ));
    let tarball = c.path("up.tar");
    sh(&format!("tar -C {} -cf {} tree", src.display(), tarball.display()));
    let (code, body) = post_tar(&c, &tarball, "/up");
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["files"], 4, "{body}");
    assert_eq!(json(&body)["symlinks"], 1, "{body}");

    let compare = |dir: &Path, what: &str| {
        let got = sh(&format!(
            "cd {} && find tree -printf '%p %y %m %s %l\\n' | sort && sha256sum tree/a.txt tree/sub/bin tree/run.sh",
            dir.display()
        ));
        let want = sh(&format!(
            "cd {} && find tree -printf '%p %y %m %s %l\\n' | sort && sha256sum tree/a.txt tree/sub/bin tree/run.sh",
            src.display()
        ));
        assert_eq!(got, want, "{what}: the tree that came back");
    };
    for (format, unpack) in [("tar", "tar -xf"), ("tar.gz", "tar -xzf")] {
        let out = c.path(&format!("down.{format}"));
        let o = curl(&c, &["-f", "-o", out.to_str().unwrap(), &format!("{{base}}/v1/volumes/v/files/up/tree?archive={format}")]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let dst = c.path(&format!("dst-{format}"));
        std::fs::create_dir(&dst).unwrap();
        sh(&format!("cd {} && {unpack} {}", dst.display(), out.display()));
        compare(&dst, format);
        let mtime = sh(&format!("stat -c %Y {}/tree/a.txt", dst.display()));
        assert_eq!(mtime.trim(), sh(&format!("stat -c %Y {}/tree/a.txt", src.display())).trim(), "{format}: mtime kept");
    }
    let zipf = c.path("down.zip");
    let o = curl(&c, &["-f", "-o", zipf.to_str().unwrap(), "{base}/v1/volumes/v/archive?path=/up/tree&format=zip"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let listing = sh(&format!("unzip -l {}", zipf.display()));
    assert!(listing.contains("tree/sub/bin") && listing.contains("tree/run.sh"), "{listing}");
    let dst = c.path("dst-zip");
    std::fs::create_dir(&dst).unwrap();
    sh(&format!("cd {} && unzip -q {}", dst.display(), zipf.display()));
    compare(&dst, "zip");
    // The whole volume as one archive.
    let o = curl(&c, &["-f", "{base}/v1/volumes/v/files?archive=tar"]);
    let names = String::from_utf8_lossy(&Command::new("tar").arg("-t").stdin(Stdio::piped()).output_with(&o.stdout).stdout).into_owned();
    assert!(names.lines().any(|l| l == "up/tree/run.sh"), "{names}");
}

trait OutputWith {
    fn output_with(&mut self, input: &[u8]) -> Output;
}

impl OutputWith for Command {
    fn output_with(&mut self, input: &[u8]) -> Output {
        let mut child = self.stdout(Stdio::piped()).spawn().unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), input).unwrap();
        child.wait_with_output().unwrap()
    }
}

/// A batch that fails anywhere leaves nothing: a bad entry after good ones, and a batch too
/// big for the volume.
#[test]
fn http_batch_is_all_or_nothing() {
    let c = Cluster::new();
    c.create_volume("v", Some("1MiB"));
    put(&c, "v", "/keep", b"old");
    let used = c.volume_used("v");
    // GNU tar keeps `..` in names with -P; the server must refuse the whole stream.
    let src = c.path("src");
    sh(&format!("mkdir -p {s}/d && echo one > {s}/d/one && echo evil > {s}/evil", s = src.display()));
    let tarball = c.path("bad.tar");
    sh(&format!("cd {s}/d && tar -P -cf {t} one ../evil", s = src.display(), t = tarball.display()));
    let (code, body) = post_tar(&c, &tarball, "/new");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains(".."), "{body}");
    assert_eq!(ls(&c, "v"), ["/keep"], "nothing of the batch stays, not even its directory");
    // JSON form: three files, the last too big for the cap.
    let huge = "x".repeat(1 << 20);
    let batch =
        serde_json::json!({"files": [{"path": "/a", "content": "A"}, {"path": "/b/c", "content": "C"}, {"path": "/z", "content": huge}]});
    let f = c.path("batch.json");
    std::fs::write(&f, batch.to_string()).unwrap();
    let (code, body) =
        call(&c, &["-H", "Content-Type: application/json", "--data-binary", &format!("@{}", f.display()), "{base}/v1/volumes/v/batch"]);
    assert_eq!((code, json(&body)["code"].as_str()), (507, Some("VolumeFull")), "{body}");
    assert_eq!(ls(&c, "v"), ["/keep"]);
    assert_eq!(c.volume_used("v"), used, "usage back where it was");
    // And a good one lands whole.
    let batch = serde_json::json!({"files": [{"path": "/a", "content": "A"}, {"path": "/b/c", "content": "C"}]});
    std::fs::write(&f, batch.to_string()).unwrap();
    let (code, body) =
        call(&c, &["-H", "Content-Type: application/json", "--data-binary", &format!("@{}", f.display()), "{base}/v1/volumes/v/batch"]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(get(&c, "v", "/b/c"), b"C");
}

#[test]
fn signed_urls_work_with_plain_curl_until_they_expire() {
    let c = Cluster::new();
    c.create_volume("v", None);
    let data = pattern(100_000, 3);
    put(&c, "v", "/docs/report.bin", &data);
    let sign = |body: &str| -> String {
        let (code, out) = call(&c, &["-H", "Content-Type: application/json", "-d", body, "{base}/v1/volumes/v/signed-url"]);
        assert_eq!(code, 200, "{out}");
        json(&out)["url"].as_str().unwrap().to_string()
    };
    let url = sign(r#"{"path": "/docs/report.bin", "expires_secs": 600}"#);
    let out = curl_with(&c, true, &["-f", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_bytes_eq("fetched without a token", &out.stdout, &data);
    let out = curl_with(&c, true, &["-f", "-r", "10-19", &url]);
    assert_bytes_eq("ranges work on signed URLs", &out.stdout, &data[10..20]);
    // Tampering with any part is refused.
    let tampered = [
        url.replace("report.bin", "report.bim"),
        url.replace("expires=", "expires=9"),
        {
            let i = url.rfind("sig=").unwrap() + 4;
            let mut u = url.clone();
            u.replace_range(i..i + 1, if &url[i..i + 1] == "0" { "1" } else { "0" });
            u
        },
        url.replace("/signed/v?", "/signed/w?"),
    ];
    for t in &tampered {
        let out = curl_with(&c, true, &["-w", "\n%{http_code}", t]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.ends_with("403") && text.contains("Forbidden"), "{t}: {text}");
    }
    // A directory is signed as an archive only, and the archive URL works.
    let (code, body) = call(&c, &["-H", "Content-Type: application/json", "-d", r#"{"path": "/docs"}"#, "{base}/v1/volumes/v/signed-url"]);
    assert_eq!(code, 400, "{body}");
    let url = sign(r#"{"path": "/docs", "archive": "tar", "expires_secs": 600}"#);
    let out = curl_with(&c, true, &["-f", &url]);
    let names = String::from_utf8_lossy(&Command::new("tar").arg("-t").stdin(Stdio::piped()).output_with(&out.stdout).stdout).into_owned();
    assert_eq!(names.lines().collect::<Vec<_>>(), ["docs/", "docs/report.bin"]);
    // Expiry.
    let url = sign(r#"{"path": "/docs/report.bin", "expires_secs": 1}"#);
    std::thread::sleep(Duration::from_millis(2100));
    let out = curl_with(&c, true, &["-w", "\n%{http_code}", &url]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("403") && text.contains("expired"), "{text}");
}

/// 1 GiB goes up from a pipe and comes back down while the server's memory stays flat: bodies
/// stream through bounded channels, never whole.
#[test]
fn http_one_gib_up_and_down_with_flat_server_memory() {
    let c = Cluster::new();
    c.create_volume("v", None);
    let pid = c.server_pid();
    let before = rss_kib(pid);
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let base = format!("http://{}", c.addr);
    let auth = format!("Authorization: Bearer {}", c.token);
    let up = sh(&format!(
        "head -c 1073741824 /dev/zero | tr '\\0' 'z' | curl -sS -f -T - -H '{auth}' '{base}/v1/volumes/v/files/big' -w ' %{{http_code}}'"
    ));
    assert!(up.ends_with("200"), "{up}");
    let up_peak = peak.swap(rss_kib(pid), std::sync::atomic::Ordering::SeqCst);
    let down = sh(&format!("curl -sS -f -H '{auth}' '{base}/v1/volumes/v/files/big' | wc -c"));
    assert_eq!(down.trim(), "1073741824");
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    sampler.join().unwrap();
    let down_peak = peak.load(std::sync::atomic::Ordering::SeqCst);
    let after = rss_kib(pid);
    eprintln!("http_api: server RSS {before} KiB before, peak {up_peak} KiB uploading 1 GiB, peak {down_peak} KiB downloading it, {after} KiB after");
    assert!(
        up_peak < before + 200 * 1024 && down_peak < before + 200 * 1024,
        "memory grew with the body: {before} -> {up_peak} / {down_peak} KiB"
    );
    let head = get_range(&c, "/big", "1073741800-1073741823");
    assert_eq!(head, vec![b'z'; 24]);
}

fn get_range(c: &Cluster, path: &str, range: &str) -> Vec<u8> {
    curl(c, &["-f", "-r", range, &format!("{{base}}/v1/volumes/v/files{path}")]).stdout
}

/// An upload cut off in the middle (the client killed) leaves no file and no usage behind.
#[test]
fn http_interrupted_upload_leaves_nothing() {
    let c = Cluster::new();
    c.create_volume("v", None);
    put(&c, "v", "/f", b"old contents");
    let base = format!("http://{}", c.addr);
    let auth = format!("Authorization: Bearer {}", c.token);
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("(head -c 5000000 /dev/zero; sleep 30) | exec curl -sS -T - -H '{auth}' '{base}/v1/volumes/v/files/f'"))
        .spawn()
        .unwrap();
    // Wait until the server holds the temporary file, then cut the upload off.
    let started = eventually(Duration::from_secs(20), || {
        let (_, body) = call(&c, &["{base}/v1/volumes/v/list?path=/"]);
        body.contains(".f.volumefs-")
    });
    assert!(started.is_some(), "the upload never started");
    sh(&format!("pkill -KILL -P {} curl || true; kill -KILL {} || true", child.id(), child.id()));
    let _ = child.wait();
    let gone = eventually(Duration::from_secs(20), || ls(&c, "v") == ["/f"]);
    assert!(gone.is_some(), "the temporary file stays: {:?}", ls(&c, "v"));
    assert_eq!(get(&c, "v", "/f"), b"old contents", "the old contents are untouched");
    assert_eq!(c.volume_used("v"), 12);
}

/// What the API changes, a sandbox sees at once through its mount (the server pushes the
/// invalidations; a name still cached at that instant points at a replaced inode, which answers
/// `ESTALE` so that the kernel looks the name up again), and what the sandbox writes the API
/// reads. Disappearances are checked within 0.5 s, half the kernel's cache time, so that only the
/// pushes can explain them.
#[test]
fn guests_see_api_changes_at_once() {
    require_fuse!();
    let c = Cluster::new();
    c.create_volume("v", None);
    let sock = c.sandbox("sb");
    let mnt = c.path("mnt");
    c.attach("sb", "v", &mnt, &[]);
    let _agent = c.start_agent(&sock, &[&mnt]);
    write(&mnt.join("guest.txt"), b"from the guest");
    assert_eq!(get(&c, "v", "/guest.txt"), b"from the guest");
    // Warm the guest's caches, then change everything through the API.
    assert_eq!(read(&mnt.join("guest.txt")), b"from the guest");
    let _ = std::fs::metadata(mnt.join("new.txt"));
    put(&c, "v", "/guest.txt", b"replaced by the API");
    put(&c, "v", "/new.txt", b"new");
    // The pushes reach the guest's kernel just after the API answers (they go out before the
    // reply, but the agent hands them on as they come): within 0.5 s, half the kernel's cache
    // time, so that only the pushes can explain them.
    let soon = |f: &dyn Fn() -> bool| eventually(Duration::from_millis(500), f).is_some();
    let reads = |p: &str, want: &[u8]| soon(&|| std::fs::read(mnt.join(p)).ok().as_deref() == Some(want));
    assert!(reads("guest.txt", b"replaced by the API"), "the replaced file's cached pages go");
    assert!(reads("new.txt", b"new"), "the cached absence of new.txt goes");
    let (code, body) = call(
        &c,
        &["-H", "Content-Type: application/json", "-d", r#"{"from": "/new.txt", "to": "/moved.txt"}"#, "{base}/v1/volumes/v/move"],
    );
    assert_eq!(code, 200, "{body}");
    assert!(soon(&|| !mnt.join("new.txt").exists()), "the old name goes");
    assert_eq!(read(&mnt.join("moved.txt")), b"new");
    let (code, body) = call(
        &c,
        &[
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"path": "/guest.txt", "find": "API", "replace": "control plane"}"#,
            "{base}/v1/volumes/v/edit",
        ],
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(read(&mnt.join("guest.txt")), b"replaced by the control plane");
    let (code, body) = call(&c, &["-X", "DELETE", "{base}/v1/volumes/v/files/moved.txt"]);
    assert_eq!(code, 200, "{body}");
    assert!(soon(&|| !mnt.join("moved.txt").exists()), "a removed file goes");
    let (code, body) = call(&c, &["-X", "POST", "--data-binary", "one line\n", "{base}/v1/volumes/v/files/log?append"]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(read(&mnt.join("log")), b"one line\n");
}

/// The file verbs over plain HTTP: stat, list, mkdir, move, remove, edit, search, replace.
#[test]
fn http_file_operations() {
    let c = Cluster::new();
    c.create_volume("v", None);
    put(&c, "v", "/src/main.rs", b"fn main() {\n    println!(\"hello\");\n}\n");
    put(&c, "v", "/src/lib.rs", b"pub fn hello() -> &'static str {\n    \"hello\"\n}\n");
    put(&c, "v", "/README.md", b"say hello\n");
    let post = |route: &str, body: &str| {
        call(&c, &["-H", "Content-Type: application/json", "-d", body, &format!("{{base}}/v1/volumes/v/{route}")])
    };
    let (code, body) = call(&c, &["{base}/v1/volumes/v/stat?path=/src/main.rs"]);
    assert_eq!(code, 200);
    let st = json(&body);
    assert_eq!((st["kind"].as_str(), st["size"].as_u64(), st["mode"].as_u64()), (Some("file"), Some(37), Some(0o644)), "{body}");
    let (code, _) = call(&c, &["-I", "{base}/v1/volumes/v/files/nope"]);
    assert_eq!(code, 404, "HEAD of a missing path");
    // A long name of 3-byte characters: the hidden temporary name is cut at a character boundary
    // (it was cut at byte 200, mid-character, and the request panicked).
    let long = "€".repeat(80);
    let encoded: String = long.bytes().map(|b| format!("%{b:02X}")).collect();
    let f = c.path("euro");
    std::fs::write(&f, b"euro").unwrap();
    let (code, body) = call(&c, &["-T", f.to_str().unwrap(), &format!("{{base}}/v1/volumes/v/files/{encoded}")]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(get(&c, "v", &format!("/{encoded}")), b"euro");
    let (code, _) = call(&c, &["-X", "DELETE", &format!("{{base}}/v1/volumes/v/files/{encoded}")]);
    assert_eq!(code, 200);
    let (code, body) = post("mkdir", r#"{"path": "/a/b/c", "parents": true}"#);
    assert_eq!(code, 200, "{body}");
    let (code, body) = post("mkdir", r#"{"path": "/x/y"}"#);
    assert_eq!((code, json(&body)["code"].as_str()), (404, Some("NotFound")), "{body}");
    let (code, body) = post("move", r#"{"from": "/README.md", "to": "/a/b/README.md"}"#);
    assert_eq!(code, 200, "{body}");
    let (code, body) = post("remove", r#"{"path": "/a"}"#);
    assert_eq!((code, json(&body)["code"].as_str()), (409, Some("NotEmpty")), "{body}");
    assert_eq!(ls(&c, "v"), ["/a", "/a/b", "/a/b/README.md", "/a/b/c", "/src", "/src/lib.rs", "/src/main.rs"]);
    // Edit: exactly one occurrence.
    let (code, body) = post("edit", r#"{"path": "/src/lib.rs", "find": "hello", "replace": "bye"}"#);
    assert_eq!(code, 400, "{body}");
    assert!(json(&body)["message"].as_str().unwrap().contains("found 2"), "{body}");
    let (code, body) = post("edit", r#"{"path": "/src/lib.rs", "find": "fn hello", "replace": "fn greet"}"#);
    assert_eq!(code, 200, "{body}");
    // Search by name and by content.
    let (_, body) = call(&c, &["{base}/v1/volumes/v/search?path=/&name=*.rs"]);
    let mut paths: Vec<String> =
        json(&body)["matches"].as_array().unwrap().iter().map(|m| m["path"].as_str().unwrap().to_string()).collect();
    paths.sort();
    assert_eq!(paths, ["/src/lib.rs", "/src/main.rs"]);
    let (_, body) = call(&c, &["-G", "--data-urlencode", "content=print.*hello", "{base}/v1/volumes/v/search"]);
    let m = &json(&body)["matches"][0];
    assert_eq!((m["path"].as_str(), m["line"].as_u64()), (Some("/src/main.rs"), Some(2)), "{body}");
    // Replace across files, reported per file.
    let (code, body) = post("replace", r#"{"path": "/", "find": "hel+o", "replace": "howdy", "name": "*.rs"}"#);
    assert_eq!(code, 200, "{body}");
    let mut changed: Vec<String> = json(&body)["changed"].as_array().unwrap().iter().map(|f| f.to_string()).collect();
    changed.sort();
    assert_eq!(changed, [r#"{"path":"/src/lib.rs","replacements":1}"#, r#"{"path":"/src/main.rs","replacements":1}"#]);
    assert_eq!(get(&c, "v", "/src/lib.rs"), b"pub fn greet() -> &'static str {\n    \"howdy\"\n}\n");
    assert_eq!(get(&c, "v", "/a/b/README.md"), b"say hello\n", "not a *.rs file");
    let (code, body) = post("remove", r#"{"path": "/a", "recursive": true}"#);
    assert_eq!((code, json(&body)["entries"].as_u64()), (200, Some(4)), "{body}");
    assert_eq!(ls(&c, "v"), ["/src", "/src/lib.rs", "/src/main.rs"]);
}

/// The stock tus client (tuspy from PyPI, installed by scripts/test.sh), if this machine has it.
fn tuspy_available() -> bool {
    let ok = Command::new("python3").args(["-c", "import tusclient"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        assert!(std::env::var("VOLUMEFS_REQUIRE_FUSE").is_err(), "tuspy is missing (scripts/test.sh installs it with pip)");
        eprintln!("SKIPPED: python3 cannot import tusclient (pip install tuspy)");
    }
    ok
}

const TUS_SCRIPT: &str = r#"
import sys
from tusclient import client
endpoint, token, local, mode = sys.argv[1:5]
c = client.TusClient(endpoint, headers={"Authorization": "Bearer " + token})
if mode == "start":
    up = c.uploader(file_path=local, chunk_size=8 << 20, metadata={"path": "/big/data.bin", "parents": "true"})
    up.upload(stop_at=8 << 20)
    print(up.url)
else:
    up = c.uploader(file_path=local, url=mode, chunk_size=8 << 20)
    start = up.get_offset()
    up.offset = start
    up.upload()
    print(start)
"#;

/// A 64 MiB upload by a stock tus client, interrupted for real (a PATCH killed mid-body) and
/// resumed by a new client process from the server's offset: the bytes arrive whole, and only
/// what the server did not have is sent again.
#[test]
fn tus_upload_interrupted_and_resumed_by_a_stock_client() {
    if !tuspy_available() {
        return;
    }
    let c = Cluster::new();
    c.create_volume("v", None);
    let size = 64usize << 20;
    let local = c.path("data.bin");
    std::fs::write(&local, pattern(size, 42)).unwrap();
    let endpoint = format!("http://{}/v1/volumes/v/uploads", c.addr);
    let py = |mode: &str| -> String {
        let out = Command::new("python3").args(["-c", TUS_SCRIPT, &endpoint, &c.token, local.to_str().unwrap(), mode]).output().unwrap();
        assert!(out.status.success(), "tuspy {mode}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // 1. The client creates the upload and sends the first 8 MiB, then stops.
    let url = py("start");
    assert!(url.contains("/v1/volumes/v/uploads/"), "{url}");
    let head = |c: &Cluster| -> Option<u64> {
        let out = curl(c, &["-I", "-H", "Tus-Resumable: 1.0.0", &url]);
        let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
        text.lines().find_map(|l| l.strip_prefix("upload-offset:")).map(|v| v.trim().parse().unwrap())
    };
    assert_eq!(head(&c), Some(8 << 20));
    // 2. A PATCH of the rest, throttled and killed mid-body: what arrived stays.
    let auth = format!("Authorization: Bearer {}", c.token);
    let mut patch = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tail -c +{} {} | exec curl -sS --limit-rate 8M -X PATCH -H '{auth}' -H 'Tus-Resumable: 1.0.0' \
             -H 'Upload-Offset: {}' -H 'Content-Type: application/offset+octet-stream' --data-binary @- '{url}'",
            (8 << 20) + 1,
            local.display(),
            8 << 20
        ))
        .spawn()
        .unwrap();
    let grew = eventually(Duration::from_secs(30), || head(&c).is_some_and(|o| o >= 16 << 20));
    sh(&format!("pkill -KILL -P {} curl || true; kill -KILL {} || true", patch.id(), patch.id()));
    let _ = patch.wait();
    assert!(grew.is_some(), "the throttled PATCH never got past 16 MiB");
    let kept = eventually(Duration::from_secs(10), || c.volume_used("v") == head(&c).unwrap_or(0)).map(|_| head(&c).unwrap());
    let kept = kept.expect("offset settles after the kill");
    assert!(kept > 8 << 20 && kept < size as u64, "a cut-off PATCH keeps what it wrote: {kept}");
    // 3. A new client process resumes from the server's offset.
    let resumed_from: u64 = py(&url).parse().unwrap();
    assert_eq!(resumed_from, kept, "the client resumed where the server was");
    let resent = size as u64 - resumed_from;
    eprintln!(
        "http_api: tus upload of {} MiB: 8 MiB by the first client, {:.1} MiB kept from the killed PATCH, {:.1} MiB sent on resume",
        size >> 20,
        (kept - (8 << 20)) as f64 / 1048576.0,
        resent as f64 / 1048576.0
    );
    assert_bytes_eq("the uploaded file", &get(&c, "v", "/big/data.bin"), &pattern(size, 42));
    assert_eq!(ls(&c, "v"), ["/big", "/big/data.bin"], "no hidden upload file left");
    assert_eq!(c.volume_used("v"), size as u64);
    let out = curl(&c, &["-I", "-H", "Tus-Resumable: 1.0.0", "-w", "%{http_code}", "-o", "/dev/null", &url]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404", "a finished upload is gone");
}

/// tus termination and expiration: both remove the partial data and its usage.
#[test]
fn tus_uploads_are_terminated_and_expire() {
    let c = Cluster::with_server_args(&["--upload-expiry", "2"]);
    c.create_volume("v", Some("64MiB"));
    let create = |path: &str, len: u64| -> String {
        use base64::Engine as _;
        let meta = format!("path {}", base64::engine::general_purpose::STANDARD.encode(path));
        let out = curl(
            &c,
            &[
                "-i",
                "-X",
                "POST",
                "-H",
                "Tus-Resumable: 1.0.0",
                "-H",
                &format!("Upload-Length: {len}"),
                "-H",
                &format!("Upload-Metadata: {meta}"),
                "{base}/v1/volumes/v/uploads",
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.starts_with("HTTP/1.1 201"), "{text}");
        let loc = text.lines().find_map(|l| l.to_lowercase().starts_with("location:").then(|| l[9..].trim().to_string())).unwrap();
        format!("http://{}{loc}", c.addr)
    };
    let patch = |url: &str, offset: u64, data: &str| -> String {
        let out = curl(
            &c,
            &[
                "-w",
                "%{http_code}",
                "-X",
                "PATCH",
                "-H",
                "Tus-Resumable: 1.0.0",
                "-H",
                &format!("Upload-Offset: {offset}"),
                "-H",
                "Content-Type: application/offset+octet-stream",
                "--data-binary",
                data,
                url,
            ],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // More than the volume holds is refused at creation.
    let out = curl(
        &c,
        &[
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "-H",
            "Tus-Resumable: 1.0.0",
            "-H",
            "Upload-Length: 100000000",
            "-H",
            "Upload-Metadata: path L2JpZw==",
            "{base}/v1/volumes/v/uploads",
        ],
    );
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("507"), "{}", String::from_utf8_lossy(&out.stdout));
    let a = create("/a.txt", 10);
    assert_eq!(patch(&a, 0, "hello"), "204");
    assert!(patch(&a, 0, "hello").contains("409"), "a wrong offset is a conflict");
    assert_eq!(c.volume_used("v"), 5);
    let out = curl(&c, &["-w", "%{http_code}", "-X", "DELETE", "-H", "Tus-Resumable: 1.0.0", &a]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "204");
    assert_eq!(c.volume_used("v"), 0, "termination frees the partial data");
    assert_eq!(ls(&c, "v"), Vec::<String>::new());
    let b = create("/b.txt", 10);
    assert_eq!(patch(&b, 0, "12345"), "204");
    let expired = eventually(Duration::from_secs(20), || ls(&c, "v").is_empty() && c.volume_used("v") == 0);
    assert!(expired.is_some(), "an upload left alone expires: {:?}", ls(&c, "v"));
    assert!(patch(&b, 5, "67890").contains("404"), "an expired upload is gone");
    // A finished one lands in place.
    let d = create("/d.txt", 10);
    assert_eq!(patch(&d, 0, "01234"), "204");
    assert_eq!(patch(&d, 5, "56789"), "204");
    assert_eq!(get(&c, "v", "/d.txt"), b"0123456789");
}

type Event = (String, String, serde_json::Value);

/// Reads Server-Sent Events from `watch` with curl until `done` holds for what has arrived (or
/// 20 s). A count is not enough: how many `modify` events a write makes depends on timing.
fn watch_events(c: &Cluster, query: &str, last_id: Option<&str>, done: impl Fn(&[Event]) -> bool, during: impl FnOnce()) -> Vec<Event> {
    let out = c.path(&format!("watch-{}.txt", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()));
    let mut args = vec![
        "-sS".to_string(),
        "-N".into(),
        "-H".into(),
        format!("Authorization: Bearer {}", c.token),
        "-o".into(),
        out.display().to_string(),
    ];
    if let Some(id) = last_id {
        args.extend(["-H".into(), format!("Last-Event-ID: {id}")]);
    }
    args.push(format!("http://{}/v1/volumes/v/watch{query}", c.addr));
    let mut child = Command::new("curl").args(&args).spawn().unwrap();
    // The stream is open once curl has created its output file and the server has answered.
    std::thread::sleep(Duration::from_millis(300));
    during();
    let parse = || -> Vec<Event> {
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        text.split("\n\n")
            .filter_map(|block| {
                let mut id = String::new();
                let mut kind = String::new();
                let mut data = serde_json::Value::Null;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = v.to_string();
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        kind = v.to_string();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = serde_json::from_str(v).unwrap();
                    }
                }
                (!kind.is_empty()).then_some((id, kind, data))
            })
            .collect()
    };
    eventually(Duration::from_secs(20), || done(&parse()));
    let _ = child.kill();
    let _ = child.wait();
    parse()
}

/// `watch` streams what guests do through FUSE and what the API does, under a path, and a
/// client that reconnects with Last-Event-ID gets exactly what it missed.
#[test]
fn watch_streams_guest_and_api_changes_and_resumes() {
    require_fuse!();
    let c = Cluster::new();
    c.create_volume("v", None);
    let sock = c.sandbox("sb");
    let mnt = c.path("mnt");
    c.attach("sb", "v", &mnt, &[]);
    let _agent = c.start_agent(&sock, &[&mnt]);
    std::fs::create_dir(mnt.join("w")).unwrap();
    std::fs::create_dir(mnt.join("elsewhere")).unwrap();
    let deleted = |e: &[Event]| e.iter().any(|(_, k, d)| k == "delete" && d["path"] == "/w/b.txt");
    let events = watch_events(&c, "?path=/w", None, deleted, || {
        write(&mnt.join("w/a.txt"), &pattern(3 << 20, 1)); // many write requests: one modify
        write(&mnt.join("elsewhere/x"), b"not watched");
        std::fs::rename(mnt.join("w/a.txt"), mnt.join("w/b.txt")).unwrap();
        put(&c, "v", "/w/api.txt", b"from the API");
        std::fs::remove_file(mnt.join("w/b.txt")).unwrap();
    });
    let seen: Vec<(String, String)> = events.iter().map(|(_, k, d)| (k.clone(), d["path"].as_str().unwrap_or("").to_string())).collect();
    eprintln!("http_api: watch saw {seen:?}");
    let want = [
        ("create", "/w/a.txt"),
        ("modify", "/w/a.txt"),
        ("move", "/w/b.txt"),
        // The API's atomic write reads as one create (its hidden temporary file is not shown).
        ("create", "/w/api.txt"),
        ("delete", "/w/b.txt"),
    ];
    for (k, p) in want {
        assert!(seen.iter().any(|(sk, sp)| sk == k && sp == p), "no {k} {p} in {seen:?}");
    }
    assert!(!seen.iter().any(|(_, p)| p.starts_with("/elsewhere")), "only changes under the path: {seen:?}");
    assert!(!seen.iter().any(|(_, p)| p.contains(".volumefs-")), "no temporary files: {seen:?}");
    let mv = events.iter().find(|(_, k, _)| k == "move").unwrap();
    assert_eq!(mv.2["from"], "/w/a.txt");
    // Resume: changes made while no one watched arrive after the last id seen, and nothing before.
    let last = events.last().unwrap().0.clone();
    write(&mnt.join("w/later.txt"), b"while disconnected");
    let resumed = watch_events(&c, "?path=/w", Some(&last), |e| !e.is_empty(), || {});
    let paths: Vec<&str> = resumed.iter().filter_map(|(_, _, d)| d["path"].as_str()).collect();
    assert_eq!(paths.first(), Some(&"/w/later.txt"), "{resumed:?}");
    assert!(!paths.contains(&"/w/a.txt"), "nothing from before the resume point: {resumed:?}");
    // An id of another volume (or a recreated one) is a `truncated` notice, then live events.
    let other = watch_events(&c, "", Some("999999-1"), |e| !e.is_empty(), || {});
    assert_eq!(other[0].1, "truncated", "{other:?}");
}

/// Tenants: each token sees and touches only its own volumes and sandboxes (another tenant's
/// volume is 404, not 403), gets its default cap, and cannot set caps or make tenants.
#[test]
fn tenants_are_isolated() {
    let c = Cluster::new();
    let mk = |name: &str, cap: &str| -> String {
        let (code, body) = call(
            &c,
            &["-H", "Content-Type: application/json", "-d", &format!(r#"{{"name":"{name}","default_cap":"{cap}"}}"#), "{base}/v1/tenants"],
        );
        assert_eq!(code, 201, "{body}");
        json(&body)["token"].as_str().unwrap().to_string()
    };
    let (acme, globex) = (mk("acme", "64MiB"), mk("globex", "32MiB"));
    let as_ = |token: &str, args: &[&str]| -> (u16, String) {
        let mut all = vec!["-sS", "-w", "\n%{http_code}", "-H"];
        let auth = format!("Authorization: Bearer {token}");
        all.push(&auth);
        let base = format!("http://{}", c.addr);
        let owned: Vec<String> = args.iter().map(|a| a.replace("{base}", &base)).collect();
        all.extend(owned.iter().map(String::as_str));
        let out = Command::new("curl").args(&all).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.parse().unwrap(), body.to_string())
    };
    let json_post = |token: &str, route: &str, body: &str| as_(token, &["-H", "Content-Type: application/json", "-d", body, route]);
    // Both tenants make a volume called `data`: separate namespaces, no conflict.
    let (code, body) = json_post(&acme, "{base}/v1/volumes", r#"{"name":"data"}"#);
    assert_eq!(code, 201, "{body}");
    assert_eq!(
        (json(&body)["name"].as_str(), json(&body)["cap_bytes"].as_u64()),
        (Some("data"), Some(64 << 20)),
        "the tenant's default cap"
    );
    let (code, body) = json_post(&globex, "{base}/v1/volumes", r#"{"name":"data"}"#);
    assert_eq!((code, json(&body)["cap_bytes"].as_u64()), (201, Some(32 << 20)), "{body}");
    let (code, body) = json_post(&acme, "{base}/v1/volumes", r#"{"name":"big","cap":"1GiB"}"#);
    assert_eq!(code, 403, "only the operator sets caps: {body}");
    // Each writes its own file; each sees only its own.
    let f = c.path("acme.txt");
    std::fs::write(&f, b"acme's").unwrap();
    let (code, _) = as_(&acme, &["-T", f.to_str().unwrap(), "{base}/v1/volumes/data/files/secret.txt"]);
    assert_eq!(code, 200);
    let (code, body) = as_(&globex, &["{base}/v1/volumes/data/files/secret.txt"]);
    assert_eq!(code, 404, "globex's own `data` has no such file: {body}");
    let (code, body) = as_(&acme, &["{base}/v1/volumes/data/files/secret.txt"]);
    assert_eq!((code, body.as_str()), (200, "acme's"));
    // Spelling another tenant's namespace does not reach it: 404.
    for path in ["{base}/v1/volumes/acme~data/files/secret.txt", "{base}/v1/volumes/acme%7Edata/stat?path=/secret.txt"] {
        let (code, body) = as_(&globex, &[path]);
        assert_eq!(code, 404, "{path}: {body}");
    }
    let (code, body) = json_post(&globex, "{base}/v1/volumes", r#"{"name":"acme~data"}"#);
    assert_eq!(code, 400, "{body}");
    // Lists: own objects only, by their own names; errors name them the same way.
    let (_, body) = as_(&acme, &["{base}/v1/volumes"]);
    let names: Vec<String> = json(&body).as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, ["data"]);
    let (code, body) = as_(&acme, &["{base}/v1/volumes/nope"]);
    assert!(code == 404 && json(&body)["message"].as_str().unwrap().contains("`nope`"), "{body}");
    let (code, _) = json_post(&acme, "{base}/v1/sandboxes", r#"{"name":"sb"}"#);
    assert_eq!(code, 201);
    let (code, body) = json_post(&acme, "{base}/v1/sandboxes/sb/attachments", r#"{"volume":"data","path":"/mnt/data"}"#);
    assert_eq!(code, 201, "{body}");
    assert_eq!((json(&body)["volume"].as_str(), json(&body)["sandbox"].as_str()), (Some("data"), Some("sb")));
    let (_, body) = as_(&globex, &["{base}/v1/sandboxes"]);
    assert_eq!(body.trim(), "[]", "globex sees no sandboxes");
    let (code, _) = json_post(&globex, "{base}/v1/sandboxes/sb/attachments", r#"{"volume":"data","path":"/mnt/x"}"#);
    assert_eq!(code, 404, "cannot attach to another tenant's sandbox");
    // Tenants cannot make tenants; the operator sees everyone's objects by their full names.
    let (code, _) = json_post(&acme, "{base}/v1/tenants", r#"{"name":"evil"}"#);
    assert_eq!(code, 403);
    let mut all: Vec<String> = c.volumes().into_iter().map(|v| v.name).collect();
    all.sort();
    assert_eq!(all, ["acme~data", "globex~data"]);
    let (code, _) = as_("wrong-token", &["{base}/v1/volumes"]);
    assert_eq!(code, 401);
}

/// `/openapi.json` (no token needed) describes the API, and every operation it lists is one the
/// server routes (none answers "no route" or 405).
#[test]
fn openapi_document_matches_the_router() {
    let c = Cluster::new();
    let out = curl_with(&c, true, &["-f", "{base}/openapi.json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc = json(&String::from_utf8_lossy(&out.stdout));
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let paths = doc["paths"].as_object().unwrap();
    let mut n = 0;
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            // Booting a VM is not a route check; names that exist nowhere keep every call harmless.
            if path.ends_with("/run") {
                continue;
            }
            let concrete = path
                .replace("{v}", "nope")
                .replace("{s}", "nope")
                .replace("{path}", "x")
                .replace("{id}", "00000000000000000000000000000000");
            let url = format!("{{base}}{concrete}");
            // curl's `-X HEAD` waits for a body that HEAD never has: -I asks properly.
            let upper = method.to_uppercase();
            let how: Vec<&str> = if upper == "HEAD" { vec!["-I"] } else { vec!["-X", &upper] };
            let (code, body) = call(&c, &[how.as_slice(), &["-H", "Tus-Resumable: 1.0.0", &url]].concat());
            assert!(code != 405 && !body.contains("no route for"), "{method} {path}: {code} {body}");
            n += 1;
        }
    }
    assert!(n >= 40, "only {n} operations listed");
}

/// `volumefs volume upload` of a large file goes through tus and resumes on its own: the server
/// is killed (SIGKILL) mid-upload and started again on the same address, and the CLI, asking the
/// server how far it got, sends only the rest.
#[test]
fn cli_upload_resumes_across_a_server_crash() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let mut c = Cluster::with_server_args(&["--http", &addr]);
    c.create_volume("v", None);
    let size = 512usize << 20;
    let local = c.path("big.bin");
    std::fs::write(&local, pattern(size, 9)).unwrap();
    let state = c.path("state");
    let child = Command::new(crate::harness::SERVER_BIN)
        .args(["volume", "upload", local.to_str().unwrap(), "v", "/big.bin", "-q"])
        .env("VOLUMEFS_SERVER", format!("http://{addr}"))
        .env("VOLUMEFS_TOKEN", &c.token)
        .env("XDG_STATE_HOME", &state)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = eventually(Duration::from_secs(60), || c.volume_used("v") >= 64 << 20);
    assert!(started.is_some(), "the upload did not get going");
    c.kill_server();
    std::thread::sleep(Duration::from_millis(500));
    c.start_server();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the upload failed: {stderr}\nserver:\n{}", c.server_log());
    let resumed_at: u64 = stderr
        .lines()
        .find_map(|l| l.split("resuming at byte ").nth(1)?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("the CLI did not resume: {stderr}"));
    eprintln!("http_api: CLI upload of {} MiB resumed at {:.1} MiB after the server was killed", size >> 20, resumed_at as f64 / 1048576.0);
    assert!(resumed_at > 0, "resumed from the server's offset, not from zero");
    let out = c.cli_output(&["volume", "read", "v", "/big.bin"]);
    assert!(out.status.success());
    assert!(out.stdout == pattern(size, 9), "the uploaded file differs");
    assert_eq!(c.volume_used("v"), size as u64, "no leftover hidden upload file");
}

/// The CLI's side of tenants and watch: `tenant create` prints a token that works as
/// VOLUMEFS_TOKEN with the tenant's default cap, and `volume watch` prints changes as they happen.
#[test]
fn cli_tenants_and_watch() {
    let c = Cluster::new();
    let token = c.cli(&["tenant", "create", "acme", "--default-cap", "64MiB"]).trim().to_string();
    assert_eq!(token.len(), 64, "{token}");
    let as_acme = |args: &[&str]| -> Output {
        Command::new(crate::harness::SERVER_BIN)
            .args(args)
            .env("VOLUMEFS_SERVER", format!("http://{}", c.addr))
            .env("VOLUMEFS_TOKEN", &token)
            .output()
            .unwrap()
    };
    let out = as_acme(&["volume", "create", "data"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "created volume data (64.0 MiB)", "{}", String::from_utf8_lossy(&out.stderr));
    let out = as_acme(&["volume", "create", "big", "--cap", "1GiB"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("only the operator sets"));
    assert!(c.cli(&["tenant", "list"]).contains("acme"));
    let out = as_acme(&["tenant", "list"]);
    assert!(!out.status.success(), "tenants do not list tenants");
    assert_eq!(c.volumes().into_iter().map(|v| v.name).collect::<Vec<_>>(), ["acme~data"]);
    // watch, as the tenant, while the operator writes into acme's volume.
    let mut child = Command::new(crate::harness::SERVER_BIN)
        .args(["volume", "watch", "data", "/d", "--count", "2"])
        .env("VOLUMEFS_SERVER", format!("http://{}", c.addr))
        .env("VOLUMEFS_TOKEN", &token)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    put(&c, "acme~data", "/elsewhere", b"x");
    let (code, _) =
        call(&c, &["-H", "Content-Type: application/json", "-d", r#"{"path":"/d","parents":true}"#, "{base}/v1/volumes/acme~data/mkdir"]);
    assert_eq!(code, 200);
    put(&c, "acme~data", "/d/f", b"y");
    let done = eventually(Duration::from_secs(20), || child.try_wait().unwrap().is_some());
    if done.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    assert!(done.is_some(), "watch did not see 2 changes: {lines:?}");
    assert_eq!(lines, ["create /d", "create /d/f"], "one create per API write, no temporary files");
    assert_eq!(lines[0], "create /d", "{lines:?}");
    assert!(lines.iter().all(|l| l.contains("/d")), "only changes under /d: {lines:?}");
}

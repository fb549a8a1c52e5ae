//! The file verbs of `volumefs volume` over the HTTP API's file routes (src/server/http.rs):
//! read, write, batch-write, mv, rm, mkdir, edit, ls, stat, exists, search, replace, upload,
//! download, url. Contents stream both ways ([`super::client`]); trees travel as tar streams,
//! made on the fly from a local directory ([`super::tree`]) or unpacked into one as they arrive.

use super::args::{ArchiveFormat, ByteRange, FileVerb};
use super::client::{self, ApiError, Client, Download};
use super::progress::{Progress, ReadProgress, WriteProgress};
use super::{human, print_json, tree, Api};
use serde_json::{json, Value};
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

const OCTETS: &str = "application/octet-stream";

fn files_url(volume: &str, path: &str) -> String {
    format!("/v1/volumes/{}/files/{}", client::segment(volume), client::path(path))
}

/// `/v1/volumes/VOLUME/ROUTE`, `route` with its query already encoded.
fn vol_url(volume: &str, route: &str) -> String {
    format!("/v1/volumes/{}/{route}", client::segment(volume))
}

fn msg(e: ApiError) -> String {
    e.msg
}

/// Runs a file verb; its exit code.
pub(super) fn run(api: &Api, verb: FileVerb) -> Result<i32, String> {
    match verb {
        FileVerb::Read { volume, path, range, quiet } => read(api, &volume, &path, range.as_ref(), quiet.quiet)?,
        FileVerb::Write { volume, path, from, parents, append, quiet, json } => {
            let v = write(api, &volume, &path, from.as_deref(), parents, append, quiet.quiet)?;
            if json {
                print_json(&v);
            } else if append {
                println!(
                    "appended {} to {path} (now {})",
                    human(v["appended"].as_u64().unwrap_or(0)),
                    human(v["size"].as_u64().unwrap_or(0))
                );
            } else {
                println!("wrote {path} ({})", human(v["size"].as_u64().unwrap_or(0)));
            }
        }
        FileVerb::BatchWrite { volume, to, tar, json_input, quiet } => {
            let (content_type, source) = match (tar, json_input) {
                (Some(t), _) => ("application/x-tar", t),
                (None, Some(j)) => ("application/json", j),
                (None, None) => return Err("give --tar FILE or --json FILE (- for stdin)".into()),
            };
            let url = format!("{}?path={}", vol_url(&volume, "batch"), client::query(&to));
            let v = send_from(&api.client()?, "POST", &url, content_type, Path::new(&source), quiet.quiet)?;
            println!("{}", imported(&v, &to));
        }
        FileVerb::Mv { volume, from, to, json } => {
            let v = api.call("POST", &vol_url(&volume, "move"), Some(json!({"from": from, "to": to})))?;
            done(json, &v, || format!("moved {from} to {to}"));
        }
        FileVerb::Rm { volume, path, recursive, json } => {
            let v = api.call("POST", &vol_url(&volume, "remove"), Some(json!({"path": path, "recursive": recursive})))?;
            let n = v["entries"].as_u64().unwrap_or(1);
            done(json, &v, || if n > 1 { format!("removed {path} ({n} entries)") } else { format!("removed {path}") });
        }
        FileVerb::Mkdir { volume, path, parents, json } => {
            let v = api.call("POST", &vol_url(&volume, "mkdir"), Some(json!({"path": path, "parents": parents})))?;
            done(json, &v, || format!("created {path}"));
        }
        FileVerb::Edit { volume, path, find, replace, json } => {
            let v = api.call("POST", &vol_url(&volume, "edit"), Some(json!({"path": path, "find": find, "replace": replace})))?;
            done(json, &v, || format!("edited {path} (now {})", human(v["size"].as_u64().unwrap_or(0))));
        }
        FileVerb::Ls { volume, path, recursive, json } => {
            let r = if recursive { "&recursive=true" } else { "" };
            let v = api.call("GET", &vol_url(&volume, &format!("list?path={}{r}", client::query(&path))), None)?;
            if json {
                print_json(&v);
            } else {
                print!("{}", listing(v["entries"].as_array().map(Vec::as_slice).unwrap_or_default()));
            }
            if v["truncated"] == true {
                eprintln!("volumefs: the listing was cut short (too many entries); list a smaller directory");
            }
        }
        FileVerb::Stat { volume, path, json } => {
            let v = api.call("GET", &vol_url(&volume, &format!("stat?path={}", client::query(&path))), None)?;
            if json {
                print_json(&v);
            } else {
                print!("{}", stat_text(&v));
            }
        }
        FileVerb::Exists { volume, path } => return Ok(exists(api, &volume, &path)),
        FileVerb::Search { volume, path, name, content, limit, json } => {
            let mut q = format!("search?path={}", client::query(&path));
            if let Some(n) = &name {
                q.push_str(&format!("&name={}", client::query(n)));
            }
            if let Some(c) = &content {
                q.push_str(&format!("&content={}", client::query(c)));
            }
            if let Some(l) = limit {
                q.push_str(&format!("&limit={l}"));
            }
            let v = api.call("GET", &vol_url(&volume, &q), None)?;
            if json {
                print_json(&v);
            } else {
                for m in v["matches"].as_array().into_iter().flatten() {
                    let p = m["path"].as_str().unwrap_or("");
                    match m.get("line") {
                        Some(n) => println!("{p}:{n}:{}", m["text"].as_str().unwrap_or("")),
                        None => println!("{p}"),
                    }
                }
                if v["truncated"] == true {
                    eprintln!("volumefs: more matches than the limit; raise --limit to see them");
                }
            }
        }
        FileVerb::Replace { volume, path, find, replace, name, json } => {
            let mut body = json!({"path": path, "find": find, "replace": replace});
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            let v = api.call("POST", &vol_url(&volume, "replace"), Some(body))?;
            if json {
                print_json(&v);
            } else {
                let changed = v["changed"].as_array().map(Vec::as_slice).unwrap_or_default();
                let mut total = 0;
                for f in changed {
                    let n = f["replacements"].as_u64().unwrap_or(0);
                    total += n;
                    println!("{}: {n} {}", f["path"].as_str().unwrap_or(""), plural(n, "replacement", "replacements"));
                }
                let files = changed.len() as u64;
                println!("{total} {} in {files} {}", plural(total, "replacement", "replacements"), plural(files, "file", "files"));
            }
        }
        FileVerb::Upload { local, volume, path, parents, quiet, json } => {
            let v = upload(api, &local, &volume, &path, parents, quiet.quiet)?;
            if json {
                print_json(&v);
            } else if v.get("files").is_some() {
                println!("{}", imported(&v, &path));
            } else {
                println!("uploaded {} to {path} ({})", local.display(), human(v["size"].as_u64().unwrap_or(0)));
            }
        }
        FileVerb::Download { volume, path, local, archive, quiet } => download(api, &volume, &path, &local, archive, quiet.quiet)?,
        FileVerb::Watch { volume, path, count, json } => watch(api, &volume, &path, count, json)?,
        FileVerb::Url { volume, path, archive, expires, json } => {
            let mut body = json!({"path": path, "expires_secs": expires});
            if let Some(a) = archive {
                body["archive"] = json!(a.name());
            }
            let v = api.call("POST", &vol_url(&volume, "signed-url"), Some(body))?;
            if json {
                print_json(&v);
            } else {
                println!("{}", v["url"].as_str().unwrap_or(""));
            }
        }
    }
    Ok(0)
}

/// `watch`: Server-Sent Events from `/watch`, one line per change; after a dropped connection it
/// reconnects with the last event id, so nothing is missed or printed twice.
fn watch(api: &Api, volume: &str, path: &str, count: Option<u64>, json: bool) -> Result<(), String> {
    use std::io::{BufRead, Write};
    let client = api.client()?;
    let url = format!("{}?path={}", vol_url(volume, "watch"), client::query(path));
    let mut last: Option<String> = None;
    let mut printed = 0u64;
    let mut failures = 0;
    loop {
        let headers: Vec<(&str, &str)> = last.as_deref().map(|id| vec![("Last-Event-ID", id)]).unwrap_or_default();
        let d = match client.download(&url, &headers) {
            Ok(d) => d,
            Err(e) if e.status == 0 && failures < 30 => {
                failures += 1;
                std::thread::sleep(std::time::Duration::from_secs(1));
                continue;
            }
            Err(e) => return Err(e.msg),
        };
        failures = 0;
        let (mut id, mut kind, mut data) = (None, String::new(), String::new());
        for line in std::io::BufReader::new(d.reader()).lines() {
            let Ok(line) = line else { break }; // dropped: reconnect
            if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.to_string());
            } else if let Some(v) = line.strip_prefix("event: ") {
                kind = v.to_string();
            } else if let Some(v) = line.strip_prefix("data: ") {
                data = v.to_string();
            } else if line.is_empty() && !kind.is_empty() {
                let v: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
                let mut out = std::io::stdout().lock();
                let shown = if json {
                    data.clone()
                } else {
                    match (kind.as_str(), v["from"].as_str()) {
                        ("move", Some(from)) => format!("move {from} -> {}", v["path"].as_str().unwrap_or("")),
                        ("truncated" | "deleted", _) => format!("{kind}: {}", v["message"].as_str().unwrap_or("")),
                        (k, _) => format!("{k} {}", v["path"].as_str().unwrap_or("")),
                    }
                };
                if writeln!(out, "{shown}").and_then(|_| out.flush()).is_err() {
                    return Ok(()); // stdout closed
                }
                if kind == "deleted" {
                    return Ok(());
                }
                last = id.take().or(last);
                kind.clear();
                data.clear();
                printed += 1;
                if count.is_some_and(|n| printed >= n) {
                    return Ok(());
                }
            }
        }
    }
}

fn plural<'a>(n: u64, one: &'a str, more: &'a str) -> &'a str {
    if n == 1 {
        one
    } else {
        more
    }
}

/// The server's answer as JSON, or a line for people.
fn done(json: bool, v: &Value, line: impl FnOnce() -> String) {
    if json {
        print_json(v);
    } else {
        println!("{}", line());
    }
}

/// The summary of a batch import.
fn imported(v: &Value, to: &str) -> String {
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    format!(
        "wrote {} {}, {} {} ({}) below {to}; {} new {}",
        n("files"),
        plural(n("files"), "file", "files"),
        n("symlinks"),
        plural(n("symlinks"), "symlink", "symlinks"),
        human(n("bytes")),
        n("dirs"),
        plural(n("dirs"), "directory", "directories"),
    )
}

// ----- contents -------------------------------------------------------------------------------

/// Copies a download to `out` as it arrives. A reader that breaks off is an error that says so;
/// a closed stdout (`| head`) ends the copy quietly.
fn copy_out(mut from: impl Read, out: &mut dyn Write, to_stdout: bool) -> Result<u64, String> {
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("the download broke off after {total} bytes: {e}")),
        };
        match out.write_all(&buf[..n]) {
            Ok(()) => total += n as u64,
            Err(e) if to_stdout && e.kind() == io::ErrorKind::BrokenPipe => return Ok(total),
            Err(e) => return Err(format!("writing the download: {e}")),
        }
    }
    match out.flush() {
        Err(e) if !(to_stdout && e.kind() == io::ErrorKind::BrokenPipe) => Err(format!("writing the download: {e}")),
        _ => Ok(total),
    }
}

fn read(api: &Api, volume: &str, path: &str, range: Option<&ByteRange>, quiet: bool) -> Result<(), String> {
    let headers: Vec<(&str, &str)> = range.map(|r| vec![("range", r.0.as_str())]).unwrap_or_default();
    let d = api.client()?.download(&files_url(volume, path), &headers).map_err(|e| match (e.status, range) {
        (416, Some(r)) => format!("cannot read {}: {}", r.0, e.msg),
        _ => e.msg,
    })?;
    let progress = Progress::new(path, d.len, quiet);
    let mut out = WriteProgress { inner: io::stdout().lock(), progress };
    copy_out(d.reader(), &mut out, true)?;
    Ok(())
}

/// What an upload reads: a file or stdin.
struct Source {
    reader: Box<dyn Read>,
    /// The size, when it is known before reading (a regular file).
    len: Option<u64>,
    label: String,
}

/// Opens `source` (`-`: stdin) for an upload.
fn open_source(source: &Path) -> Result<Source, String> {
    if source == Path::new("-") {
        return Ok(Source { reader: Box::new(io::stdin().lock()), len: None, label: "stdin".into() });
    }
    let f = fs::File::open(source).map_err(|e| format!("cannot open {}: {e}", source.display()))?;
    let md = f.metadata().map_err(|e| format!("cannot stat {}: {e}", source.display()))?;
    if md.is_dir() {
        return Err(format!("{} is a directory", source.display()));
    }
    // Regular files have a size to announce; pipes and devices are sent as they come.
    let len = md.is_file().then_some(md.len());
    Ok(Source { reader: Box::new(f), len, label: source.display().to_string() })
}

/// Sends `source` as the body of a request, streamed; the JSON answer. A source that fails to
/// read is reported as such rather than as the broken request it causes.
fn send(client: &Client, method: &str, url: &str, content_type: &str, source: Source, quiet: bool) -> Result<Value, String> {
    let Source { reader, len, label } = source;
    let mut body = ReadProgress::new(reader, Progress::new(&label, len, quiet), len);
    let r = client.upload(method, url, content_type, len, &mut body);
    body.progress.finish();
    match (r, body.failed.take()) {
        (Err(_), Some(local)) => Err(format!("reading {label}: {local}")),
        (r, _) => r.map_err(msg),
    }
}

fn send_from(client: &Client, method: &str, url: &str, content_type: &str, source: &Path, quiet: bool) -> Result<Value, String> {
    send(client, method, url, content_type, open_source(source)?, quiet)
}

fn write(api: &Api, volume: &str, path: &str, from: Option<&Path>, parents: bool, append: bool, quiet: bool) -> Result<Value, String> {
    let (method, q) = match (append, parents) {
        (true, _) => ("POST", "?append"),
        (false, true) => ("PUT", "?parents=true"),
        (false, false) => ("PUT", ""),
    };
    let url = format!("{}{q}", files_url(volume, path));
    send_from(&api.client()?, method, &url, OCTETS, from.unwrap_or(Path::new("-")), quiet)
}

/// `file write` (the old name): stdin to the file, parents made, nothing printed.
pub(super) fn write_quietly(api: &Api, volume: &str, path: &str, append: bool) -> Result<(), String> {
    write(api, volume, path, None, true, append, true).map(|_| ())
}

// ----- queries --------------------------------------------------------------------------------

/// `exists`: 0 present, 1 absent, 2 for anything else (with the message).
fn exists(api: &Api, volume: &str, path: &str) -> i32 {
    let fail = |m: String| {
        eprintln!("volumefs: {m}");
        2
    };
    let client = match api.client() {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    match client.call("GET", &vol_url(volume, &format!("stat?path={}", client::query(path))), None) {
        Ok(_) => 0,
        // A name below a file does not exist either (`test -e file/x`).
        Err(e) if e.code == "NotADirectory" => 1,
        Err(e) if e.code == "NotFound" => {
            // The volume itself missing is an error, not an absent path.
            match client.call("GET", &format!("/v1/volumes/{}?fields=name", client::segment(volume)), None) {
                Ok(_) => 1,
                Err(v) => fail(v.msg),
            }
        }
        Err(e) => fail(e.msg),
    }
}

/// `-rw-r--r--` of a kind (as the API names it) and permission bits.
pub fn mode_string(kind: &str, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(match kind {
        "dir" => 'd',
        "symlink" => 'l',
        "fifo" => 'p',
        "socket" => 's',
        "chardev" => 'c',
        "blockdev" => 'b',
        _ => '-',
    });
    for (shift, special, lower, upper) in [(6, 0o4000, 's', 'S'), (3, 0o2000, 's', 'S'), (0, 0o1000, 't', 'T')] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(match (bits & 1 != 0, mode & special != 0) {
            (true, true) => lower,
            (false, true) => upper,
            (true, false) => 'x',
            (false, false) => '-',
        });
    }
    s
}

/// `2024-05-01 13:07` (UTC) of seconds since the epoch.
pub fn utc(secs: f64) -> String {
    let (y, mo, d, h, mi, _) = crate::fs::utc_parts(secs.floor() as i64);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}")
}

/// `ls` for people: mode, size, mtime, path (and a symlink's target).
fn listing(entries: &[Value]) -> String {
    let width = entries.iter().map(|e| e["size"].as_u64().unwrap_or(0).to_string().len()).max().unwrap_or(1);
    let mut out = String::new();
    for e in entries {
        let mode = mode_string(e["kind"].as_str().unwrap_or(""), e["mode"].as_u64().unwrap_or(0) as u32);
        let target = e["target"].as_str().map(|t| format!(" -> {t}")).unwrap_or_default();
        out.push_str(&format!(
            "{mode} {:>width$} {} {}{target}\n",
            e["size"].as_u64().unwrap_or(0),
            utc(e["mtime"].as_f64().unwrap_or(0.0)),
            e["path"].as_str().unwrap_or("")
        ));
    }
    out
}

fn stat_text(v: &Value) -> String {
    let mode = v["mode"].as_u64().unwrap_or(0) as u32;
    let time = |k: &str| {
        let t = v[k].as_f64().unwrap_or(0.0);
        format!("{} UTC ({t:.3})", utc(t))
    };
    let mut out = format!("path:  {}\n", v["path"].as_str().unwrap_or(""));
    out.push_str(&format!("kind:  {}\n", v["kind"].as_str().unwrap_or("")));
    if let Some(t) = v["target"].as_str() {
        out.push_str(&format!("target: {t}\n"));
    }
    out.push_str(&format!("size:  {}\n", v["size"].as_u64().unwrap_or(0)));
    out.push_str(&format!("mode:  {} ({mode:04o})\n", mode_string(v["kind"].as_str().unwrap_or(""), mode)));
    out.push_str(&format!("owner: uid {}, gid {}\n", v["uid"], v["gid"]));
    out.push_str(&format!("links: {}\n", v["nlink"]));
    out.push_str(&format!("inode: {}\n", v["ino"]));
    out.push_str(&format!("mtime: {}\n", time("mtime")));
    out.push_str(&format!("atime: {}\n", time("atime")));
    out.push_str(&format!("ctime: {}\n", time("ctime")));
    out
}

// ----- trees ----------------------------------------------------------------------------------

fn upload(api: &Api, local: &Path, volume: &str, path: &str, parents: bool, quiet: bool) -> Result<Value, String> {
    let client = api.client()?;
    let put = format!("{}{}", files_url(volume, path), if parents { "?parents=true" } else { "" });
    if local == Path::new("-") {
        return send_from(&client, "PUT", &put, OCTETS, local, quiet);
    }
    let md = fs::metadata(local).map_err(|e| format!("cannot read {}: {e}", local.display()))?;
    if md.is_file() && md.len() >= super::tus::THRESHOLD {
        return super::tus::upload(&client, &api.server_url(), volume, path, local, parents, quiet);
    }
    if !md.is_dir() {
        return send_from(&client, "PUT", &put, OCTETS, local, quiet);
    }
    let entries = tree::scan(local)?;
    let progress = Progress::new(&local.display().to_string(), Some(tree::tar_size(&entries)), quiet);
    let (reader, job) = tree::tar_stream(entries);
    let mut body = ReadProgress::new(reader, progress, None);
    let url = format!("{}?path={}", vol_url(volume, "batch"), client::query(path));
    let r = client.upload("POST", &url, "application/x-tar", None, &mut body);
    body.progress.finish();
    // Dropping the reader lets a tar writer that the request left behind stop.
    drop(body);
    match (job.join(), r) {
        (Ok(Err(tree::TarError::Local(e))), _) => Err(format!("reading {}: {e}", local.display())),
        (Err(_), _) => Err("the tar writer crashed".into()),
        (_, r) => r.map_err(msg),
    }
}

fn download(api: &Api, volume: &str, path: &str, local: &Path, archive: Option<ArchiveFormat>, quiet: bool) -> Result<(), String> {
    let client = api.client()?;
    let to_stdout = local == Path::new("-");
    let archive_url = |f: ArchiveFormat| format!("{}?path={}&format={}", vol_url(volume, "archive"), client::query(path), f.name());
    if let Some(f) = archive {
        let d = client.download(&archive_url(f), &[]).map_err(msg)?;
        let n = save(d, path, local, None, quiet)?;
        if !to_stdout {
            println!("downloaded {path} as {} to {} ({})", f.name(), local.display(), human(n));
        }
        return Ok(());
    }
    let st = client.call("GET", &vol_url(volume, &format!("stat?path={}", client::query(path))), None).map_err(msg)?;
    match st["kind"].as_str().unwrap_or("") {
        "file" => {
            let d = client.download(&files_url(volume, path), &[]).map_err(msg)?;
            let dest = if !to_stdout && local.is_dir() {
                local.join(st["name"].as_str().filter(|n| !n.is_empty()).unwrap_or("download"))
            } else {
                local.to_path_buf()
            };
            let n = save(d, path, &dest, Some(&st), quiet)?;
            if !to_stdout {
                println!("downloaded {path} to {} ({})", dest.display(), human(n));
            }
            Ok(())
        }
        "dir" if to_stdout => Err(format!("{path} is a directory: add --archive tar|tar.gz|zip to write an archive of it to stdout")),
        "dir" => {
            let d = client.download(&archive_url(ArchiveFormat::Tar), &[]).map_err(msg)?;
            let progress = Progress::new(path, None, quiet);
            let root = st["path"].as_str() == Some("/");
            let n = tree::unpack(ReadProgress::new(d.reader(), progress, None), local, !root)?;
            println!("downloaded {path} to {} ({n} {})", local.display(), plural(n, "entry", "entries"));
            Ok(())
        }
        "symlink" if !to_stdout => {
            let target = st["target"].as_str().unwrap_or("");
            std::os::unix::fs::symlink(target, local).map_err(|e| format!("cannot make the symlink {}: {e}", local.display()))
        }
        kind => Err(format!("{path} is a {kind}: only files, directories (and symlinks, not to stdout) download")),
    }
}

/// Writes a download to `dest` (or stdout for `-`): to a hidden file beside it that is renamed
/// over it at the end, so a broken download leaves `dest` as it was. `meta` (a file's stat)
/// gives the file its mode and modification time. Returns how many bytes were written.
fn save(d: Download, label: &str, dest: &Path, meta: Option<&Value>, quiet: bool) -> Result<u64, String> {
    let progress = Progress::new(label, d.len, quiet);
    if dest == Path::new("-") {
        let mut out = WriteProgress { inner: io::stdout().lock(), progress };
        return copy_out(d.reader(), &mut out, true);
    }
    let name = dest.file_name().ok_or_else(|| format!("{} is not a file name", dest.display()))?.to_string_lossy().into_owned();
    let dir = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp: PathBuf = dir.join(format!(".{name}.volumefs-{}", std::process::id()));
    let result = (|| {
        let f = fs::File::create(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        let mut out = WriteProgress { inner: io::BufWriter::with_capacity(256 << 10, f), progress };
        let n = copy_out(d.reader(), &mut out, false)?;
        out.progress.finish();
        let f = out.inner.into_inner().map_err(|e| format!("writing {}: {}", dest.display(), e.error()))?;
        if let Some(st) = meta {
            use std::os::unix::fs::PermissionsExt;
            if let Some(mode) = st["mode"].as_u64() {
                f.set_permissions(fs::Permissions::from_mode(mode as u32 & 0o7777)).map_err(|e| format!("{}: {e}", dest.display()))?;
            }
            if let Some(t) = st["mtime"].as_f64().filter(|t| *t >= 0.0) {
                f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(t))
                    .map_err(|e| format!("{}: {e}", dest.display()))?;
            }
        }
        fs::rename(&tmp, dest).map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), dest.display()))?;
        Ok(n)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_as_ls_shows_them() {
        assert_eq!(mode_string("file", 0o644), "-rw-r--r--");
        assert_eq!(mode_string("dir", 0o755), "drwxr-xr-x");
        assert_eq!(mode_string("symlink", 0o777), "lrwxrwxrwx");
        assert_eq!(mode_string("file", 0o4755), "-rwsr-xr-x");
        assert_eq!(mode_string("file", 0o2640), "-rw-r-S---");
        assert_eq!(mode_string("dir", 0o1777), "drwxrwxrwt");
        assert_eq!(mode_string("fifo", 0o600), "prw-------");
    }

    #[test]
    fn times_in_utc() {
        assert_eq!(utc(0.0), "1970-01-01 00:00");
        assert_eq!(utc(1_000_000_000.9), "2001-09-09 01:46");
        assert_eq!(utc(951_782_400.0), "2000-02-29 00:00");
        assert_eq!(utc(-1.0), "1969-12-31 23:59");
    }

    #[test]
    fn listing_aligns_sizes_and_shows_link_targets() {
        let entries = [
            json!({"path": "/a", "kind": "file", "size": 5, "mode": 0o644, "mtime": 0.0}),
            json!({"path": "/big", "kind": "file", "size": 123456, "mode": 0o755, "mtime": 0.0}),
            json!({"path": "/l", "kind": "symlink", "size": 2, "mode": 0o777, "mtime": 0.0, "target": "a"}),
        ];
        assert_eq!(
            listing(&entries),
            "-rw-r--r--      5 1970-01-01 00:00 /a\n-rwxr-xr-x 123456 1970-01-01 00:00 /big\nlrwxrwxrwx      2 1970-01-01 00:00 /l -> a\n"
        );
    }
}

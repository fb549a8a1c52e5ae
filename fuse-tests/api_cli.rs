//! The file verbs of `volumefs volume` end to end: the real binary against a real server over
//! HTTP, no FUSE mount (so no root or /dev/fuse needed). Every outcome is checked through the
//! CLI itself or real tools (`unzip`, `curl`, `tar`): bytes read back, exit codes, JSON fields,
//! modes, symlinks and times of trees that went up and came back down.

use crate::harness::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, UNIX_EPOCH};

/// Runs the CLI with `input` on stdin (fed from a thread, so large outputs cannot deadlock).
fn cli_in(c: &Cluster, args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(SERVER_BIN)
        .args(args)
        .env("VOLUMEFS_SERVER", format!("http://{}", c.addr))
        .env("VOLUMEFS_TOKEN", &c.token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run volumefs CLI");
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    out
}

/// [`cli_in`], asserting success.
fn cli_in_ok(c: &Cluster, args: &[&str], input: &[u8]) -> Output {
    let out = cli_in(c, args, input);
    assert!(out.status.success(), "`volumefs {}` failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr));
    out
}

/// The bytes `volume read` prints.
fn read_bytes(c: &Cluster, vol: &str, path: &str, extra: &[&str]) -> Vec<u8> {
    let mut args = vec!["volume", "read", vol, path];
    args.extend_from_slice(extra);
    let out = c.cli_output(&args);
    assert!(out.status.success(), "volume read {vol} {path} {extra:?}: {}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stderr.is_empty(), "volume read printed on stderr (progress off a terminal?): {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

fn json(c: &Cluster, args: &[&str]) -> Value {
    let out = c.cli(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("`volumefs {}` is not JSON ({e}): {out}", args.join(" ")))
}

/// The exit code of `volume exists`, asserting it printed nothing on stdout.
fn exists(c: &Cluster, vol: &str, path: &str) -> i32 {
    let out = c.cli_output(&["volume", "exists", vol, path]);
    assert!(out.stdout.is_empty(), "exists printed {:?}", String::from_utf8_lossy(&out.stdout));
    out.status.code().expect("exit code")
}

/// The paths `volume ls -r --json` lists below `path`.
fn ls_paths(c: &Cluster, vol: &str, path: &str) -> Vec<String> {
    let v = json(c, &["volume", "ls", vol, path, "-r", "--json"]);
    v["entries"].as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap().to_string()).collect()
}

/// A tool on PATH, or a loud skip.
fn have(tool: &str) -> bool {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().map(|o| o.status.success()).unwrap_or(false);
    if !found {
        eprintln!("\n*** SKIPPED: `{tool}` is not installed (scripts/test.sh installs it with apt)\n");
    }
    found
}

#[test]
fn api_cli_read_write_ranges_append_and_exists() {
    let c = Cluster::new();
    c.create_volume("v", Some("64MiB"));
    // A binary file of a few MiB, written with --from and read back byte for byte.
    let data = pattern(3 * MIB as usize + 12_345, 7);
    let local = c.path("data.bin");
    write(&local, &data);
    let out = c.cli(&["volume", "write", "v", "/bin/data.bin", "--from", local.to_str().unwrap(), "-p"]);
    assert!(out.contains("/bin/data.bin"), "{out}");
    assert_bytes_eq("read back", &read_bytes(&c, "v", "/bin/data.bin", &[]), &data);
    // Ranges: START-END (both included), START-, -N; past the end is an error with the size.
    assert_bytes_eq("range 1000-1999", &read_bytes(&c, "v", "/bin/data.bin", &["--range", "1000-1999"]), &data[1000..2000]);
    let tail_from = data.len() - 777;
    assert_bytes_eq("range START-", &read_bytes(&c, "v", "/bin/data.bin", &["--range", &format!("{tail_from}-")]), &data[tail_from..]);
    assert_bytes_eq("range -N", &read_bytes(&c, "v", "/bin/data.bin", &["--range", "-100"]), &data[data.len() - 100..]);
    assert_bytes_eq("range past the end, cut", &read_bytes(&c, "v", "/bin/data.bin", &["--range", "10-99999999"]), &data[10..]);
    let err = c.cli_fail(&["volume", "read", "v", "/bin/data.bin", "--range", &format!("{}-", data.len())]);
    assert!(err.contains(&data.len().to_string()), "an unsatisfiable range names the size: {err}");
    assert_eq!(c.cli_output(&["volume", "read", "v", "/bin/data.bin", "--range", "5-2"]).status.code(), Some(2));

    // stdin, and the parents rule: without -p a missing directory is an error.
    let err = String::from_utf8_lossy(&cli_in(&c, &["volume", "write", "v", "/no/such/f"], b"x").stderr).into_owned();
    assert!(err.starts_with("volumefs: ") && err.contains("does not exist"), "{err}");
    assert_eq!(exists(&c, "v", "/no"), 1, "a failed write made its parent");
    cli_in_ok(&c, &["volume", "write", "v", "/t.txt"], b"one\n");
    cli_in_ok(&c, &["volume", "write", "v", "/t.txt"], b"two\n");
    assert_eq!(read_bytes(&c, "v", "/t.txt", &[]), b"two\n", "write replaces");
    cli_in_ok(&c, &["volume", "write", "v", "/t.txt", "--append"], b"three\n");
    let out = cli_in_ok(&c, &["volume", "write", "v", "/log/new.txt", "--append", "--json"], b"first\n");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["appended"].as_u64(), v["size"].as_u64()), (Some(6), Some(6)), "{v}");
    assert_eq!(read_bytes(&c, "v", "/t.txt", &[]), b"two\nthree\n");
    // An empty stdin is an empty file.
    cli_in_ok(&c, &["volume", "write", "v", "/empty"], b"");
    assert_eq!(read_bytes(&c, "v", "/empty", &[]), b"");

    // exists: 0 present (file or directory), 1 absent (a name below a file too), 2 for errors.
    assert_eq!(exists(&c, "v", "/bin/data.bin"), 0);
    assert_eq!(exists(&c, "v", "/bin"), 0);
    assert_eq!(exists(&c, "v", "/"), 0);
    assert_eq!(exists(&c, "v", "/bin/missing"), 1);
    assert_eq!(exists(&c, "v", "/t.txt/below-a-file"), 1);
    let out = c.cli_output(&["volume", "exists", "no-such-volume", "/x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-volume"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(exists(&c, "v", "/a/../etc"), 2, "a path with `..` is an error, not an absent path");

    // The old names still work: `file write` makes parents, `file read` prints the bytes.
    cli_in_ok(&c, &["file", "write", "v", "/old/style/f"], b"old scripts");
    let out = c.cli(&["file", "read", "v", "/old/style/f"]);
    assert_eq!(out, "old scripts");

    // Names that need percent-encoding, in the path and in query values.
    cli_in_ok(&c, &["volume", "write", "v", "/odd dir/a+b&c=d#e%f?.txt", "-p"], b"odd");
    assert_eq!(read_bytes(&c, "v", "/odd dir/a+b&c=d#e%f?.txt", &[]), b"odd");
    let st = json(&c, &["volume", "stat", "v", "/odd dir/a+b&c=d#e%f?.txt", "--json"]);
    assert_eq!(st["name"], "a+b&c=d#e%f?.txt", "{st}");
}

#[test]
fn api_cli_ls_stat_mkdir_mv_rm() {
    let c = Cluster::new();
    c.create_volume("v", None);
    assert!(c.cli(&["volume", "mkdir", "v", "/a/b/c", "-p"]).contains("/a/b/c"));
    let err = c.cli_fail(&["volume", "mkdir", "v", "/x/y"]);
    assert!(err.contains("does not exist"), "mkdir without -p: {err}");
    let err = c.cli_fail(&["volume", "mkdir", "v", "/a/b"]);
    assert!(err.contains("exists"), "mkdir of an existing directory: {err}");
    c.cli(&["volume", "mkdir", "v", "/a/b", "-p"]);
    cli_in_ok(&c, &["volume", "write", "v", "/a/f.txt"], b"12345");

    // stat: JSON fields, and the lines for people.
    let st = json(&c, &["volume", "stat", "v", "/a/f.txt", "--json"]);
    assert_eq!((st["path"].as_str(), st["name"].as_str(), st["kind"].as_str()), (Some("/a/f.txt"), Some("f.txt"), Some("file")));
    assert_eq!((st["size"].as_u64(), st["mode"].as_u64(), st["nlink"].as_u64()), (Some(5), Some(0o644), Some(1)));
    for k in ["uid", "gid", "ino"] {
        assert!(st[k].is_u64(), "stat lacks {k}: {st}");
    }
    let now = std::time::SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    for k in ["mtime", "atime", "ctime"] {
        let t = st[k].as_f64().unwrap_or_else(|| panic!("stat lacks {k}: {st}"));
        assert!((now - t).abs() < 600.0, "{k} {t} is not about now ({now})");
    }
    let text = c.cli(&["volume", "stat", "v", "/a"]);
    assert!(text.contains("kind:  dir") && text.contains("drwxr-xr-x (0755)"), "{text}");
    let err = c.cli_fail(&["volume", "stat", "v", "/a/nope"]);
    assert!(err.contains("/a/nope") && err.contains("does not exist"), "{err}");

    // ls: one level or all, JSON or lines with a mode string, size, time and path.
    let v = json(&c, &["volume", "ls", "v", "/a", "--json"]);
    let names: Vec<&str> = v["entries"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 2, "{v}");
    assert!(names.contains(&"b") && names.contains(&"f.txt"), "{v}");
    assert_eq!(v["truncated"], false);
    let mut all = ls_paths(&c, "v", "/");
    all.sort();
    assert_eq!(all, ["/a", "/a/b", "/a/b/c", "/a/f.txt"]);
    let text = c.cli(&["volume", "ls", "v", "/a"]);
    let line = text.lines().find(|l| l.ends_with(" /a/f.txt")).unwrap_or_else(|| panic!("no line for /a/f.txt:\n{text}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!((cols[0], cols[1]), ("-rw-r--r--", "5"), "{line}");
    assert!(cols[2].len() == 10 && cols[3].len() == 5, "date and time columns: {line}");
    assert!(text.lines().any(|l| l.starts_with("drwxr-xr-x") && l.ends_with(" /a/b")), "{text}");
    // ls of a file lists the file.
    assert_eq!(ls_paths(&c, "v", "/a/f.txt"), ["/a/f.txt"]);

    // mv: the old name is gone, the new one has the bytes; a directory moves with its contents.
    assert!(c.cli(&["volume", "mv", "v", "/a/f.txt", "/a/b/g.txt"]).contains("moved"));
    assert_eq!((exists(&c, "v", "/a/f.txt"), exists(&c, "v", "/a/b/g.txt")), (1, 0));
    assert_eq!(read_bytes(&c, "v", "/a/b/g.txt", &[]), b"12345");
    let v = json(&c, &["volume", "mv", "v", "/a/b", "/moved", "--json"]);
    assert_eq!((v["from"].as_str(), v["to"].as_str()), (Some("/a/b"), Some("/moved")));
    assert_eq!(read_bytes(&c, "v", "/moved/g.txt", &[]), b"12345");
    let err = c.cli_fail(&["volume", "mv", "v", "/nope", "/x"]);
    assert!(err.contains("/nope"), "{err}");

    // rm: a non-empty directory needs -r, which removes it all.
    let err = c.cli_fail(&["volume", "rm", "v", "/moved"]);
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(exists(&c, "v", "/moved/g.txt"), 0, "a refused rm removed something");
    let v = json(&c, &["volume", "rm", "v", "/moved", "-r", "--json"]);
    assert_eq!(v["entries"].as_u64(), Some(3), "/moved, /moved/c, /moved/g.txt: {v}");
    assert_eq!(exists(&c, "v", "/moved"), 1);
    c.cli(&["volume", "rm", "v", "/a"]);
    assert_eq!(ls_paths(&c, "v", "/"), Vec::<String>::new());
}

#[test]
fn api_cli_edit_search_and_replace() {
    let c = Cluster::new();
    c.create_volume("v", None);
    cli_in_ok(&c, &["volume", "write", "v", "/src/main.rs", "-p"], b"fn main() {\n    println!(\"hello\");\n}\n");
    cli_in_ok(&c, &["volume", "write", "v", "/src/lib.rs"], b"pub fn hello() {}\npub fn world() {}\n");
    cli_in_ok(&c, &["volume", "write", "v", "/docs/notes.md", "-p"], b"hello there\nhello again\n");
    cli_in_ok(&c, &["volume", "write", "v", "/docs/blob.bin"], &[0xff, 0xfe, b'h', b'e', b'l', b'l', b'o']);

    // edit: exactly one occurrence is replaced; none or two fail, say how many, change nothing.
    let out = c.cli(&["volume", "edit", "v", "/src/main.rs", "--find", "\"hello\"", "--replace", "\"bye\""]);
    assert!(out.contains("edited /src/main.rs"), "{out}");
    assert_eq!(read_bytes(&c, "v", "/src/main.rs", &[]), b"fn main() {\n    println!(\"bye\");\n}\n");
    let before = read_bytes(&c, "v", "/docs/notes.md", &[]);
    let err = c.cli_fail(&["volume", "edit", "v", "/docs/notes.md", "--find", "absent", "--replace", "x"]);
    assert!(err.contains("found 0"), "{err}");
    let err = c.cli_fail(&["volume", "edit", "v", "/docs/notes.md", "--find", "hello", "--replace", "x"]);
    assert!(err.contains("found 2"), "{err}");
    assert_eq!(read_bytes(&c, "v", "/docs/notes.md", &[]), before, "a failed edit changed the file");
    let out = c.cli_output(&["volume", "edit", "v", "/docs/notes.md", "--find", "absent", "--replace", "x"]);
    assert_eq!(out.status.code(), Some(1));

    // search by name: paths only.
    let out = c.cli(&["volume", "search", "v", "--name", "*.rs"]);
    let mut paths: Vec<&str> = out.lines().collect();
    paths.sort();
    assert_eq!(paths, ["/src/lib.rs", "/src/main.rs"]);
    // by content: path:line:text, as grep prints it; binary files are skipped.
    let out = c.cli(&["volume", "search", "v", "--content", "hel+o"]);
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    assert_eq!(lines, ["/docs/notes.md:1:hello there", "/docs/notes.md:2:hello again", "/src/lib.rs:1:pub fn hello() {}"]);
    let v = json(&c, &["volume", "search", "v", "/src", "--name", "*.rs", "--content", "fn \\w+\\(\\)", "--json"]);
    let m = v["matches"].as_array().unwrap();
    assert_eq!(m.len(), 3, "{v}");
    assert!(m.iter().all(|h| h["path"].as_str().unwrap().starts_with("/src/") && h["line"].is_u64() && h["text"].is_string()), "{v}");
    let v = json(&c, &["volume", "search", "v", "--content", "hello", "--limit", "1", "--json"]);
    assert_eq!((v["matches"].as_array().unwrap().len(), &v["truncated"]), (1, &Value::Bool(true)), "{v}");
    let err = c.cli_fail(&["volume", "search", "v", "--content", "("]);
    assert!(err.contains("regular expression"), "{err}");

    // replace: every match in the files the glob picks, with groups; a report per file.
    let out = c.cli(&["volume", "replace", "v", "/", "--find", "hello (\\w+)", "--replace", "bye ${1}!", "--name", "*.md"]);
    assert!(out.contains("/docs/notes.md: 2 replacements") && out.contains("2 replacements in 1 file"), "{out}");
    assert_eq!(read_bytes(&c, "v", "/docs/notes.md", &[]), b"bye there!\nbye again!\n");
    assert_eq!(read_bytes(&c, "v", "/src/lib.rs", &[]), b"pub fn hello() {}\npub fn world() {}\n", "the glob left .rs files alone");
    let v = json(&c, &["volume", "replace", "v", "/src", "--find", "pub fn", "--replace", "pub(crate) fn", "--json"]);
    assert_eq!(v["changed"], serde_json::json!([{"path": "/src/lib.rs", "replacements": 2}]), "{v}");
    let out = c.cli(&["volume", "replace", "v", "/", "--find", "nothing-matches-this", "--replace", "x"]);
    assert!(out.contains("0 replacements in 0 files"), "{out}");
}

/// A tar archive whose entries are (name, contents), names written as given (even `..`).
fn raw_tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn api_cli_batch_write_is_all_or_nothing() {
    let c = Cluster::new();
    c.create_volume("v", None);
    cli_in_ok(&c, &["volume", "write", "v", "/keep.txt"], b"untouched");

    // JSON from stdin.
    let doc = br#"{"files": [{"path": "a.txt", "content": "A"}, {"path": "sub/b.txt", "content": "B\n"}]}"#;
    let out = cli_in_ok(&c, &["volume", "batch-write", "v", "--to", "/j", "--json", "-"], doc);
    assert!(String::from_utf8_lossy(&out.stdout).contains("wrote 2 files"), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(read_bytes(&c, "v", "/j/a.txt", &[]), b"A");
    assert_eq!(read_bytes(&c, "v", "/j/sub/b.txt", &[]), b"B\n");

    // A tar file.
    let tar_ok = raw_tar(&[("one.txt", b"1"), ("dir/two.txt", b"22")]);
    let path = c.path("ok.tar");
    write(&path, &tar_ok);
    c.cli(&["volume", "batch-write", "v", "--to", "/t", "--tar", path.to_str().unwrap()]);
    assert_eq!(read_bytes(&c, "v", "/t/dir/two.txt", &[]), b"22");
    // The same from stdin, to the root.
    cli_in_ok(&c, &["volume", "batch-write", "v", "--tar", "-"], &tar_ok);
    assert_eq!(read_bytes(&c, "v", "/one.txt", &[]), b"1");

    // The second entry is invalid: nothing of the batch is left behind.
    let before = ls_paths(&c, "v", "/");
    let bad = raw_tar(&[("first.txt", b"first"), ("../escape.txt", b"bad")]);
    let path = c.path("bad.tar");
    write(&path, &bad);
    let err = c.cli_fail(&["volume", "batch-write", "v", "--to", "/new/dir", "--tar", path.to_str().unwrap()]);
    assert!(err.contains(".."), "{err}");
    assert_eq!(exists(&c, "v", "/new"), 1, "the failed batch left its destination");
    assert_eq!(ls_paths(&c, "v", "/"), before, "the failed batch left something behind");
    // Into an existing directory: the staged first file is gone too, the old file stays.
    let out = cli_in(&c, &["volume", "batch-write", "v", "--to", "/", "--tar", "-"], &bad);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(ls_paths(&c, "v", "/"), before, "the failed batch left something behind");
    let bad_json = br#"{"files": [{"path": "fine.txt", "content": "x"}, {"path": "../up.txt", "content": "y"}]}"#;
    assert_eq!(cli_in(&c, &["volume", "batch-write", "v", "--json", "-"], bad_json).status.code(), Some(1));
    assert_eq!(ls_paths(&c, "v", "/"), before);
    assert_eq!(read_bytes(&c, "v", "/keep.txt", &[]), b"untouched");
}

/// Everything below `root`: relative path → (kind, mode, mtime, contents or symlink target).
fn snapshot(root: &Path) -> BTreeMap<String, (char, u32, i64, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (char, u32, i64, Vec<u8>)>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let (kind, data) = if md.is_symlink() {
                ('l', fs::read_link(&p).unwrap().display().to_string().into_bytes())
            } else if md.is_dir() {
                ('d', Vec::new())
            } else {
                ('f', fs::read(&p).unwrap())
            };
            // A directory's mtime is not compared: adding its entries changes it on both sides.
            let mtime = if kind == 'f' { md.mtime() } else { 0 };
            out.insert(rel, (kind, if kind == 'l' { 0 } else { md.mode() & 0o7777 }, mtime, data));
            if kind == 'd' {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn api_cli_upload_and_download_a_tree() {
    let c = Cluster::new();
    c.create_volume("v", None);
    let local = c.path("tree");
    fs::create_dir_all(local.join("src/deep")).unwrap();
    fs::create_dir(local.join("empty-dir")).unwrap();
    fs::write(local.join("src/deep/data.bin"), pattern(MIB as usize + 3, 9)).unwrap();
    fs::write(local.join("src/notes.txt"), b"notes\n").unwrap();
    fs::write(local.join("empty"), b"").unwrap();
    fs::write(local.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(local.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(local.join("src/notes.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    let old = UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    fs::File::options().write(true).open(local.join("src/notes.txt")).unwrap().set_modified(old).unwrap();
    std::os::unix::fs::symlink("src/notes.txt", local.join("link")).unwrap();
    std::os::unix::fs::symlink("/nowhere/at/all", local.join("dangling")).unwrap();

    let out = c.cli(&["volume", "upload", local.to_str().unwrap(), "v", "/up"]);
    assert!(out.contains("wrote 4 files, 2 symlinks"), "{out}");
    // What the server holds: modes, the old mtime, the symlinks (not followed).
    let v = json(&c, &["volume", "ls", "v", "/up", "-r", "--json"]);
    let by_path: BTreeMap<&str, &Value> = v["entries"].as_array().unwrap().iter().map(|e| (e["path"].as_str().unwrap(), e)).collect();
    assert_eq!(by_path["/up/run.sh"]["mode"].as_u64(), Some(0o755));
    assert_eq!(by_path["/up/src/notes.txt"]["mode"].as_u64(), Some(0o600));
    assert_eq!(by_path["/up/src/notes.txt"]["mtime"].as_f64(), Some(1_000_000_000.0));
    assert_eq!((by_path["/up/link"]["kind"].as_str(), by_path["/up/link"]["target"].as_str()), (Some("symlink"), Some("src/notes.txt")));
    assert_eq!(by_path["/up/dangling"]["target"].as_str(), Some("/nowhere/at/all"));
    assert_eq!(by_path["/up/empty-dir"]["kind"].as_str(), Some("dir"));
    let text = c.cli(&["volume", "ls", "v", "/up"]);
    assert!(text.lines().any(|l| l.starts_with("lrwxrwxrwx") && l.ends_with("/up/link -> src/notes.txt")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("-rwxr-xr-x") && l.ends_with(" /up/run.sh")), "{text}");

    // Back down into a new directory: the same tree.
    let back = c.path("back");
    let out = c.cli(&["volume", "download", "v", "/up", back.to_str().unwrap()]);
    assert!(out.contains("downloaded /up"), "{out}");
    assert_eq!(snapshot(&back), snapshot(&local), "the tree that came back differs");
    assert_eq!(fs::metadata(back.join("src/notes.txt")).unwrap().mtime(), 1_000_000_000);

    // Uploading again after local changes: contents and modes follow the new tree.
    fs::set_permissions(local.join("run.sh"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(local.join("src/notes.txt"), b"changed\n").unwrap();
    c.cli(&["volume", "upload", local.to_str().unwrap(), "v", "/up"]);
    let st = json(&c, &["volume", "stat", "v", "/up/run.sh", "--json"]);
    assert_eq!(st["mode"].as_u64(), Some(0o644), "a re-upload keeps the old mode: {st}");
    let back2 = c.path("back2");
    c.cli(&["volume", "download", "v", "/up", back2.to_str().unwrap(), "-q"]);
    assert_eq!(snapshot(&back2), snapshot(&local));

    // The whole volume downloads too (names are relative to the root).
    let whole = c.path("whole");
    c.cli(&["volume", "download", "v", "/", whole.to_str().unwrap()]);
    assert_eq!(snapshot(&whole.join("up")), snapshot(&local));

    // A single file: up with -p, down to a path, into a directory, and to stdout.
    let file = local.join("src/deep/data.bin");
    c.cli(&["volume", "upload", file.to_str().unwrap(), "v", "/single/deep/data.bin", "-p"]);
    let got = c.path("got.bin");
    c.cli(&["volume", "download", "v", "/single/deep/data.bin", got.to_str().unwrap()]);
    assert_bytes_eq("downloaded file", &read(&got), &read(&file));
    let dir = c.path("into");
    fs::create_dir(&dir).unwrap();
    c.cli(&["volume", "download", "v", "/up/run.sh", dir.to_str().unwrap()]);
    assert_eq!(read(&dir.join("run.sh")), b"#!/bin/sh\necho hi\n");
    let out = c.cli_output(&["volume", "download", "v", "/single/deep/data.bin", "-"]);
    assert_bytes_eq("download to stdout", &out.stdout, &read(&file));
    // stdin as the source.
    cli_in_ok(&c, &["volume", "upload", "-", "v", "/from-stdin"], b"piped");
    assert_eq!(read_bytes(&c, "v", "/from-stdin", &[]), b"piped");

    // Errors: a directory to stdout needs --archive; a missing path; a missing local source.
    let err = c.cli_fail(&["volume", "download", "v", "/up", "-"]);
    assert!(err.contains("--archive"), "{err}");
    let err = c.cli_fail(&["volume", "download", "v", "/nope", c.path("nope").to_str().unwrap()]);
    assert!(err.contains("does not exist"), "{err}");
    assert!(!c.path("nope").exists(), "a failed download left a file");
    let err = c.cli_fail(&["volume", "upload", c.path("missing").to_str().unwrap(), "v", "/m"]);
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn api_cli_download_archives_checked_with_unzip_and_tar() {
    let c = Cluster::new();
    c.create_volume("v", None);
    let data = pattern(300_000, 3);
    let local = c.path("data.bin");
    write(&local, &data);
    c.cli(&["volume", "write", "v", "/d/sub/data.bin", "--from", local.to_str().unwrap(), "-p"]);
    cli_in_ok(&c, &["volume", "write", "v", "/d/readme.txt"], b"read me\n");

    // tar.gz to stdout, listed by the real tar.
    let out = c.cli_output(&["volume", "download", "v", "/d", "-", "--archive", "tar.gz"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tgz = c.path("d.tar.gz");
    write(&tgz, &out.stdout);
    if have("tar") {
        let list = sh(&format!("tar tzf {}", tgz.display()));
        let mut names: Vec<&str> = list.lines().collect();
        names.sort();
        assert_eq!(names, ["d/", "d/readme.txt", "d/sub/", "d/sub/data.bin"], "{list}");
    }

    if !have("unzip") {
        return;
    }
    let zip = c.path("d.zip");
    let out = c.cli(&["volume", "download", "v", "/d", zip.to_str().unwrap(), "--archive", "zip"]);
    assert!(out.contains("zip"), "{out}");
    let list = sh(&format!("unzip -l {}", zip.display()));
    for name in ["d/readme.txt", "d/sub/data.bin"] {
        assert!(list.contains(name), "unzip -l lacks {name}:\n{list}");
    }
    let x = c.path("unzipped");
    sh(&format!("unzip -q {} -d {}", zip.display(), x.display()));
    assert_bytes_eq("unzipped data.bin", &read(&x.join("d/sub/data.bin")), &data);
    assert_eq!(read(&x.join("d/readme.txt")), b"read me\n");
}

#[test]
fn api_cli_signed_urls_work_with_curl_without_a_token() {
    let c = Cluster::new();
    c.create_volume("v", None);
    let data = pattern(200_000, 4);
    let local = c.path("f.bin");
    write(&local, &data);
    c.cli(&["volume", "write", "v", "/share/f.bin", "--from", local.to_str().unwrap(), "-p"]);
    let err = c.cli_fail(&["volume", "url", "v", "/share"]);
    assert!(err.contains("archive"), "a directory's URL needs --archive: {err}");
    let err = c.cli_fail(&["volume", "url", "v", "/share/nope"]);
    assert!(err.contains("does not exist"), "{err}");
    assert_eq!(c.cli_output(&["volume", "url", "v", "/share/f.bin", "--expires", "3x"]).status.code(), Some(2));

    let url = c.cli(&["volume", "url", "v", "/share/f.bin", "--expires", "15m"]).trim().to_string();
    assert!(url.starts_with(&format!("http://{}/", c.addr)) && url.contains("sig="), "{url}");
    let v = json(&c, &["volume", "url", "v", "/share/f.bin", "--expires", "2h", "--json"]);
    let now = std::time::SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((v["expires_at"].as_i64().unwrap() - now - 7200).abs() < 60, "{v}");
    if !have("curl") {
        return;
    }
    let fetched = c.path("fetched.bin");
    // No token: curl sends no Authorization header.
    let code = sh(&format!("curl -sS -o {} -w '%{{http_code}}' '{url}'", fetched.display()));
    assert_eq!(code, "200");
    assert_bytes_eq("fetched through the signed URL", &read(&fetched), &data);
    // A changed URL is refused: another path, or a changed signature.
    let other = url.replace("f.bin", "g.bin");
    assert_eq!(sh(&format!("curl -s -o /dev/null -w '%{{http_code}}' '{other}'")), "403");
    let last = url.chars().last().unwrap();
    let tampered = format!("{}{}", &url[..url.len() - 1], if last == '0' { '1' } else { '0' });
    assert_eq!(sh(&format!("curl -s -o /dev/null -w '%{{http_code}}' '{tampered}'")), "403");
    // A directory as a zip.
    let url = c.cli(&["volume", "url", "v", "/share", "--archive", "zip"]).trim().to_string();
    let zip = c.path("share.zip");
    assert_eq!(sh(&format!("curl -sS -o {} -w '%{{http_code}}' '{url}'", zip.display())), "200");
    if have("unzip") {
        assert!(sh(&format!("unzip -l {}", zip.display())).contains("share/f.bin"));
    }
    // An expired URL is refused.
    let url = c.cli(&["volume", "url", "v", "/share/f.bin", "--expires", "1s"]).trim().to_string();
    std::thread::sleep(Duration::from_millis(2200));
    let body = sh(&format!("curl -s -w ' %{{http_code}}' '{url}'"));
    assert!(body.ends_with(" 403") && body.contains("expired"), "{body}");
}

#[test]
fn api_cli_write_into_a_full_volume_fails_and_keeps_the_old_file() {
    let c = Cluster::new();
    c.create_volume("tiny", Some("1MiB"));
    cli_in_ok(&c, &["volume", "write", "tiny", "/f"], b"old contents");
    let used = c.volume_used("tiny");
    // Much more than the cap, so the server fails long before the client has sent it all.
    let big = c.path("big.bin");
    write(&big, &pattern(16 * MIB as usize, 5));
    for args in [
        &["volume", "write", "tiny", "/f", "--from", big.to_str().unwrap()][..],
        &["volume", "upload", big.to_str().unwrap(), "tiny", "/f"],
    ] {
        let out = c.cli_output(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.starts_with("volumefs: ") && err.contains("full"), "{args:?}: the message does not say full: {err}");
    }
    let out = cli_in(&c, &["volume", "write", "tiny", "/f"], &pattern(8 * MIB as usize, 6));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("full"), "{}", String::from_utf8_lossy(&out.stderr));
    // A tree that does not fit: nothing of it stays.
    let tree = c.path("tree");
    fs::create_dir(&tree).unwrap();
    write(&tree.join("a"), &pattern(600 * KIB as usize, 1));
    write(&tree.join("b"), &pattern(600 * KIB as usize, 2));
    let err = c.cli_fail(&["volume", "upload", tree.to_str().unwrap(), "tiny", "/tree"]);
    assert!(err.contains("full"), "{err}");

    assert_eq!(read_bytes(&c, "tiny", "/f", &[]), b"old contents", "the old file changed");
    assert_eq!(ls_paths(&c, "tiny", "/"), ["/f"], "failed writes left files behind");
    let freed = eventually(Duration::from_secs(5), || c.volume_used("tiny") == used);
    assert!(freed.is_some(), "failed writes left bytes charged: used {} before, {} after", used, c.volume_used("tiny"));
    // And the volume still takes what fits.
    cli_in_ok(&c, &["volume", "write", "tiny", "/f"], b"new contents");
    assert_eq!(read_bytes(&c, "tiny", "/f", &[]), b"new contents");
}

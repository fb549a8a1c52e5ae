//! Local directory trees as tar streams, both ways: `volume upload DIR` sends a tar made on the
//! fly from a thread (never the whole tree in memory or on disk), and `volume download` of a
//! directory unpacks the server's tar stream as it arrives, safely: nothing lands outside the
//! destination, whatever the archive says.
//!
//! Modes, symlinks (never followed) and modification times are kept both ways.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
}

/// One entry of a local tree, below its root.
#[derive(Debug, Clone)]
pub struct LocalEntry {
    pub abs: PathBuf,
    /// `/`-separated from the root, without a leading `/`.
    pub rel: String,
    pub kind: Kind,
    pub size: u64,
}

/// Everything below `root`, parents before children, names sorted. Devices, FIFOs and sockets
/// have no contents to send: they are left out with a warning.
pub fn scan(root: &Path) -> Result<Vec<LocalEntry>, String> {
    let mut out = Vec::new();
    walk(root, "", &mut out)?;
    Ok(out)
}

fn walk(dir: &Path, rel: &str, out: &mut Vec<LocalEntry>) -> Result<(), String> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .and_then(|d| d.map(|e| e.map(|e| e.file_name())).collect::<io::Result<Vec<_>>>())
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    names.sort();
    for name in names {
        let abs = dir.join(&name);
        let name = name.to_str().ok_or_else(|| format!("{}: the name is not UTF-8 (volume names are)", abs.display()))?;
        let rel = if rel.is_empty() { name.to_string() } else { format!("{rel}/{name}") };
        let md = fs::symlink_metadata(&abs).map_err(|e| format!("cannot read {}: {e}", abs.display()))?;
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File
        } else if ft.is_symlink() {
            Kind::Symlink
        } else {
            eprintln!("volumefs: skipping {}: not a file, directory or symlink", abs.display());
            continue;
        };
        out.push(LocalEntry { abs: abs.clone(), rel: rel.clone(), kind, size: if kind == Kind::File { md.len() } else { 0 } });
        if kind == Kind::Dir {
            walk(&abs, &rel, out)?;
        }
    }
    Ok(())
}

/// About how many bytes the tar of `entries` has (for progress).
pub fn tar_size(entries: &[LocalEntry]) -> u64 {
    let blocks = |n: u64| n.div_ceil(512) * 512;
    let mut total = 1024;
    for e in entries {
        total += 512 + blocks(e.size);
        if e.rel.len() >= 100 {
            total += 512 + blocks(e.rel.len() as u64 + 1);
        }
    }
    total
}

/// What the tar writer thread sends: chunks, then `Done`, or a failure. A channel that closes
/// without `Done` is a failure too, so a tar cut short can never pass for a complete one.
enum Msg {
    Chunk(Vec<u8>),
    Failed(io::Error),
    Done,
}

/// Why the tar writer stopped.
#[derive(Debug)]
pub enum TarError {
    /// A local file could not be read (the request is broken off on purpose).
    Local(String),
    /// The request ended first (the server's answer says why).
    Gone,
}

const CHUNK: usize = 256 << 10;

struct ChannelWriter {
    tx: SyncSender<Msg>,
    buf: Vec<u8>,
    gone: bool,
}

impl ChannelWriter {
    fn send(&mut self, m: Msg) -> io::Result<()> {
        if self.tx.send(m).is_err() {
            self.gone = true;
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the upload ended"));
        }
        Ok(())
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
            self.send(Msg::Chunk(chunk))?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = std::mem::take(&mut self.buf);
            self.send(Msg::Chunk(chunk))?;
        }
        Ok(())
    }
}

/// The reading end of [`tar_stream`].
pub struct ChannelReader {
    rx: Receiver<Msg>,
    cur: Vec<u8>,
    pos: usize,
    done: bool,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Msg::Chunk(c)) => (self.cur, self.pos) = (c, 0),
                Ok(Msg::Failed(e)) => return Err(e),
                Ok(Msg::Done) => self.done = true,
                Err(_) => return Err(io::Error::other("the tar writer stopped before the end")),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// A file's contents, exactly `len` bytes: a file that grew is cut, one that shrank is an error
/// (the tar header already promised `len`).
struct Exact<R> {
    inner: io::Take<R>,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file shrank while it was read"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// A tar of `entries` (names relative to their root), written by a thread as the reader is
/// read. The thread's result tells a local read error (which breaks the stream off, so the
/// server rolls the whole import back) from the reader having gone away.
pub fn tar_stream(entries: Vec<LocalEntry>) -> (ChannelReader, JoinHandle<Result<(), TarError>>) {
    let (tx, rx) = sync_channel(4);
    let job = std::thread::spawn(move || {
        let mut b = tar::Builder::new(ChannelWriter { tx, buf: Vec::with_capacity(CHUNK), gone: false });
        b.follow_symlinks(false);
        let mut result = Ok(());
        for e in &entries {
            let r = match e.kind {
                Kind::File => fs::File::open(&e.abs).and_then(|f| {
                    let md = f.metadata()?;
                    let mut h = tar::Header::new_gnu();
                    h.set_metadata_in_mode(&md, tar::HeaderMode::Complete);
                    let len = md.len();
                    b.append_data(&mut h, &e.rel, Exact { inner: f.take(len), left: len })
                }),
                Kind::Dir | Kind::Symlink => b.append_path_with_name(&e.abs, &e.rel),
            };
            if let Err(err) = r {
                result = Err(format!("{}: {err}", e.abs.display()));
                break;
            }
        }
        if result.is_ok() {
            result = b.finish().and_then(|_| b.get_mut().flush()).map_err(|e| e.to_string());
        }
        let w = b.get_mut();
        match result {
            _ if w.gone => Err(TarError::Gone),
            Ok(()) => w.send(Msg::Done).map_err(|_| TarError::Gone),
            Err(m) => {
                let _ = w.send(Msg::Failed(io::Error::other(m.clone())));
                Err(TarError::Local(m))
            }
        }
    });
    (ChannelReader { rx, cur: Vec::new(), pos: 0, done: false }, job)
}

/// Unpacks a tar stream into `dest` (made when missing); with `strip`, the first component of
/// every name is dropped (an archive of `/a/b` names its entries `b/…`, and `b` itself is
/// `dest`). Names with `..`, absolute names and names through a symlink are refused: nothing
/// is written outside `dest`. Files, directories and symlinks are unpacked with their modes
/// and modification times (directories' last, as adding entries changes them); other entries
/// are skipped. Returns how many entries were unpacked.
pub fn unpack(input: impl Read, dest: &Path, strip: bool) -> Result<u64, String> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(dest).map_err(|e| format!("cannot make {}: {e}", dest.display()))?;
    let mut ar = tar::Archive::new(input);
    ar.set_preserve_permissions(true);
    ar.set_preserve_mtime(true);
    ar.set_overwrite(true);
    let mut dirs: Vec<(PathBuf, u32, u64)> = Vec::new();
    let mut n = 0;
    let entries = ar.entries().map_err(|e| format!("reading the archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("reading the archive: {e}"))?;
        let name = entry.path().map_err(|e| format!("reading the archive: {e}"))?.into_owned();
        let Some(rel) = safe_rel(&name, strip) else {
            return Err(format!("refusing to unpack {}: it would land outside {}", name.display(), dest.display()));
        };
        let target = dest.join(&rel);
        real_dirs(dest, rel.parent().unwrap_or(Path::new("")))?;
        let h = entry.header();
        let (mode, mtime) = (h.mode().unwrap_or(0o755), h.mtime().unwrap_or(0));
        let unpacked = |e: io::Error| format!("cannot unpack {}: {e}", target.display());
        match h.entry_type() {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&target) {
                    Ok(md) if md.is_dir() => {}
                    Ok(_) => return Err(format!("cannot unpack {}: it exists and is not a directory", target.display())),
                    Err(_) => fs::create_dir(&target).map_err(unpacked)?,
                }
                dirs.push((target, mode, mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::Symlink if rel.as_os_str().is_empty() => {
                return Err(format!("cannot unpack a file over the destination directory {}", dest.display()))
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::Symlink => {
                if fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                    return Err(format!("cannot unpack {}: a directory is in the way", target.display()));
                }
                entry.unpack(&target).map_err(unpacked)?;
            }
            other => {
                eprintln!("volumefs: skipping {} ({other:?} entries are not unpacked)", name.display());
                continue;
            }
        }
        n += 1;
    }
    for (d, mode, mtime) in dirs.iter().rev() {
        fs::set_permissions(d, fs::Permissions::from_mode(mode & 0o7777)).map_err(|e| format!("{}: {e}", d.display()))?;
        let t = UNIX_EPOCH + Duration::from_secs(*mtime);
        fs::File::open(d).and_then(|f| f.set_modified(t)).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    Ok(n)
}

/// An archive name as a path below the destination: only plain names (and `.`), the first one
/// dropped with `strip`. `None` for `..`, an absolute name or a Windows prefix.
fn safe_rel(name: &Path, strip: bool) -> Option<PathBuf> {
    let mut parts = Vec::new();
    for c in name.components() {
        match c {
            Component::Normal(p) => parts.push(p),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    let skip = usize::from(strip && !parts.is_empty());
    Some(parts[skip..].iter().collect())
}

/// Makes sure every directory from `dest` down to `dest/rel` is a real directory (made when
/// missing), never a symlink: an archive's symlink cannot lead a later entry elsewhere.
fn real_dirs(dest: &Path, rel: &Path) -> Result<(), String> {
    let mut cur = dest.to_path_buf();
    for c in rel.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => return Err(format!("refusing to unpack below {}: not a directory (a symlink?)", cur.display())),
            Err(_) => fs::create_dir(&cur).map_err(|e| format!("cannot make {}: {e}", cur.display()))?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_names_stay_below_the_destination() {
        let p = |s: &str, strip| safe_rel(Path::new(s), strip).map(|p| p.display().to_string());
        assert_eq!(p("b/c/d", true).as_deref(), Some("c/d"));
        assert_eq!(p("b/", true).as_deref(), Some(""));
        assert_eq!(p("./x/./y", false).as_deref(), Some("x/y"));
        assert_eq!(p("../etc/passwd", false), None);
        assert_eq!(p("b/../../x", true), None);
        assert_eq!(p("/etc/passwd", false), None);
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("volumefs-tree-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_tree_round_trips_through_tar_stream_and_unpack() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let src = scratch("src");
        fs::create_dir_all(src.join("d/e")).unwrap();
        fs::write(src.join("d/e/f.txt"), b"contents").unwrap();
        fs::write(src.join("run.sh"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("d/e/f.txt", src.join("link")).unwrap();
        let old = UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        fs::File::open(src.join("d/e/f.txt")).unwrap().set_modified(old).unwrap();
        let entries = scan(&src).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.rel.as_str()).collect();
        assert_eq!(names, ["d", "d/e", "d/e/f.txt", "link", "run.sh"]);
        let (mut reader, job) = tar_stream(entries);
        let dst = scratch("dst");
        assert_eq!(unpack(&mut reader, &dst, false).unwrap(), 5);
        // Read to the end, as the HTTP client does with a body, so the writer can finish.
        reader.read_to_end(&mut Vec::new()).unwrap();
        job.join().unwrap().unwrap();
        assert_eq!(fs::read(dst.join("d/e/f.txt")).unwrap(), b"contents");
        assert_eq!(fs::metadata(dst.join("d/e/f.txt")).unwrap().mtime(), 1_000_000_000);
        assert_eq!(fs::metadata(dst.join("run.sh")).unwrap().mode() & 0o7777, 0o755);
        assert_eq!(fs::read_link(dst.join("link")).unwrap(), Path::new("d/e/f.txt"));
        let _ = fs::remove_dir_all(&src);
        let _ = fs::remove_dir_all(&dst);
    }

    #[test]
    fn an_archive_cannot_write_through_its_own_symlink() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "escape", "/tmp").unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        b.append_data(&mut h, "escape/volumefs-owned", &b"x"[..]).unwrap();
        let data = b.into_inner().unwrap();
        let dst = scratch("evil");
        let e = unpack(&data[..], &dst, false).unwrap_err();
        assert!(e.contains("refusing"), "{e}");
        assert!(!Path::new("/tmp/volumefs-owned").exists());
        let _ = fs::remove_dir_all(&dst);
    }

    #[test]
    fn a_stream_cut_short_is_an_error_not_an_end() {
        let (tx, rx) = sync_channel(1);
        tx.send(Msg::Chunk(b"abc".to_vec())).unwrap();
        drop(tx);
        let mut r = ChannelReader { rx, cur: Vec::new(), pos: 0, done: false };
        let mut out = Vec::new();
        assert!(r.read_to_end(&mut out).is_err());
        assert_eq!(out, b"abc");
    }
}

//! Archives of volume trees, both ways: a tar, tar.gz or zip of a file or directory written as
//! it is read (to a bounded channel that the HTTP response drains, so a large tree never sits
//! in memory), and a tar stream unpacked into a volume all or nothing (uploads of directories
//! and batch writes).

use super::files::{join, split_path, Entry, Upload, CHUNK};
use super::Server;
use crate::engine::meta::VolId;
use crate::fs::{Caller, FsError, FsResult, Ino, Kind, Timespec};
use std::io::{self, Read, Write};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Tar,
    TarGz,
    Zip,
}

impl Format {
    pub fn parse(s: &str) -> FsResult<Format> {
        match s {
            "tar" => Ok(Format::Tar),
            "tar.gz" | "tgz" => Ok(Format::TarGz),
            "zip" => Ok(Format::Zip),
            _ => Err(FsError::new(libc::EINVAL, format!("unknown archive format {s:?}: tar, tar.gz or zip"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Tar => "tar",
            Format::TarGz => "tar.gz",
            Format::Zip => "zip",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Tar => "application/x-tar",
            Format::TarGz => "application/gzip",
            Format::Zip => "application/zip",
        }
    }
}

/// Reads exactly `len` bytes of a file: a file that shrank while being archived is padded with
/// zeros and one that grew is cut, so the archive's headers stay true.
struct FileReader<'a> {
    server: &'a Server,
    vol: VolId,
    ino: Ino,
    off: u64,
    len: u64,
    eof: bool,
}

impl Read for FileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = (self.len - self.off).min(buf.len() as u64).min(CHUNK as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = if self.eof {
            0
        } else {
            let data = self.server.read_at(self.vol, self.ino, self.off, want).map_err(io::Error::other)?;
            buf[..data.len()].copy_from_slice(&data);
            self.eof = data.is_empty();
            data.len()
        };
        let n = if n == 0 {
            buf[..want].fill(0);
            want
        } else {
            n
        };
        self.off += n as u64;
        Ok(n)
    }
}

/// Writes an archive of `path` (a file, or a directory and everything below it) to `out`.
/// Names in the archive start with the path's last component (nothing for the volume root).
pub fn write_archive(server: &Server, volume: &str, path: &str, format: Format, out: impl Write) -> FsResult<()> {
    let top = server.stat_path(volume, path)?;
    let vol = server.vol_id(volume)?;
    let parts = split_path(path)?;
    // "/a/b/c" in an archive of "/a/b" is "b/c": cut the parent's path and its slash.
    let prefix_len = if parts.len() > 1 { join(&parts[..parts.len() - 1]).len() + 1 } else { 1 };
    let rel = |p: &str| p[prefix_len.min(p.len())..].to_string();
    let mut entries = Vec::new();
    let mut collect = |e: Entry| {
        entries.push(e);
        Ok(true)
    };
    if !parts.is_empty() {
        collect(top.clone())?;
    }
    if top.attr.kind == Kind::Dir {
        server.walk_tree(vol, top.attr.ino, &top.path, true, &mut collect)?;
    }
    let io = |e: io::Error| FsError::new(libc::EIO, format!("writing the archive: {e}"));
    match format {
        Format::Tar => write_tar(server, vol, &entries, &rel, out).map(|_| ()).map_err(io),
        Format::TarGz => {
            let gz = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
            write_tar(server, vol, &entries, &rel, gz)?.finish().map(|_| ()).map_err(io)
        }
        Format::Zip => write_zip(server, vol, &entries, &rel, out),
    }
}

fn write_tar<W: Write>(server: &Server, vol: VolId, entries: &[Entry], rel: &dyn Fn(&str) -> String, out: W) -> io::Result<W> {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    for e in entries {
        let name = rel(&e.path);
        let a = &e.attr;
        let mut h = tar::Header::new_gnu();
        h.set_mode(a.perm);
        h.set_uid(a.uid.into());
        h.set_gid(a.gid.into());
        h.set_mtime(a.mtime.sec.max(0) as u64);
        match a.kind {
            Kind::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                b.append_data(&mut h, format!("{name}/"), io::empty())?;
            }
            Kind::File => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(a.size);
                server.engine.open(vol, a.ino, libc::O_RDONLY, &Caller::root()).map_err(io::Error::other)?;
                let r = FileReader { server, vol, ino: a.ino, off: 0, len: a.size, eof: false };
                let done = b.append_data(&mut h, &name, r);
                server.close_file(vol, a.ino);
                done?;
            }
            Kind::Symlink => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, &name, e.target.as_deref().unwrap_or(""))?;
            }
            // Devices, FIFOs and sockets have no contents to carry.
            Kind::Fifo | Kind::Socket | Kind::CharDev | Kind::BlockDev => {}
        }
    }
    b.into_inner()
}

fn zip_time(t: Timespec) -> zip::DateTime {
    let (y, mo, d, h, mi, s) = crate::fs::utc_parts(t.sec);
    let y = y.clamp(1980, 2107) as u16;
    zip::DateTime::from_date_and_time(y, mo as u8, d as u8, h as u8, mi as u8, s as u8).unwrap_or_default()
}

fn write_zip(server: &Server, vol: VolId, entries: &[Entry], rel: &dyn Fn(&str) -> String, out: impl Write) -> FsResult<()> {
    let zerr = |e: zip::result::ZipError| FsError::new(libc::EIO, format!("writing the zip archive: {e}"));
    let mut z = zip::ZipWriter::new_stream(out);
    for e in entries {
        let a = &e.attr;
        let name = rel(&e.path);
        let opts = zip::write::SimpleFileOptions::default()
            .unix_permissions(a.perm)
            .last_modified_time(zip_time(a.mtime))
            .large_file(a.size >= u32::MAX as u64);
        match a.kind {
            Kind::Dir => z.add_directory(format!("{name}/"), opts).map_err(zerr)?,
            Kind::File => {
                let opts = opts.compression_method(zip::CompressionMethod::Deflated);
                z.start_file(&name, opts).map_err(zerr)?;
                server.engine.open(vol, a.ino, libc::O_RDONLY, &Caller::root())?;
                let mut r = FileReader { server, vol, ino: a.ino, off: 0, len: a.size, eof: false };
                let copied = io::copy(&mut r, &mut z);
                server.close_file(vol, a.ino);
                copied.map_err(|e| FsError::new(libc::EIO, format!("writing the zip archive: {e}")))?;
            }
            Kind::Symlink => z.add_symlink(&name, e.target.as_deref().unwrap_or(""), opts).map_err(zerr)?,
            Kind::Fifo | Kind::Socket | Kind::CharDev | Kind::BlockDev => {}
        }
    }
    z.finish().map_err(zerr)?;
    Ok(())
}

/// What an import wrote.
#[derive(Debug, Default)]
pub struct Imported {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
}

/// Unpacks a tar stream below `dest` (made with its parents if missing), all or nothing: every
/// file and symlink is staged under a hidden name first and renamed into place only when the
/// whole stream has been read; on any error (a bad entry, the volume full, the connection
/// dropped) the staged entries and the directories made are removed again. Modes, owners and
/// modification times are kept; hard links, devices and FIFOs are refused.
pub fn import_tar(server: &Arc<Server>, volume: &str, dest: &str, input: impl Read) -> FsResult<Imported> {
    let vol = server.vol_id(volume)?;
    let base = split_path(dest)?;
    let mut made_dirs: Vec<String> = Vec::new();
    let result = stage(server, volume, vol, &base, input, &mut made_dirs);
    match result {
        Ok((uploads, links, dirs, mut done)) => {
            for (up, _) in uploads {
                up.commit()?;
            }
            for l in links {
                l.commit(server)?;
            }
            // Directory times last: adding entries changed them.
            for (ino, mode, owner, mtime) in dirs.into_iter().rev() {
                server.set_meta(vol, ino, Some(mode), owner, Some(mtime))?;
            }
            done.dirs += made_dirs.len() as u64;
            Ok(done)
        }
        Err(e) => {
            for d in made_dirs.iter().rev() {
                let _ = server.remove(volume, d, false);
            }
            Err(e)
        }
    }
}

type DirMeta = (Ino, u32, Option<(u32, u32)>, Timespec);

/// A symlink staged under a hidden name.
struct StagedLink {
    vol: VolId,
    parent: Ino,
    tmp: String,
    name: String,
    done: bool,
    server: Arc<Server>,
}

impl StagedLink {
    fn commit(mut self, server: &Server) -> FsResult<()> {
        server.engine.rename(self.vol, self.parent, self.tmp.as_bytes(), self.parent, self.name.as_bytes(), 0, &Caller::root())?;
        self.done = true;
        server.invalidate(self.vol, &[(self.parent, self.name.as_bytes().to_vec())]);
        Ok(())
    }
}

impl Drop for StagedLink {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.server.engine.unlink(self.vol, self.parent, self.tmp.as_bytes(), &Caller::root());
        }
    }
}

#[allow(clippy::type_complexity)]
fn stage(
    server: &Arc<Server>,
    volume: &str,
    vol: VolId,
    base: &[&str],
    input: impl Read,
    made_dirs: &mut Vec<String>,
) -> FsResult<(Vec<(Upload, String)>, Vec<StagedLink>, Vec<DirMeta>, Imported)> {
    let bad = |msg: String| FsError::new(libc::EINVAL, msg);
    let mut ar = tar::Archive::new(input);
    let mut uploads = Vec::new();
    let mut links = Vec::new();
    let mut dirs = Vec::new();
    let mut done = Imported::default();
    let ensure_dir = |path: &str, made_dirs: &mut Vec<String>| -> FsResult<Ino> {
        let parts = split_path(path)?;
        let mut cur = Vec::new();
        let mut ino = crate::fs::ROOT_INO;
        for p in parts {
            cur.push(p);
            let here = join(&cur);
            ino = match server.stat_path(volume, &here) {
                Ok(e) if e.attr.kind == Kind::Dir => e.attr.ino,
                Ok(_) => return Err(FsError::new(libc::ENOTDIR, format!("{here} exists and is not a directory"))),
                Err(e) if e.errno == libc::ENOENT => {
                    let a = server.make_dir(volume, &here, false)?;
                    made_dirs.push(here);
                    a.ino
                }
                Err(e) => return Err(e),
            };
        }
        Ok(ino)
    };
    ensure_dir(&join(base), made_dirs)?;
    let entries = ar.entries().map_err(|e| bad(format!("not a tar stream: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("reading the tar stream: {e}")))?;
        let raw = entry.path_bytes().into_owned();
        let name = String::from_utf8(raw).map_err(|_| bad("a name in the archive is not UTF-8".into()))?;
        let rel = split_path(name.trim_start_matches('/'))?;
        if rel.is_empty() {
            continue; // `./`
        }
        let mut full: Vec<&str> = base.to_vec();
        full.extend(rel.iter().copied());
        let path = join(&full);
        let h = entry.header();
        let mode = h.mode().unwrap_or(0o644);
        let owner = match (h.uid(), h.gid()) {
            (Ok(u), Ok(g)) => Some((u as u32, g as u32)),
            _ => None,
        };
        let mtime = Timespec { sec: h.mtime().unwrap_or(0) as i64, nsec: 0 };
        match h.entry_type() {
            tar::EntryType::Directory => {
                let ino = ensure_dir(&path, made_dirs)?;
                dirs.push((ino, mode, owner, mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                ensure_dir(&join(&full[..full.len() - 1]), made_dirs)?;
                let mut up = server.begin_upload(volume, &path, false)?;
                let mut buf = vec![0u8; CHUNK];
                loop {
                    let n = entry.read(&mut buf).map_err(|e| bad(format!("reading {name} from the tar stream: {e}")))?;
                    if n == 0 {
                        break;
                    }
                    up.write(&buf[..n])?;
                }
                up.set_meta(mode, owner, mtime)?;
                done.files += 1;
                done.bytes += up.written;
                uploads.push((up, path));
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().ok_or_else(|| bad(format!("symlink {name} has no target")))?.into_owned();
                let parent = ensure_dir(&join(&full[..full.len() - 1]), made_dirs)?;
                let last = full[full.len() - 1].to_string();
                if let Ok(e) = server.stat_path(volume, &path) {
                    if e.attr.kind == Kind::Dir {
                        return Err(FsError::new(libc::EISDIR, format!("{path} is a directory")));
                    }
                }
                let tmp = super::files::temp_name(&last, &format!("{:x}", server.new_session_id()));
                server.import_symlink(vol, parent, &tmp, &target)?;
                links.push(StagedLink { vol, parent, tmp, name: last, done: false, server: server.clone() });
                done.symlinks += 1;
            }
            // PAX and GNU long-name records are read by the tar crate itself.
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader | tar::EntryType::GNULongName | tar::EntryType::GNULongLink => {}
            other => return Err(bad(format!("{name}: {other:?} entries (hard links, devices, FIFOs) are not supported"))),
        }
    }
    Ok((uploads, links, dirs, done))
}

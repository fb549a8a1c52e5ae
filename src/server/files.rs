//! Direct file access for controllers, without any VM: the path-based operations behind the
//! HTTP API's file verbs (read, write, batch, move, remove, mkdir, edit, list, stat, search,
//! replace, archives).
//!
//! They run on the engine the guests use, with one set of semantics and one quota, and every
//! change is pushed to the guest sessions that cache the names or inodes it touched, so a
//! sandbox sees an API write as it sees another sandbox's. Rules that hold for every call:
//! - A path is `/`-separated from the volume root; `.` and empty components are ignored, `..`
//!   is refused (`EINVAL`), every component is a valid name (at most 255 bytes, no NUL) and the
//!   whole path at most [`MAX_PATH`] bytes. Symlinks are never followed: a symlink in the middle
//!   of a path is `ENOTDIR`, and one at its end is the link itself.
//! - Whole-file writes (write, edit, replace, uploads) go to a hidden temporary file in the
//!   target's directory that is renamed over the target at the end: readers see the old or the
//!   new contents, and a write that fails (volume full, dropped connection) leaves nothing behind.
//! - These calls block (engine calls); the HTTP layer runs them on tokio's blocking pool.

use super::Server;
use crate::engine::meta::VolId;
use crate::fs::{check_name, Attr, Caller, FsError, FsResult, Ino, Kind, SetAttr, SetTime, Timespec, ROOT_INO};

/// The longest path the API accepts, as Linux's `PATH_MAX`.
pub const MAX_PATH: usize = 4096;
/// Bytes read or written per engine call.
pub const CHUNK: usize = crate::proto::MAX_IO as usize;
/// Files larger than this are skipped by content search and replace, and refused by edit.
pub const MAX_TEXT: u64 = 64 << 20;

/// The hidden name the server writes `name`'s new contents under before renaming them into
/// place: `.NAME.volumefs-TAG` (watch recognises and hides it). Long names are cut at a
/// character boundary so that the result stays a valid name.
pub fn temp_name(name: &str, tag: &str) -> String {
    let mut cut = name.len().min(200);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!(".{}.volumefs-{tag}", &name[..cut])
}

/// Whether `name` is one of [`temp_name`]'s.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(".volumefs-")
}

/// Checks an API path and splits it into names.
pub fn split_path(path: &str) -> FsResult<Vec<&str>> {
    if path.len() > MAX_PATH {
        return Err(FsError::new(libc::ENAMETOOLONG, format!("path longer than {MAX_PATH} bytes")));
    }
    let mut parts = Vec::new();
    for p in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if p == ".." {
            return Err(FsError::new(libc::EINVAL, format!("path {path:?} may not contain `..`")));
        }
        check_name(p.as_bytes())?;
        parts.push(p);
    }
    Ok(parts)
}

/// The canonical spelling of a path: `/` and names joined by `/`.
pub fn join(parts: &[&str]) -> String {
    format!("/{}", parts.join("/"))
}

/// One entry of a listing or a tree walk.
#[derive(Debug, Clone)]
pub struct Entry {
    /// From the volume root, `/`-separated.
    pub path: String,
    pub attr: Attr,
    /// A symlink's target.
    pub target: Option<String>,
}

/// A match of [`Server::search`].
#[derive(Debug, Clone)]
pub struct Hit {
    pub path: String,
    /// 1-based line number and the line, for content matches.
    pub line: Option<(u64, String)>,
}

/// A whole-file write in progress: bytes go to a hidden temporary file, which [`Upload::commit`]
/// renames over the target and [`Upload::abort`] removes.
pub struct Upload {
    server: std::sync::Arc<Server>,
    pub vol: VolId,
    parent: Ino,
    name: String,
    tmp: String,
    ino: Ino,
    pub written: u64,
    done: bool,
    /// The mode was set for these contents (an archive's entry): the old file's does not carry over.
    mode_set: bool,
}

fn root() -> Caller {
    Caller::root()
}

impl Server {
    /// The volume named `name`.
    pub fn vol_id(&self, name: &str) -> FsResult<VolId> {
        Ok(self.engine.volume(name)?.id)
    }

    /// Walks `parts` from the root without following symlinks.
    fn walk(&self, vol: VolId, parts: &[&str]) -> FsResult<Attr> {
        let mut cur = self.engine.getattr(vol, ROOT_INO)?;
        for (i, p) in parts.iter().enumerate() {
            if cur.kind != Kind::Dir {
                return Err(FsError::new(libc::ENOTDIR, format!("{} is not a directory", join(&parts[..i]))));
            }
            cur = self.engine.lookup(vol, cur.ino, p.as_bytes(), &root()).map_err(|e| {
                if e.errno == libc::ENOENT {
                    FsError::new(libc::ENOENT, format!("{} does not exist", join(&parts[..=i])))
                } else {
                    e
                }
            })?;
        }
        Ok(cur)
    }

    /// The directory holding the last name of `parts` (its parents made when `make` is set)
    /// and that name.
    pub(super) fn parent_of<'p>(&self, vol: VolId, parts: &[&'p str], make: bool) -> FsResult<(Ino, &'p str)> {
        let (name, dirs) = parts.split_last().ok_or_else(|| FsError::new(libc::EINVAL, "the volume root cannot be the target"))?;
        let mut parent = ROOT_INO;
        for (i, d) in dirs.iter().enumerate() {
            parent = match self.engine.lookup(vol, parent, d.as_bytes(), &root()) {
                Ok(a) if a.kind == Kind::Dir => a.ino,
                Ok(_) => return Err(FsError::new(libc::ENOTDIR, format!("{} is not a directory", join(&dirs[..=i])))),
                Err(e) if e.errno == libc::ENOENT && make => {
                    let a = self.engine.mkdir(vol, parent, d.as_bytes(), 0o755, 0, &root())?;
                    self.invalidate(vol, &[(parent, d.as_bytes().to_vec())]);
                    a.ino
                }
                Err(e) if e.errno == libc::ENOENT => {
                    return Err(FsError::new(libc::ENOENT, format!("{} does not exist (make parents with -p)", join(&dirs[..=i]))))
                }
                Err(e) => return Err(e),
            };
        }
        Ok((parent, name))
    }

    /// Attributes of `path` (a symlink's own).
    pub fn stat_path(&self, volume: &str, path: &str) -> FsResult<Entry> {
        let vol = self.vol_id(volume)?;
        let parts = split_path(path)?;
        let attr = self.walk(vol, &parts)?;
        self.entry(vol, join(&parts), attr)
    }

    fn entry(&self, vol: VolId, path: String, attr: Attr) -> FsResult<Entry> {
        let target = if attr.kind == Kind::Symlink {
            Some(String::from_utf8_lossy(&self.engine.readlink(vol, attr.ino)?).into_owned())
        } else {
            None
        };
        Ok(Entry { path, attr, target })
    }

    /// Opens a regular file for reading; the caller reads with [`Server::read_at`] and must
    /// call [`Server::close_file`]. While open, the file's data outlives an unlink.
    pub fn open_file(&self, volume: &str, path: &str) -> FsResult<(VolId, Attr)> {
        let vol = self.vol_id(volume)?;
        let parts = split_path(path)?;
        let a = self.walk(vol, &parts)?;
        if a.kind != Kind::File {
            return Err(FsError::new(libc::EISDIR, format!("{} is not a regular file", join(&parts))));
        }
        Ok((vol, self.engine.open(vol, a.ino, libc::O_RDONLY, &root())?))
    }

    pub fn read_at(&self, vol: VolId, ino: Ino, offset: u64, size: usize) -> FsResult<Vec<u8>> {
        self.engine.read(vol, ino, offset, size.min(CHUNK) as u32)
    }

    pub fn close_file(&self, vol: VolId, ino: Ino) {
        if let Err(e) = self.engine.release(vol, ino) {
            tracing::warn!("releasing inode {ino} of volume {vol}: {e}");
        }
    }

    /// Up to `limit` bytes of a file from `offset`.
    fn read_all(&self, vol: VolId, ino: Ino, limit: u64) -> FsResult<Vec<u8>> {
        let mut out = Vec::new();
        while (out.len() as u64) < limit {
            let chunk = self.read_at(vol, ino, out.len() as u64, (limit - out.len() as u64).min(CHUNK as u64) as usize)?;
            if chunk.is_empty() {
                break;
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Reads a whole (small) file.
    pub fn read_file(&self, volume: &str, path: &str) -> FsResult<Vec<u8>> {
        let (vol, a) = self.open_file(volume, path)?;
        let r = self.read_all(vol, a.ino, a.size.max(1) + (1 << 20));
        self.close_file(vol, a.ino);
        r
    }

    /// Starts replacing (or creating) the file at `path`.
    pub fn begin_upload(self: &std::sync::Arc<Self>, volume: &str, path: &str, parents: bool) -> FsResult<Upload> {
        let vol = self.vol_id(volume)?;
        let parts = split_path(path)?;
        let (parent, name) = self.parent_of(vol, &parts, parents)?;
        if let Ok(a) = self.engine.lookup(vol, parent, name.as_bytes(), &root()) {
            if a.kind == Kind::Dir {
                return Err(FsError::new(libc::EISDIR, format!("{} is a directory", join(&parts))));
            }
        }
        let tmp = temp_name(name, &format!("{:x}", self.new_session_id()));
        let a = self.engine.create(vol, parent, tmp.as_bytes(), 0o644, 0, &root())?;
        Ok(Upload { server: self.clone(), vol, parent, name: name.to_string(), tmp, ino: a.ino, written: 0, done: false, mode_set: false })
    }

    /// Replaces (or creates) a file with `data`, atomically.
    pub fn write_file(self: &std::sync::Arc<Self>, volume: &str, path: &str, data: &[u8], parents: bool) -> FsResult<Attr> {
        let mut up = self.begin_upload(volume, path, parents)?;
        up.write(data)?;
        up.commit()
    }

    /// Adds `data` at the end of a file (created, with its parents, if missing) in one engine
    /// write: the append is atomic against every other appender, guests included.
    pub fn append_file(&self, volume: &str, path: &str, data: &[u8]) -> FsResult<Attr> {
        let vol = self.vol_id(volume)?;
        let parts = split_path(path)?;
        let (parent, name) = self.parent_of(vol, &parts, true)?;
        let a = match self.engine.lookup(vol, parent, name.as_bytes(), &root()) {
            Ok(a) if a.kind != Kind::File => return Err(FsError::new(libc::EISDIR, format!("{} is not a regular file", join(&parts)))),
            Ok(a) => self.engine.open(vol, a.ino, libc::O_WRONLY | libc::O_APPEND, &root())?,
            Err(e) if e.errno == libc::ENOENT => {
                let a = self.engine.create(vol, parent, name.as_bytes(), 0o644, 0, &root())?;
                self.invalidate(vol, &[(parent, name.as_bytes().to_vec())]);
                a
            }
            Err(e) => return Err(e),
        };
        let written = self.engine.write(vol, a.ino, 0, data, true, &root());
        self.close_file(vol, a.ino);
        let (_, attr) = written?;
        self.invalidate_inode(vol, a.ino);
        Ok(attr)
    }

    /// Makes a directory; with `parents`, its missing parents too, and an existing directory
    /// is not an error.
    pub fn make_dir(&self, volume: &str, path: &str, parents: bool) -> FsResult<Attr> {
        let vol = self.vol_id(volume)?;
        let parts = split_path(path)?;
        let (parent, name) = self.parent_of(vol, &parts, parents)?;
        match self.engine.mkdir(vol, parent, name.as_bytes(), 0o755, 0, &root()) {
            Ok(a) => {
                self.invalidate(vol, &[(parent, name.as_bytes().to_vec())]);
                Ok(a)
            }
            Err(e) if e.errno == libc::EEXIST && parents => {
                let a = self.engine.lookup(vol, parent, name.as_bytes(), &root())?;
                if a.kind == Kind::Dir {
                    Ok(a)
                } else {
                    Err(FsError::new(libc::EEXIST, format!("{} exists and is not a directory", join(&parts))))
                }
            }
            Err(e) if e.errno == libc::EEXIST => Err(FsError::new(libc::EEXIST, format!("{} already exists", join(&parts)))),
            Err(e) => Err(e),
        }
    }

    /// Removes a file, symlink or empty directory; with `recursive`, a directory and all it holds.
    /// Returns how many entries were removed.
    pub fn remove(&self, volume: &str, path: &str, recursive: bool) -> FsResult<u64> {
        let vol = self.vol_id(volume)?;
        let parts = split_path(path)?;
        let (parent, name) = self.parent_of(vol, &parts, false)?;
        let a = self.walk(vol, &parts)?;
        if a.kind == Kind::Dir && recursive {
            self.remove_tree(vol, parent, name.as_bytes(), a.ino)
        } else {
            self.remove_one(vol, parent, name.as_bytes(), a.kind).map(|_| 1).map_err(|e| {
                if e.errno == libc::ENOTEMPTY {
                    FsError::new(libc::ENOTEMPTY, format!("{} is not empty (remove it with -r)", join(&parts)))
                } else {
                    e
                }
            })
        }
    }

    fn remove_one(&self, vol: VolId, parent: Ino, name: &[u8], kind: Kind) -> FsResult<()> {
        if kind == Kind::Dir {
            self.engine.rmdir(vol, parent, name, &root())?;
        } else {
            self.engine.unlink(vol, parent, name, &root())?;
        }
        self.invalidate(vol, &[(parent, name.to_vec())]);
        Ok(())
    }

    fn remove_tree(&self, vol: VolId, parent: Ino, name: &[u8], dir: Ino) -> FsResult<u64> {
        let mut n = 0;
        loop {
            // Entries are read a batch at a time and removed; the listing restarts each time
            // because removal changes it.
            let batch: Vec<_> =
                self.engine.readdir(vol, dir, 2, 256, false)?.into_iter().filter(|e| e.name != b"." && e.name != b"..").collect();
            if batch.is_empty() {
                break;
            }
            for e in batch {
                n += if e.kind == Kind::Dir {
                    self.remove_tree(vol, dir, &e.name, e.ino)?
                } else {
                    self.remove_one(vol, dir, &e.name, e.kind)?;
                    1
                };
            }
        }
        self.remove_one(vol, parent, name, Kind::Dir)?;
        Ok(n + 1)
    }

    /// Moves `from` to `to` (replacing a file there, as mv does; the parents of `to` must exist).
    pub fn move_path(&self, volume: &str, from: &str, to: &str) -> FsResult<Attr> {
        let vol = self.vol_id(volume)?;
        let (fp, tp) = (split_path(from)?, split_path(to)?);
        let (p1, n1) = self.parent_of(vol, &fp, false)?;
        let (p2, n2) = self.parent_of(vol, &tp, false)?;
        let a = self.walk(vol, &fp)?;
        self.engine.rename(vol, p1, n1.as_bytes(), p2, n2.as_bytes(), 0, &root())?;
        self.invalidate(vol, &[(p1, n1.as_bytes().to_vec()), (p2, n2.as_bytes().to_vec())]);
        self.engine.getattr(vol, a.ino)
    }

    /// Lists a directory (with `recursive`, everything below it, parents before children), or
    /// the entry itself when `path` is not a directory. At most `limit` entries.
    pub fn list(&self, volume: &str, path: &str, recursive: bool, limit: usize) -> FsResult<(Vec<Entry>, bool)> {
        let vol = self.vol_id(volume)?;
        let parts = split_path(path)?;
        let a = self.walk(vol, &parts)?;
        let base = join(&parts);
        if a.kind != Kind::Dir {
            return Ok((vec![self.entry(vol, base, a)?], false));
        }
        let mut out = Vec::new();
        let complete = self.walk_tree(vol, a.ino, &base, recursive, &mut |e| {
            if out.len() >= limit {
                return Ok(false);
            }
            out.push(e);
            Ok(true)
        })?;
        Ok((out, !complete))
    }

    /// Calls `f` for each entry below directory `dir` (whose path is `base`), depth first,
    /// parents before children; stops early (returning false) when `f` says so.
    pub fn walk_tree(
        &self,
        vol: VolId,
        dir: Ino,
        base: &str,
        recursive: bool,
        f: &mut dyn FnMut(Entry) -> FsResult<bool>,
    ) -> FsResult<bool> {
        let mut cookie = 2;
        loop {
            let batch = self.engine.readdir(vol, dir, cookie, 512, true)?;
            let Some(last) = batch.last() else { return Ok(true) };
            cookie = last.cookie;
            for e in batch {
                if e.name == b"." || e.name == b".." {
                    continue;
                }
                let Some(attr) = e.attr else { continue };
                let name = String::from_utf8_lossy(&e.name);
                let path = if base == "/" { format!("/{name}") } else { format!("{base}/{name}") };
                let entry = self.entry(vol, path.clone(), attr.clone())?;
                if !f(entry)? {
                    return Ok(false);
                }
                if recursive && attr.kind == Kind::Dir && !self.walk_tree(vol, attr.ino, &path, true, f)? {
                    return Ok(false);
                }
            }
        }
    }

    /// Replaces the single occurrence of `find` in a file with `replace`. Zero or several
    /// occurrences are an error that says how many were found; nothing is written then.
    pub fn edit(self: &std::sync::Arc<Self>, volume: &str, path: &str, find: &str, replace: &str) -> FsResult<Attr> {
        if find.is_empty() {
            return Err(FsError::new(libc::EINVAL, "the text to find is empty"));
        }
        let data = self.read_text(volume, path)?;
        let n = data.matches(find).count();
        if n != 1 {
            return Err(FsError::new(
                libc::EINVAL,
                format!("{path}: expected exactly one occurrence of the text to replace, found {n}; nothing changed"),
            ));
        }
        self.write_file(volume, path, data.replacen(find, replace, 1).as_bytes(), false)
    }

    fn read_text(&self, volume: &str, path: &str) -> FsResult<String> {
        let (vol, a) = self.open_file(volume, path)?;
        if a.size > MAX_TEXT {
            self.close_file(vol, a.ino);
            return Err(FsError::new(libc::EFBIG, format!("{path} is larger than {MAX_TEXT} bytes")));
        }
        let data = self.read_all(vol, a.ino, MAX_TEXT);
        self.close_file(vol, a.ino);
        String::from_utf8(data?).map_err(|_| FsError::new(libc::EINVAL, format!("{path} is not UTF-8 text")))
    }

    /// Files below `path` whose name matches `name` and (when given) whose contents match
    /// `content`, one hit per matching line; at most `limit` hits. Files that are not UTF-8 text
    /// or larger than [`MAX_TEXT`] are skipped by content search.
    pub fn search(
        &self,
        volume: &str,
        path: &str,
        name: Option<&globset::GlobMatcher>,
        content: Option<&regex::Regex>,
        limit: usize,
    ) -> FsResult<(Vec<Hit>, bool)> {
        let vol = self.vol_id(volume)?;
        let parts = split_path(path)?;
        let top = self.walk(vol, &parts)?;
        let mut hits = Vec::new();
        let mut visit = |e: Entry| -> FsResult<bool> {
            let base = e.path.rsplit('/').next().unwrap_or("");
            if name.is_some_and(|g| !g.is_match(base)) {
                return Ok(true);
            }
            match content {
                None => hits.push(Hit { path: e.path, line: None }),
                Some(re) => {
                    if e.attr.kind != Kind::File || e.attr.size > MAX_TEXT {
                        return Ok(true);
                    }
                    let Ok(text) = self.text_of(vol, &e) else { return Ok(true) };
                    for (i, line) in text.lines().enumerate() {
                        if re.is_match(line) {
                            hits.push(Hit { path: e.path.clone(), line: Some((i as u64 + 1, line.to_string())) });
                            if hits.len() >= limit {
                                return Ok(false);
                            }
                        }
                    }
                }
            }
            Ok(hits.len() < limit)
        };
        let complete = if top.kind == Kind::Dir {
            self.walk_tree(vol, top.ino, &join(&parts), true, &mut visit)?
        } else {
            let e = self.entry(vol, join(&parts), top)?;
            visit(e)?
        };
        Ok((hits, !complete))
    }

    fn text_of(&self, vol: VolId, e: &Entry) -> FsResult<String> {
        self.engine.open(vol, e.attr.ino, libc::O_RDONLY, &root())?;
        let data = self.read_all(vol, e.attr.ino, MAX_TEXT);
        self.close_file(vol, e.attr.ino);
        String::from_utf8(data?).map_err(|_| FsError::new(libc::EINVAL, "not UTF-8"))
    }

    /// Replaces every match of `find` with `with` (`$1` names a group) in the UTF-8 text files
    /// below `path` whose name matches `name`; returns each changed file and its replacements.
    pub fn replace(
        self: &std::sync::Arc<Self>,
        volume: &str,
        path: &str,
        find: &regex::Regex,
        with: &str,
        name: Option<&globset::GlobMatcher>,
    ) -> FsResult<Vec<(String, u64)>> {
        let (files, _) = self.search(volume, path, name, None, usize::MAX)?;
        let vol = self.vol_id(volume)?;
        let mut changed = Vec::new();
        for f in files {
            let parts = split_path(&f.path)?;
            let a = self.walk(vol, &parts)?;
            if a.kind != Kind::File || a.size > MAX_TEXT {
                continue;
            }
            let Ok(text) = self.text_of(vol, &Entry { path: f.path.clone(), attr: a, target: None }) else { continue };
            let n = find.find_iter(&text).count() as u64;
            if n == 0 {
                continue;
            }
            let new = find.replace_all(&text, with);
            self.write_file(volume, &f.path, new.as_bytes(), false)?;
            changed.push((f.path, n));
        }
        Ok(changed)
    }

    /// Tells every session on `vol` that these names changed (API writes have no session).
    pub(super) fn invalidate(&self, vol: VolId, entries: &[(Ino, Vec<u8>)]) {
        for s in self.peers(vol, 0) {
            for (parent, name) in entries {
                s.invalidate_entry(*parent, name);
            }
        }
    }

    pub(super) fn invalidate_inode(&self, vol: VolId, ino: Ino) {
        for s in self.peers(vol, 0) {
            s.invalidate_inode(ino);
        }
    }

    /// Makes a symlink at `parent/name` (replacing nothing) for imports.
    pub(super) fn import_symlink(&self, vol: VolId, parent: Ino, name: &str, target: &[u8]) -> FsResult<Attr> {
        let a = self.engine.symlink(vol, parent, name.as_bytes(), target, &root())?;
        self.invalidate(vol, &[(parent, name.as_bytes().to_vec())]);
        Ok(a)
    }

    /// Sets mode, owner and modification time (imports preserve them).
    pub(super) fn set_meta(
        &self,
        vol: VolId,
        ino: Ino,
        mode: Option<u32>,
        owner: Option<(u32, u32)>,
        mtime: Option<Timespec>,
    ) -> FsResult<()> {
        let set = SetAttr {
            mode: mode.map(|m| m & 0o7777),
            uid: owner.map(|o| o.0),
            gid: owner.map(|o| o.1),
            size: None,
            atime: None,
            mtime: mtime.map(SetTime::At),
        };
        self.engine.setattr(vol, ino, &set, &root())?;
        self.invalidate_inode(vol, ino);
        Ok(())
    }
}

impl Upload {
    /// Appends bytes to the upload.
    pub fn write(&mut self, data: &[u8]) -> FsResult<()> {
        for chunk in data.chunks(CHUNK) {
            self.server.engine.write(self.vol, self.ino, self.written, chunk, false, &root())?;
            self.written += chunk.len() as u64;
        }
        Ok(())
    }

    /// Sets the new contents' mode, owner and modification time before the commit (an
    /// archive's entry); the mode then wins over the old file's.
    pub fn set_meta(&mut self, mode: u32, owner: Option<(u32, u32)>, mtime: Timespec) -> FsResult<()> {
        self.server.set_meta(self.vol, self.ino, Some(mode), owner, Some(mtime))?;
        self.mode_set = true;
        Ok(())
    }

    /// Renames the temporary file over the target. An existing target's permission bits carry
    /// over to the new contents, unless [`Upload::set_meta`] gave them their own.
    pub fn commit(mut self) -> FsResult<Attr> {
        let (server, vol, parent) = (self.server.clone(), self.vol, self.parent);
        if let Ok(old) = server.engine.lookup(vol, parent, self.name.as_bytes(), &root()) {
            if old.kind == Kind::File && old.perm != 0o644 && !self.mode_set {
                let _ = server.set_meta(vol, self.ino, Some(old.perm), None, None);
            }
        }
        server.engine.rename(vol, parent, self.tmp.as_bytes(), parent, self.name.as_bytes(), 0, &root())?;
        self.done = true;
        server.close_file(vol, self.ino);
        server.invalidate(vol, &[(parent, self.name.as_bytes().to_vec())]);
        server.engine.getattr(vol, self.ino)
    }

    fn discard(&mut self) {
        if !self.done {
            self.done = true;
            let _ = self.server.engine.unlink(self.vol, self.parent, self.tmp.as_bytes(), &root());
            self.server.close_file(self.vol, self.ino);
        }
    }
}

/// An upload that is not committed (an error, a dropped connection) leaves nothing behind.
impl Drop for Upload {
    fn drop(&mut self) {
        self.discard();
    }
}

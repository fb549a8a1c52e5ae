//! The data side of the engine: file contents by (volume, inode).
//!
//! [`LocalBlobs`] keeps one sparse file per inode under `DATA/blobs/<volume>/<xx>/<ino>`, read
//! and written with pread/pwrite, so holes cost nothing on the host disk. The engine writes data
//! before it commits the metadata that makes it visible, and reads never return bytes past the
//! size the metadata records, so a crash in between leaves at worst unreferenced bytes.

use super::meta::VolId;
use crate::fs::{FsError, FsResult, Ino};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub trait BlobStore: Send + Sync {
    /// Fills `buf` from `offset`; bytes the blob does not have (holes, past its end) read as zero.
    fn read(&self, vol: VolId, ino: Ino, offset: u64, buf: &mut [u8]) -> FsResult<()>;
    fn write(&self, vol: VolId, ino: Ino, offset: u64, data: &[u8]) -> FsResult<()>;
    fn truncate(&self, vol: VolId, ino: Ino, size: u64) -> FsResult<()>;
    /// Makes `[offset, offset+len)` read as zeros without changing the blob's length (a hole
    /// where the store can make one).
    fn zero(&self, vol: VolId, ino: Ino, offset: u64, len: u64) -> FsResult<()>;
    fn remove(&self, vol: VolId, ino: Ino) -> FsResult<()>;
    fn remove_volume(&self, vol: VolId) -> FsResult<()>;
    fn sync(&self, vol: VolId, ino: Ino) -> FsResult<()>;
}

pub struct LocalBlobs {
    root: PathBuf,
    /// Recently used data files, kept open: a 1 MiB write should not cost an open and a close.
    open: Mutex<HashMap<(VolId, Ino), Arc<File>>>,
}

/// How many data files stay open at most.
const OPEN_FILES: usize = 512;

fn io_err(what: &str, path: &Path, e: std::io::Error) -> FsError {
    FsError::new(e.raw_os_error().unwrap_or(libc::EIO), format!("data store: {what} {}: {e}", path.display()))
}

impl LocalBlobs {
    pub fn open(root: &Path) -> FsResult<LocalBlobs> {
        std::fs::create_dir_all(root).map_err(|e| io_err("create", root, e))?;
        Ok(LocalBlobs { root: root.to_path_buf(), open: Mutex::new(HashMap::new()) })
    }

    /// The data file, opened read-write and created if missing, from the cache when possible.
    fn file(&self, vol: VolId, ino: Ino) -> FsResult<Arc<File>> {
        if let Some(f) = self.open.lock().unwrap().get(&(vol, ino)) {
            return Ok(f.clone());
        }
        let f = Arc::new(self.open_rw(vol, ino)?);
        let mut open = self.open.lock().unwrap();
        if open.len() >= OPEN_FILES {
            // Crude but bounded: forget an arbitrary half; users of those keep their Arc.
            let drop: Vec<_> = open.keys().take(OPEN_FILES / 2).copied().collect();
            for k in drop {
                open.remove(&k);
            }
        }
        open.insert((vol, ino), f.clone());
        Ok(f)
    }

    /// Whether `ino` has a data file (open, or on disk).
    pub fn exists(&self, vol: VolId, ino: Ino) -> bool {
        self.open.lock().unwrap().contains_key(&(vol, ino)) || self.path(vol, ino).exists()
    }

    fn forget(&self, vol: VolId, ino: Ino) {
        self.open.lock().unwrap().remove(&(vol, ino));
    }

    fn path(&self, vol: VolId, ino: Ino) -> PathBuf {
        self.root.join(vol.to_string()).join(format!("{:02x}", ino & 0xff)).join(ino.to_string())
    }

    fn open_rw(&self, vol: VolId, ino: Ino) -> FsResult<File> {
        let path = self.path(vol, ino);
        match OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
                }
                OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(|e| io_err("open", &path, e))
            }
            Err(e) => Err(io_err("open", &path, e)),
        }
    }
}

impl BlobStore for LocalBlobs {
    fn read(&self, vol: VolId, ino: Ino, offset: u64, buf: &mut [u8]) -> FsResult<()> {
        let path = self.path(vol, ino);
        let cached = self.open.lock().unwrap().get(&(vol, ino)).cloned();
        let f = match cached {
            Some(f) => f,
            None => match File::open(&path) {
                Ok(f) => Arc::new(f),
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    buf.fill(0);
                    return Ok(());
                }
                Err(e) => return Err(io_err("open", &path, e)),
            },
        };
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err("read", &path, e)),
            }
        }
        buf[done..].fill(0);
        Ok(())
    }

    fn write(&self, vol: VolId, ino: Ino, offset: u64, data: &[u8]) -> FsResult<()> {
        let f = self.file(vol, ino)?;
        f.write_all_at(data, offset).map_err(|e| io_err("write", &self.path(vol, ino), e))
    }

    fn truncate(&self, vol: VolId, ino: Ino, size: u64) -> FsResult<()> {
        if size == 0 {
            return self.remove(vol, ino);
        }
        let f = self.file(vol, ino)?;
        f.set_len(size).map_err(|e| io_err("truncate", &self.path(vol, ino), e))
    }

    fn zero(&self, vol: VolId, ino: Ino, offset: u64, len: u64) -> FsResult<()> {
        let path = self.path(vol, ino);
        if !self.open.lock().unwrap().contains_key(&(vol, ino)) && !path.exists() {
            // Nothing stored: it reads as zeros already (and `file` would create it).
            return Ok(());
        }
        let f = self.file(vol, ino)?;
        let flags = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: fallocate on a descriptor this store owns; no memory is passed.
        let r = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&*f), flags, offset as libc::off_t, len as libc::off_t) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(io_err("punch a hole in", &path, e));
        }
        // A host filesystem without holes: write the zeros, within the blob's current length.
        let blob_len = f.metadata().map_err(|e| io_err("stat", &path, e))?.len();
        let end = (offset + len).min(blob_len);
        let zeros = vec![0u8; 1 << 20];
        let mut at = offset;
        while at < end {
            let k = ((end - at) as usize).min(zeros.len());
            f.write_all_at(&zeros[..k], at).map_err(|e| io_err("write", &path, e))?;
            at += k as u64;
        }
        Ok(())
    }

    fn remove(&self, vol: VolId, ino: Ino) -> FsResult<()> {
        self.forget(vol, ino);
        let path = self.path(vol, ino);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path, e)),
        }
    }

    fn remove_volume(&self, vol: VolId) -> FsResult<()> {
        self.open.lock().unwrap().retain(|(v, _), _| *v != vol);
        let path = self.root.join(vol.to_string());
        match std::fs::remove_dir_all(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path, e)),
        }
    }

    fn sync(&self, vol: VolId, ino: Ino) -> FsResult<()> {
        let path = self.path(vol, ino);
        if let Some(f) = self.open.lock().unwrap().get(&(vol, ino)).cloned() {
            return f.sync_all().map_err(|e| io_err("sync", &path, e));
        }
        match File::open(&path) {
            Ok(f) => f.sync_all().map_err(|e| io_err("sync", &path, e)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("open", &path, e)),
        }
    }
}

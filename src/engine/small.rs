//! [`SmallFirst`]: small files' data in a SQLite table, the rest in [`LocalBlobs`] files.
//!
//! A host file per guest file costs an inode allocation on the host's filesystem for every file
//! a sandbox writes. On a busy ext4 (many recent deletions, which its allocator steps around)
//! that was measured at 0.5-1 ms: ten times the rest of a create, and most of an untar. Most
//! files are small, so a blob lives as one row of `small` in `blobs.db` (its own database: the
//! engine writes data inside its metadata transaction, which holds `meta.db`'s write lock)
//! while it is at most [`SMALL_MAX`] bytes long, and moves to a data file the first time it
//! grows past that.
//!
//! A row, when there is one, is the blob: a move writes the file and syncs it, then deletes the
//! row and syncs that, so a crash at any point leaves either the row (the older content, which
//! the committed metadata describes) or the file with everything the row had. Like every
//! write, a row is committed before the metadata that makes its bytes visible.

use super::blob::{BlobStore, LocalBlobs};
use super::meta::VolId;
use super::sqlite::{sync_wal, wal_of};
use crate::fs::{FsError, FsResult, Ino};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The largest blob kept as a row. A row is rewritten whole on each write to it, so this also
/// bounds what a small write costs.
pub const SMALL_MAX: u64 = 64 << 10;

pub struct SmallFirst {
    db: Mutex<Connection>,
    wal: PathBuf,
    files: LocalBlobs,
}

fn db_err(e: rusqlite::Error) -> FsError {
    FsError::new(libc::EIO, format!("data store (small files): {e}"))
}

impl SmallFirst {
    /// Rows in the database `db`, files under `dir`.
    pub fn open(dir: &Path, db: &Path) -> FsResult<SmallFirst> {
        let files = LocalBlobs::open(dir)?;
        let conn = Connection::open(db).map_err(db_err)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000;
             CREATE TABLE IF NOT EXISTS small (vol INTEGER NOT NULL, ino INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (vol, ino)) WITHOUT ROWID;",
        )
        .map_err(db_err)?;
        Ok(SmallFirst { db: Mutex::new(conn), wal: wal_of(db), files })
    }

    fn row(&self, vol: VolId, ino: Ino) -> FsResult<Option<Vec<u8>>> {
        let db = self.db.lock().unwrap();
        let mut st = db.prepare_cached("SELECT data FROM small WHERE vol = ?1 AND ino = ?2").map_err(db_err)?;
        st.query_row(params![vol, ino as i64], |r| r.get(0)).optional().map_err(db_err)
    }

    fn has_row(&self, vol: VolId, ino: Ino) -> FsResult<bool> {
        let db = self.db.lock().unwrap();
        let mut st = db.prepare_cached("SELECT 1 FROM small WHERE vol = ?1 AND ino = ?2").map_err(db_err)?;
        st.exists(params![vol, ino as i64]).map_err(db_err)
    }

    fn put(&self, vol: VolId, ino: Ino, data: &[u8]) -> FsResult<()> {
        let db = self.db.lock().unwrap();
        let mut st = db.prepare_cached("INSERT OR REPLACE INTO small (vol, ino, data) VALUES (?1, ?2, ?3)").map_err(db_err)?;
        st.execute(params![vol, ino as i64, data]).map_err(db_err)?;
        Ok(())
    }

    fn delete(&self, vol: VolId, ino: Ino) -> FsResult<()> {
        let db = self.db.lock().unwrap();
        let mut st = db.prepare_cached("DELETE FROM small WHERE vol = ?1 AND ino = ?2").map_err(db_err)?;
        st.execute(params![vol, ino as i64]).map_err(db_err)?;
        Ok(())
    }

    /// Moves a row's blob to a data file (see the module docs for the order).
    fn to_file(&self, vol: VolId, ino: Ino, cur: &[u8]) -> FsResult<()> {
        self.files.remove(vol, ino)?;
        if !cur.is_empty() {
            self.files.write(vol, ino, 0, cur)?;
        }
        self.files.sync(vol, ino)?;
        self.delete(vol, ino)?;
        sync_wal(&self.wal)
    }
}

/// `[offset, offset + len)` as indices into a row, if it ends within [`SMALL_MAX`].
fn small_range(offset: u64, len: u64) -> Option<(usize, usize)> {
    let end = offset.checked_add(len)?;
    (end <= SMALL_MAX).then_some((offset as usize, end as usize))
}

impl BlobStore for SmallFirst {
    fn read(&self, vol: VolId, ino: Ino, offset: u64, buf: &mut [u8]) -> FsResult<()> {
        let Some(cur) = self.row(vol, ino)? else { return self.files.read(vol, ino, offset, buf) };
        let start = offset.min(cur.len() as u64) as usize;
        let n = (cur.len() - start).min(buf.len());
        buf[..n].copy_from_slice(&cur[start..start + n]);
        buf[n..].fill(0);
        Ok(())
    }

    fn write(&self, vol: VolId, ino: Ino, offset: u64, data: &[u8]) -> FsResult<()> {
        let range = small_range(offset, data.len() as u64);
        let cur = match self.row(vol, ino)? {
            Some(cur) => cur,
            // A new blob starts as a row if it fits; one stored as a file stays a file.
            None if range.is_some() && !self.files.exists(vol, ino) => Vec::new(),
            None => return self.files.write(vol, ino, offset, data),
        };
        match range {
            Some((start, end)) => {
                let mut cur = cur;
                if cur.len() < end {
                    cur.resize(end, 0);
                }
                cur[start..end].copy_from_slice(data);
                self.put(vol, ino, &cur)
            }
            None => {
                self.to_file(vol, ino, &cur)?;
                self.files.write(vol, ino, offset, data)
            }
        }
    }

    fn truncate(&self, vol: VolId, ino: Ino, size: u64) -> FsResult<()> {
        let Some(mut cur) = self.row(vol, ino)? else {
            // Nothing stored at all reads as zeros at any length: no file is made for that.
            if size > 0 && !self.files.exists(vol, ino) {
                return Ok(());
            }
            return self.files.truncate(vol, ino, size);
        };
        if size == 0 {
            return self.delete(vol, ino);
        }
        if size <= SMALL_MAX {
            cur.resize(size as usize, 0);
            return self.put(vol, ino, &cur);
        }
        self.to_file(vol, ino, &cur)?;
        self.files.truncate(vol, ino, size)
    }

    fn zero(&self, vol: VolId, ino: Ino, offset: u64, len: u64) -> FsResult<()> {
        let Some(mut cur) = self.row(vol, ino)? else { return self.files.zero(vol, ino, offset, len) };
        let start = offset.min(cur.len() as u64) as usize;
        let end = offset.saturating_add(len).min(cur.len() as u64) as usize;
        if start < end {
            cur[start..end].fill(0);
            self.put(vol, ino, &cur)?;
        }
        Ok(())
    }

    fn remove(&self, vol: VolId, ino: Ino) -> FsResult<()> {
        self.delete(vol, ino)?;
        self.files.remove(vol, ino)
    }

    fn remove_volume(&self, vol: VolId) -> FsResult<()> {
        self.db.lock().unwrap().execute("DELETE FROM small WHERE vol = ?1", params![vol]).map_err(db_err)?;
        self.files.remove_volume(vol)
    }

    fn sync(&self, vol: VolId, ino: Ino) -> FsResult<()> {
        if self.has_row(vol, ino)? {
            return sync_wal(&self.wal);
        }
        self.files.sync(vol, ino)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store in a fresh directory, removed when the guard drops.
    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn store() -> (Dir, SmallFirst) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let d = Dir(std::env::temp_dir().join(format!("volumefs-small-{}-{n}", std::process::id())));
        let _ = std::fs::remove_dir_all(&d.0);
        let s = SmallFirst::open(&d.0.join("blobs"), &d.0.join("blobs.db")).unwrap();
        (d, s)
    }

    fn read(s: &SmallFirst, off: u64, n: usize) -> Vec<u8> {
        let mut b = vec![7u8; n];
        s.read(1, 5, off, &mut b).unwrap();
        b
    }

    /// A small blob is a row and no file; growing past SMALL_MAX moves it to a file with every
    /// byte; shrinking a file's blob keeps it a file.
    #[test]
    fn small_blobs_are_rows_until_they_grow() {
        let (_d, s) = store();
        s.write(1, 5, 0, b"hello").unwrap();
        s.write(1, 5, 10, b"world").unwrap();
        assert!(s.row(1, 5).unwrap().is_some() && !s.files.exists(1, 5), "a small blob is a row");
        assert_eq!(read(&s, 0, 20), b"hello\0\0\0\0\0world\0\0\0\0\0");
        s.zero(1, 5, 1, 3).unwrap();
        assert_eq!(read(&s, 0, 6), b"h\0\0\0o\0");
        s.write(1, 5, SMALL_MAX, b"!").unwrap();
        assert!(s.row(1, 5).unwrap().is_none() && s.files.exists(1, 5), "moved to a file");
        assert_eq!(read(&s, 0, 15), b"h\0\0\0o\0\0\0\0\0world");
        assert_eq!(read(&s, SMALL_MAX, 2), b"!\0");
        s.truncate(1, 5, 3).unwrap();
        assert!(s.files.exists(1, 5), "a file stays a file");
        assert_eq!(read(&s, 0, 5), b"h\0\0\0\0");
        s.remove(1, 5).unwrap();
        assert_eq!(read(&s, 0, 3), b"\0\0\0");
    }

    /// Truncating a row keeps or cuts its bytes; extending an empty blob stores nothing.
    #[test]
    fn truncate_of_rows_and_of_nothing() {
        let (_d, s) = store();
        s.truncate(1, 5, 1000).unwrap();
        assert!(s.row(1, 5).unwrap().is_none() && !s.files.exists(1, 5), "nothing stored for a hole");
        s.write(1, 5, 0, b"abcdef").unwrap();
        s.truncate(1, 5, 2).unwrap();
        s.truncate(1, 5, 4).unwrap();
        assert_eq!(read(&s, 0, 6), b"ab\0\0\0\0");
        s.truncate(1, 5, SMALL_MAX + 1).unwrap();
        assert!(s.files.exists(1, 5), "grown past the limit: a file");
        assert_eq!(read(&s, 0, 3), b"ab\0");
        s.remove_volume(1).unwrap();
        assert_eq!(read(&s, 0, 2), b"\0\0");
    }
}

//! [`MetaStore`] on SQLite: the embedded default.
//!
//! One database file in WAL mode with `synchronous=NORMAL`: a commit is a write to the WAL
//! without an fsync, so metadata operations cost microseconds. Durability on demand (fsync from a
//! guest) is an fdatasync of the WAL file, which holds every committed transaction since the last
//! checkpoint; a checkpoint itself syncs the database. One connection behind a mutex: SQLite has
//! one writer anyway, and the engine's transactions are short.

use super::meta::*;
use super::sql::{SqlConn, SqlRow, SqlTxn, Val};
use crate::fs::{FsError, FsResult, Kind};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{params, Connection, Row, Transaction};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub struct SqliteMeta {
    conn: Mutex<Connection>,
    wal: PathBuf,
}

fn db_err(e: rusqlite::Error) -> FsError {
    FsError::new(libc::EIO, format!("metadata store: {e}"))
}

impl SqliteMeta {
    pub fn open(path: &Path) -> FsResult<SqliteMeta> {
        let conn = Connection::open(path).map_err(db_err)?;
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=OFF; PRAGMA busy_timeout=5000;")
            .map_err(db_err)?;
        conn.execute_batch(&super::sql::schema("INTEGER", "BLOB", "INTEGER PRIMARY KEY AUTOINCREMENT", " WITHOUT ROWID"))
            .map_err(db_err)?;
        // Data directories from before files were charged for stored bytes (not apparent size)
        // gain `inodes.alloc`, and each file one stored range covering it, which is what it cost
        // then: usage stays the same.
        let has_column = |name: &str| -> FsResult<bool> {
            let sql = "SELECT COUNT(*) FROM pragma_table_info('inodes') WHERE name = ?1";
            Ok(conn.query_row(sql, params![name], |r| r.get::<_, i64>(0)).map_err(db_err)? > 0)
        };
        if !has_column("alloc")? {
            conn.execute_batch(&format!(
                "BEGIN;
                 ALTER TABLE inodes ADD COLUMN alloc INTEGER NOT NULL DEFAULT 0;
                 INSERT INTO extents (vol, ino, start, stop) SELECT vol, ino, 0, size FROM inodes WHERE kind = {f} AND size > 0;
                 UPDATE inodes SET alloc = size WHERE kind = {f};
                 COMMIT;",
                f = Kind::File.code()
            ))
            .map_err(db_err)?;
        }
        // ... and `inodes.xattrs`, set where an inode has any.
        if !has_column("xattrs")? {
            conn.execute_batch(
                "BEGIN;
                 ALTER TABLE inodes ADD COLUMN xattrs INTEGER NOT NULL DEFAULT 0;
                 UPDATE inodes SET xattrs = 1 WHERE EXISTS (SELECT 1 FROM xattrs x WHERE x.vol = inodes.vol AND x.ino = inodes.ino);
                 COMMIT;",
            )
            .map_err(db_err)?;
        }
        Ok(SqliteMeta { conn: Mutex::new(conn), wal: wal_of(path) })
    }
}

/// The write-ahead log of the database at `db`.
pub(super) fn wal_of(db: &Path) -> PathBuf {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    PathBuf::from(wal)
}

/// Makes every transaction committed to a WAL-mode database durable: an fdatasync of its WAL,
/// which holds all of them since the last checkpoint (a checkpoint syncs the database itself).
pub(super) fn sync_wal(wal: &Path) -> FsResult<()> {
    match std::fs::File::open(wal) {
        Ok(f) => f.sync_data().map_err(FsError::from),
        // No WAL file: everything is already in the (synced) database.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

impl MetaStore for SqliteMeta {
    fn transact(&self, f: &mut dyn FnMut(&mut dyn MetaTxn) -> FsResult<()>) -> FsResult<()> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction().map_err(db_err)?;
        f(&mut SqlTxn(&mut SqliteConn(&tx)))?;
        tx.commit().map_err(db_err)
    }

    fn sync(&self) -> FsResult<()> {
        sync_wal(&self.wal)
    }
}

/// Statements of one SQLite transaction (prepared once per connection and cached).
struct SqliteConn<'a>(&'a Transaction<'a>);

impl rusqlite::ToSql for Val<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match *self {
            Val::Null => ValueRef::Null,
            Val::Int(i) => ValueRef::Integer(i),
            Val::Bytes(b) => ValueRef::Blob(b),
            Val::Text(t) => ValueRef::Text(t.as_bytes()),
        }))
    }
}

impl SqlRow for Row<'_> {
    fn opt_int(&self, i: usize) -> FsResult<Option<i64>> {
        self.get(i).map_err(db_err)
    }

    fn opt_bytes(&self, i: usize) -> FsResult<Option<Vec<u8>>> {
        self.get(i).map_err(db_err)
    }

    fn text(&self, i: usize) -> FsResult<String> {
        self.get(i).map_err(db_err)
    }
}

impl SqlConn for SqliteConn<'_> {
    fn clock(&mut self) -> FsResult<Option<crate::fs::Timespec>> {
        Ok(None)
    }

    fn announce(&mut self, _: &str) -> FsResult<()> {
        Ok(())
    }

    fn exec(&mut self, sql: &'static str, params: &[Val]) -> FsResult<u64> {
        let mut st = self.0.prepare_cached(sql).map_err(db_err)?;
        Ok(st.execute(rusqlite::params_from_iter(params)).map_err(db_err)? as u64)
    }

    fn query(&mut self, sql: &'static str, params: &[Val], each: &mut dyn FnMut(&dyn SqlRow) -> FsResult<()>) -> FsResult<()> {
        let mut st = self.0.prepare_cached(sql).map_err(db_err)?;
        let mut rows = st.query(rusqlite::params_from_iter(params)).map_err(db_err)?;
        while let Some(r) = rows.next().map_err(db_err)? {
            each(r)?;
        }
        Ok(())
    }
}

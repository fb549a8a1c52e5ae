//! [`MetaStore`] on SQLite: the embedded default.
//!
//! One database file in WAL mode with `synchronous=NORMAL`: a commit is a write to the WAL
//! without an fsync, so metadata operations cost microseconds. Durability on demand (fsync from a
//! guest) is an fdatasync of the WAL file, which holds every committed transaction since the last
//! checkpoint; a checkpoint itself syncs the database. One connection behind a mutex: SQLite has
//! one writer anyway, and the engine's transactions are short.

use super::meta::*;
use crate::fs::{Attr, FsError, FsResult, Ino, Kind, Timespec};
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

fn tenant_row(r: &Row) -> rusqlite::Result<TenantRow> {
    Ok(TenantRow {
        name: r.get(0)?,
        token_sha256: r.get(1)?,
        default_cap: r.get::<_, i64>(2)? as u64,
        created: Timespec::from_nanos(r.get(3)?),
    })
}

pub struct SqliteMeta {
    conn: Mutex<Connection>,
    wal: PathBuf,
}

/// The schema, run at every open. Every statement is idempotent, and that is how the schema is
/// upgraded: a data directory made by an older version gains the tables and indexes it lacks
/// (the change log came that way). A change that is not purely additive (a new column, a new
/// meaning) will need a versioned step (`PRAGMA user_version`).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS volumes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    cap INTEGER NOT NULL,
    used INTEGER NOT NULL DEFAULT 0,
    next_ino INTEGER NOT NULL DEFAULT 2,
    inodes INTEGER NOT NULL DEFAULT 1,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS inodes (
    vol INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    -- permission bits (0o7777), and above them (bit 16 up) the ACL marks of Attr::acl:
    -- rows written before ACLs have none, so no migration was needed.
    perm INTEGER NOT NULL,
    nlink INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    size INTEGER NOT NULL,
    alloc INTEGER NOT NULL DEFAULT 0,
    xattrs INTEGER NOT NULL DEFAULT 0,
    atime INTEGER NOT NULL,
    mtime INTEGER NOT NULL,
    ctime INTEGER NOT NULL,
    rdev INTEGER NOT NULL,
    target BLOB,
    PRIMARY KEY (vol, ino)
);
CREATE INDEX IF NOT EXISTS inodes_orphans ON inodes (nlink) WHERE nlink = 0;
CREATE TABLE IF NOT EXISTS dentries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vol INTEGER NOT NULL,
    parent INTEGER NOT NULL,
    name BLOB NOT NULL,
    ino INTEGER NOT NULL,
    kind INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS dentries_name ON dentries (vol, parent, name);
CREATE INDEX IF NOT EXISTS dentries_ino ON dentries (vol, ino);
CREATE TABLE IF NOT EXISTS xattrs (
    vol INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    name BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (vol, ino, name)
);
CREATE TABLE IF NOT EXISTS extents (
    vol INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    start INTEGER NOT NULL,
    stop INTEGER NOT NULL,
    PRIMARY KEY (vol, ino, start)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS replays (
    session INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    a INTEGER NOT NULL,
    b INTEGER NOT NULL,
    time INTEGER NOT NULL,
    PRIMARY KEY (session, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    default_cap INTEGER NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sandboxes (
    name TEXT PRIMARY KEY,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS attachments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sandbox TEXT NOT NULL,
    vol INTEGER NOT NULL,
    path TEXT NOT NULL,
    read_only INTEGER NOT NULL,
    subpath TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    vol INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    node INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    path BLOB NOT NULL,
    from_path BLOB,
    time INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_vol ON changes (vol, id);
CREATE TABLE IF NOT EXISTS changes_pruned (
    vol INTEGER PRIMARY KEY,
    through INTEGER NOT NULL
);
";

fn db_err(e: rusqlite::Error) -> FsError {
    FsError::new(libc::EIO, format!("metadata store: {e}"))
}

impl SqliteMeta {
    pub fn open(path: &Path) -> FsResult<SqliteMeta> {
        let conn = Connection::open(path).map_err(db_err)?;
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=OFF; PRAGMA busy_timeout=5000;")
            .map_err(db_err)?;
        conn.execute_batch(SCHEMA).map_err(db_err)?;
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
        let mut t = SqliteTxn { tx };
        f(&mut t)?;
        t.tx.commit().map_err(db_err)
    }

    fn sync(&self) -> FsResult<()> {
        sync_wal(&self.wal)
    }
}

struct SqliteTxn<'a> {
    tx: Transaction<'a>,
}

fn row_volume(r: &Row<'_>) -> rusqlite::Result<VolumeRow> {
    Ok(VolumeRow {
        id: r.get(0)?,
        name: r.get(1)?,
        cap: r.get::<_, i64>(2)? as u64,
        used: r.get::<_, i64>(3)? as u64,
        inodes: r.get::<_, i64>(4)? as u64,
        created: Timespec::from_nanos(r.get(5)?),
    })
}

const VOLUME_COLS: &str = "id, name, cap, used, inodes, created";

/// Where the ACL marks ([`Attr::acl`]) sit in the `perm` column.
const ACL_SHIFT: u32 = 16;

fn row_attr(r: &Row<'_>) -> rusqlite::Result<Attr> {
    let kind: i64 = r.get(1)?;
    let perm = r.get::<_, i64>(2)? as u32;
    Ok(Attr {
        ino: r.get::<_, i64>(0)? as u64,
        kind: Kind::from_code(kind).unwrap_or(Kind::File),
        perm: perm & 0o7777,
        nlink: r.get::<_, i64>(3)? as u32,
        uid: r.get::<_, i64>(4)? as u32,
        gid: r.get::<_, i64>(5)? as u32,
        size: r.get::<_, i64>(6)? as u64,
        atime: Timespec::from_nanos(r.get(7)?),
        mtime: Timespec::from_nanos(r.get(8)?),
        ctime: Timespec::from_nanos(r.get(9)?),
        rdev: r.get::<_, i64>(10)? as u32,
        alloc: r.get::<_, i64>(11)? as u64,
        xattrs: r.get::<_, i64>(12)? != 0,
        acl: (perm >> ACL_SHIFT) as u8,
    })
}

fn row_attachment(r: &Row<'_>) -> rusqlite::Result<AttachmentRow> {
    let state: String = r.get(6)?;
    Ok(AttachmentRow {
        id: r.get::<_, i64>(0)? as u64,
        sandbox: r.get(1)?,
        volume: r.get(2)?,
        path: r.get(3)?,
        read_only: r.get::<_, i64>(4)? != 0,
        subpath: r.get(5)?,
        state: AttachState::parse(&state).unwrap_or(AttachState::Failed),
        reason: r.get(7)?,
    })
}

fn row_change(r: &Row<'_>) -> rusqlite::Result<ChangeRow> {
    Ok(ChangeRow {
        id: r.get::<_, i64>(0)? as u64,
        kind: ChangeKind::from_code(r.get(1)?).unwrap_or(ChangeKind::Modify),
        node: Kind::from_code(r.get(2)?).unwrap_or(Kind::File),
        ino: r.get::<_, i64>(3)? as u64,
        path: r.get(4)?,
        from: r.get(5)?,
        time: Timespec::from_nanos(r.get(6)?),
    })
}

const CHANGE_COLS: &str = "id, kind, node, ino, path, from_path, time";

const ATTACHMENT_COLS: &str = "id, sandbox, vol, path, read_only, subpath, state, reason";

impl MetaTxn for SqliteTxn<'_> {
    fn volume_by_name(&mut self, name: &str) -> FsResult<Option<VolumeRow>> {
        let sql = format!("SELECT {VOLUME_COLS} FROM volumes WHERE name = ?1");
        self.tx.query_row(&sql, params![name], row_volume).optional().map_err(db_err)
    }

    fn volume_by_id(&mut self, id: VolId) -> FsResult<Option<VolumeRow>> {
        let sql = format!("SELECT {VOLUME_COLS} FROM volumes WHERE id = ?1");
        self.tx.query_row(&sql, params![id], row_volume).optional().map_err(db_err)
    }

    fn list_volumes(&mut self) -> FsResult<Vec<VolumeRow>> {
        let sql = format!("SELECT {VOLUME_COLS} FROM volumes ORDER BY name");
        let mut st = self.tx.prepare_cached(&sql).map_err(db_err)?;
        let rows = st.query_map([], row_volume).map_err(db_err)?;
        rows.collect::<Result<_, _>>().map_err(db_err)
    }

    fn insert_volume(&mut self, name: &str, cap: u64, now: Timespec) -> FsResult<VolId> {
        self.tx
            .execute("INSERT INTO volumes (name, cap, created) VALUES (?1, ?2, ?3)", params![name, cap as i64, now.to_nanos()])
            .map_err(db_err)?;
        Ok(self.tx.last_insert_rowid())
    }

    fn delete_volume(&mut self, id: VolId) -> FsResult<()> {
        for table in ["inodes", "dentries", "xattrs", "extents", "changes", "changes_pruned"] {
            self.tx.execute(&format!("DELETE FROM {table} WHERE vol = ?1"), params![id]).map_err(db_err)?;
        }
        self.tx.execute("DELETE FROM volumes WHERE id = ?1", params![id]).map_err(db_err)?;
        Ok(())
    }

    fn add_used(&mut self, id: VolId, delta: i64) -> FsResult<()> {
        self.tx
            .prepare_cached("UPDATE volumes SET used = MAX(0, used + ?2) WHERE id = ?1")
            .and_then(|mut st| st.execute(params![id, delta]))
            .map_err(db_err)?;
        Ok(())
    }

    fn next_ino(&mut self, vol: VolId) -> FsResult<Ino> {
        let ino: i64 = self
            .tx
            .prepare_cached("UPDATE volumes SET next_ino = next_ino + 1, inodes = inodes + 1 WHERE id = ?1 RETURNING next_ino - 1")
            .and_then(|mut st| st.query_row(params![vol], |r| r.get(0)))
            .map_err(db_err)?;
        Ok(ino as u64)
    }

    fn get_inode(&mut self, vol: VolId, ino: Ino) -> FsResult<Option<Attr>> {
        self.tx
            .prepare_cached(
                "SELECT ino, kind, perm, nlink, uid, gid, size, atime, mtime, ctime, rdev, alloc, xattrs FROM inodes WHERE vol = ?1 AND ino = ?2",
            )
            .and_then(|mut st| st.query_row(params![vol, ino as i64], row_attr).optional())
            .map_err(db_err)
    }

    fn put_inode(&mut self, vol: VolId, a: &Attr) -> FsResult<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO inodes (vol, ino, kind, perm, nlink, uid, gid, size, atime, mtime, ctime, rdev, alloc, xattrs)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
                 ON CONFLICT (vol, ino) DO UPDATE SET kind = excluded.kind, perm = excluded.perm,
                   nlink = excluded.nlink, uid = excluded.uid, gid = excluded.gid, size = excluded.size,
                   atime = excluded.atime, mtime = excluded.mtime, ctime = excluded.ctime, rdev = excluded.rdev,
                   alloc = excluded.alloc, xattrs = excluded.xattrs",
            )
            .and_then(|mut st| {
                st.execute(params![
                    vol,
                    a.ino as i64,
                    a.kind.code(),
                    ((a.perm & 0o7777) | (a.acl as u32) << ACL_SHIFT) as i64,
                    a.nlink as i64,
                    a.uid as i64,
                    a.gid as i64,
                    a.size as i64,
                    a.atime.to_nanos(),
                    a.mtime.to_nanos(),
                    a.ctime.to_nanos(),
                    a.rdev as i64,
                    a.alloc as i64,
                    a.xattrs as i64
                ])
            })
            .map_err(db_err)?;
        Ok(())
    }

    fn delete_inode(&mut self, vol: VolId, ino: Ino) -> FsResult<()> {
        let n = self.tx.execute("DELETE FROM inodes WHERE vol = ?1 AND ino = ?2", params![vol, ino as i64]).map_err(db_err)?;
        self.tx.execute("UPDATE volumes SET inodes = inodes - ?2 WHERE id = ?1", params![vol, n as i64]).map_err(db_err)?;
        self.tx.execute("DELETE FROM xattrs WHERE vol = ?1 AND ino = ?2", params![vol, ino as i64]).map_err(db_err)?;
        self.tx.execute("DELETE FROM extents WHERE vol = ?1 AND ino = ?2", params![vol, ino as i64]).map_err(db_err)?;
        Ok(())
    }

    fn get_target(&mut self, vol: VolId, ino: Ino) -> FsResult<Vec<u8>> {
        let t: Option<Option<Vec<u8>>> = self
            .tx
            .query_row("SELECT target FROM inodes WHERE vol = ?1 AND ino = ?2", params![vol, ino as i64], |r| r.get(0))
            .optional()
            .map_err(db_err)?;
        Ok(t.flatten().unwrap_or_default())
    }

    fn set_target(&mut self, vol: VolId, ino: Ino, target: &[u8]) -> FsResult<()> {
        self.tx.execute("UPDATE inodes SET target = ?3 WHERE vol = ?1 AND ino = ?2", params![vol, ino as i64, target]).map_err(db_err)?;
        Ok(())
    }

    fn orphans(&mut self) -> FsResult<Vec<(VolId, Ino, u64)>> {
        let mut st = self.tx.prepare("SELECT vol, ino, size FROM inodes WHERE nlink = 0").map_err(db_err)?;
        let rows =
            st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64))).map_err(db_err)?;
        rows.collect::<Result<_, _>>().map_err(db_err)
    }

    fn get_dentry(&mut self, vol: VolId, parent: Ino, name: &[u8]) -> FsResult<Option<(Ino, Kind)>> {
        self.tx
            .prepare_cached("SELECT ino, kind FROM dentries WHERE vol = ?1 AND parent = ?2 AND name = ?3")
            .and_then(|mut st| {
                st.query_row(params![vol, parent as i64, name], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, Kind::from_code(r.get(1)?).unwrap_or(Kind::File)))
                })
                .optional()
            })
            .map_err(db_err)
    }

    fn insert_dentry(&mut self, vol: VolId, parent: Ino, name: &[u8], ino: Ino, kind: Kind) -> FsResult<()> {
        self.tx
            .prepare_cached("INSERT INTO dentries (vol, parent, name, ino, kind) VALUES (?1, ?2, ?3, ?4, ?5)")
            .and_then(|mut st| st.execute(params![vol, parent as i64, name, ino as i64, kind.code()]))
            .map_err(db_err)?;
        Ok(())
    }

    fn delete_dentry(&mut self, vol: VolId, parent: Ino, name: &[u8]) -> FsResult<()> {
        self.tx
            .prepare_cached("DELETE FROM dentries WHERE vol = ?1 AND parent = ?2 AND name = ?3")
            .and_then(|mut st| st.execute(params![vol, parent as i64, name]))
            .map_err(db_err)?;
        Ok(())
    }

    fn extents(&mut self, vol: VolId, ino: Ino, from: u64, to: u64) -> FsResult<Vec<(u64, u64)>> {
        // Ranges are disjoint and never touch: only the last one starting at or before `from`
        // can reach it, so the scan starts there (an index seek, not a walk of the file).
        let mut st = self
            .tx
            .prepare_cached(
                "SELECT start, stop FROM extents WHERE vol = ?1 AND ino = ?2
                   AND start >= COALESCE((SELECT MAX(start) FROM extents WHERE vol = ?1 AND ino = ?2 AND start <= ?3), ?3)
                   AND start <= ?4 ORDER BY start",
            )
            .map_err(db_err)?;
        let rows = st
            .query_map(params![vol, ino as i64, from as i64, to.min(i64::MAX as u64) as i64], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })
            .map_err(db_err)?;
        let all: Vec<(u64, u64)> = rows.collect::<Result<_, _>>().map_err(db_err)?;
        Ok(all.into_iter().filter(|(_, end)| *end >= from).collect())
    }

    fn replace_extents(&mut self, vol: VolId, ino: Ino, old: &[(u64, u64)], new: &[(u64, u64)]) -> FsResult<()> {
        // A range that keeps its start (an extending write, the common case) is rewritten in
        // place by the insert: one statement, not a delete and an insert.
        for (start, _) in old.iter().filter(|(s, _)| !new.iter().any(|(n, _)| n == s)) {
            self.tx
                .prepare_cached("DELETE FROM extents WHERE vol = ?1 AND ino = ?2 AND start = ?3")
                .and_then(|mut st| st.execute(params![vol, ino as i64, *start as i64]))
                .map_err(db_err)?;
        }
        for (start, end) in new {
            self.tx
                .prepare_cached("INSERT OR REPLACE INTO extents (vol, ino, start, stop) VALUES (?1, ?2, ?3, ?4)")
                .and_then(|mut st| st.execute(params![vol, ino as i64, *start as i64, *end as i64]))
                .map_err(db_err)?;
        }
        Ok(())
    }

    fn insert_replay(&mut self, session: u64, seq: u64, rec: (u64, u64), now: Timespec) -> FsResult<()> {
        self.tx
            .prepare_cached("INSERT OR REPLACE INTO replays (session, seq, a, b, time) VALUES (?1, ?2, ?3, ?4, ?5)")
            .and_then(|mut st| st.execute(params![session as i64, seq as i64, rec.0 as i64, rec.1 as i64, now.to_nanos()]))
            .map_err(db_err)?;
        Ok(())
    }

    fn get_replay(&mut self, session: u64, seq: u64) -> FsResult<Option<(u64, u64)>> {
        self.tx
            .prepare_cached("SELECT a, b FROM replays WHERE session = ?1 AND seq = ?2")
            .and_then(|mut st| {
                st.query_row(params![session as i64, seq as i64], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)))
                    .optional()
            })
            .map_err(db_err)
    }

    fn last_replay_seq(&mut self, session: u64) -> FsResult<u64> {
        let n: Option<i64> =
            self.tx.query_row("SELECT MAX(seq) FROM replays WHERE session = ?1", params![session as i64], |r| r.get(0)).map_err(db_err)?;
        Ok(n.unwrap_or(0) as u64)
    }

    fn prune_replays(&mut self, session: u64, below: u64) -> FsResult<()> {
        self.tx
            .prepare_cached("DELETE FROM replays WHERE session = ?1 AND seq < ?2")
            .and_then(|mut st| st.execute(params![session as i64, below.min(i64::MAX as u64) as i64]))
            .map_err(db_err)?;
        Ok(())
    }

    fn expire_replays(&mut self, before: Timespec) -> FsResult<u64> {
        let n = self.tx.execute("DELETE FROM replays WHERE time < ?1", params![before.to_nanos()]).map_err(db_err)?;
        Ok(n as u64)
    }

    fn move_dentry(&mut self, vol: VolId, parent: Ino, name: &[u8], new_parent: Ino, new_name: &[u8]) -> FsResult<()> {
        self.tx
            .prepare_cached("UPDATE dentries SET parent = ?4, name = ?5 WHERE vol = ?1 AND parent = ?2 AND name = ?3")
            .and_then(|mut st| st.execute(params![vol, parent as i64, name, new_parent as i64, new_name]))
            .map_err(db_err)?;
        Ok(())
    }

    fn set_dentry_target(&mut self, vol: VolId, parent: Ino, name: &[u8], ino: Ino, kind: Kind) -> FsResult<()> {
        self.tx
            .prepare_cached("UPDATE dentries SET ino = ?4, kind = ?5 WHERE vol = ?1 AND parent = ?2 AND name = ?3")
            .and_then(|mut st| st.execute(params![vol, parent as i64, name, ino as i64, kind.code()]))
            .map_err(db_err)?;
        Ok(())
    }

    fn list_dentries(&mut self, vol: VolId, parent: Ino, after: u64, limit: u32) -> FsResult<Vec<DentryRow>> {
        let mut st = self
            .tx
            .prepare_cached("SELECT id, name, ino, kind FROM dentries WHERE vol = ?1 AND parent = ?2 AND id > ?3 ORDER BY id LIMIT ?4")
            .map_err(db_err)?;
        let rows = st
            .query_map(params![vol, parent as i64, after as i64, limit as i64], |r| {
                Ok(DentryRow {
                    cookie: r.get::<_, i64>(0)? as u64,
                    name: r.get(1)?,
                    ino: r.get::<_, i64>(2)? as u64,
                    kind: Kind::from_code(r.get(3)?).unwrap_or(Kind::File),
                })
            })
            .map_err(db_err)?;
        rows.collect::<Result<_, _>>().map_err(db_err)
    }

    fn has_dentries(&mut self, vol: VolId, parent: Ino) -> FsResult<bool> {
        self.tx
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM dentries WHERE vol = ?1 AND parent = ?2)")
            .and_then(|mut st| st.query_row(params![vol, parent as i64], |r| r.get(0)))
            .map_err(db_err)
    }

    fn dir_parent(&mut self, vol: VolId, ino: Ino) -> FsResult<Option<Ino>> {
        self.tx
            .prepare_cached("SELECT parent FROM dentries WHERE vol = ?1 AND ino = ?2 LIMIT 1")
            .and_then(|mut st| st.query_row(params![vol, ino as i64], |r| Ok(r.get::<_, i64>(0)? as u64)).optional())
            .map_err(db_err)
    }

    fn parents(&mut self, vol: VolId, ino: Ino) -> FsResult<Vec<Ino>> {
        let mut st = self.tx.prepare_cached("SELECT DISTINCT parent FROM dentries WHERE vol = ?1 AND ino = ?2").map_err(db_err)?;
        let rows = st.query_map(params![vol, ino as i64], |r| Ok(r.get::<_, i64>(0)? as u64)).map_err(db_err)?;
        rows.collect::<Result<_, _>>().map_err(db_err)
    }

    fn name_of(&mut self, vol: VolId, ino: Ino) -> FsResult<Option<(Ino, Vec<u8>)>> {
        self.tx
            .prepare_cached("SELECT parent, name FROM dentries WHERE vol = ?1 AND ino = ?2 ORDER BY id LIMIT 1")
            .and_then(|mut st| st.query_row(params![vol, ino as i64], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))).optional())
            .map_err(db_err)
    }

    fn get_xattr(&mut self, vol: VolId, ino: Ino, name: &[u8]) -> FsResult<Option<Vec<u8>>> {
        self.tx
            .query_row("SELECT value FROM xattrs WHERE vol = ?1 AND ino = ?2 AND name = ?3", params![vol, ino as i64, name], |r| r.get(0))
            .optional()
            .map_err(db_err)
    }

    fn set_xattr(&mut self, vol: VolId, ino: Ino, name: &[u8], value: &[u8]) -> FsResult<()> {
        self.tx
            .execute(
                "INSERT INTO xattrs (vol, ino, name, value) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (vol, ino, name) DO UPDATE SET value = excluded.value",
                params![vol, ino as i64, name, value],
            )
            .map_err(db_err)?;
        Ok(())
    }

    fn list_xattrs(&mut self, vol: VolId, ino: Ino) -> FsResult<Vec<(Vec<u8>, usize)>> {
        let mut st =
            self.tx.prepare_cached("SELECT name, length(value) FROM xattrs WHERE vol = ?1 AND ino = ?2 ORDER BY name").map_err(db_err)?;
        let rows = st.query_map(params![vol, ino as i64], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as usize))).map_err(db_err)?;
        rows.collect::<Result<_, _>>().map_err(db_err)
    }

    fn remove_xattr(&mut self, vol: VolId, ino: Ino, name: &[u8]) -> FsResult<bool> {
        let n = self
            .tx
            .execute("DELETE FROM xattrs WHERE vol = ?1 AND ino = ?2 AND name = ?3", params![vol, ino as i64, name])
            .map_err(db_err)?;
        Ok(n > 0)
    }

    fn insert_change(&mut self, vol: VolId, c: &ChangeRow) -> FsResult<u64> {
        self.tx
            .prepare_cached("INSERT INTO changes (vol, kind, node, ino, path, from_path, time) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")
            .and_then(|mut st| st.execute(params![vol, c.kind.code(), c.node.code(), c.ino as i64, c.path, c.from, c.time.to_nanos()]))
            .map_err(db_err)?;
        Ok(self.tx.last_insert_rowid() as u64)
    }

    fn last_change(&mut self, vol: VolId) -> FsResult<Option<ChangeRow>> {
        let sql = format!("SELECT {CHANGE_COLS} FROM changes WHERE vol = ?1 ORDER BY id DESC LIMIT 1");
        self.tx.prepare_cached(&sql).and_then(|mut st| st.query_row(params![vol], row_change).optional()).map_err(db_err)
    }

    fn delete_change(&mut self, vol: VolId, id: u64) -> FsResult<()> {
        self.tx
            .prepare_cached("DELETE FROM changes WHERE vol = ?1 AND id = ?2")
            .and_then(|mut st| st.execute(params![vol, id as i64]))
            .map_err(db_err)?;
        Ok(())
    }

    fn list_changes(&mut self, vol: VolId, after: u64, limit: u32) -> FsResult<Vec<ChangeRow>> {
        let sql = format!("SELECT {CHANGE_COLS} FROM changes WHERE vol = ?1 AND id > ?2 ORDER BY id LIMIT ?3");
        let mut st = self.tx.prepare_cached(&sql).map_err(db_err)?;
        let after = after.min(i64::MAX as u64) as i64;
        let rows = st.query_map(params![vol, after, limit as i64], row_change).map_err(db_err)?;
        rows.collect::<Result<_, _>>().map_err(db_err)
    }

    fn prune_changes(&mut self, vol: VolId, keep: u64) -> FsResult<u64> {
        let cut: Option<i64> = self
            .tx
            .prepare_cached("SELECT id FROM changes WHERE vol = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2")
            .and_then(|mut st| st.query_row(params![vol, keep.min(i64::MAX as u64) as i64], |r| r.get(0)).optional())
            .map_err(db_err)?;
        let Some(cut) = cut else { return Ok(0) };
        let n = self.tx.execute("DELETE FROM changes WHERE vol = ?1 AND id <= ?2", params![vol, cut]).map_err(db_err)?;
        self.tx
            .execute(
                "INSERT INTO changes_pruned (vol, through) VALUES (?1, ?2)
                 ON CONFLICT (vol) DO UPDATE SET through = MAX(through, excluded.through)",
                params![vol, cut],
            )
            .map_err(db_err)?;
        Ok(n as u64)
    }

    fn changes_pruned_through(&mut self, vol: VolId) -> FsResult<u64> {
        let through: Option<i64> = self
            .tx
            .prepare_cached("SELECT through FROM changes_pruned WHERE vol = ?1")
            .and_then(|mut st| st.query_row(params![vol], |r| r.get(0)).optional())
            .map_err(db_err)?;
        Ok(through.unwrap_or(0) as u64)
    }

    fn insert_tenant(&mut self, t: &TenantRow) -> FsResult<()> {
        self.tx
            .execute(
                "INSERT INTO tenants (name, token_sha256, default_cap, created) VALUES (?1, ?2, ?3, ?4)",
                params![t.name, t.token_sha256, t.default_cap as i64, t.created.to_nanos()],
            )
            .map_err(db_err)?;
        Ok(())
    }

    fn tenant_by_token(&mut self, token_sha256: &str) -> FsResult<Option<TenantRow>> {
        self.tx
            .query_row(
                "SELECT name, token_sha256, default_cap, created FROM tenants WHERE token_sha256 = ?1",
                params![token_sha256],
                tenant_row,
            )
            .optional()
            .map_err(db_err)
    }

    fn list_tenants(&mut self) -> FsResult<Vec<TenantRow>> {
        let mut st = self.tx.prepare("SELECT name, token_sha256, default_cap, created FROM tenants ORDER BY name").map_err(db_err)?;
        let rows = st.query_map([], tenant_row).map_err(db_err)?;
        rows.collect::<Result<_, _>>().map_err(db_err)
    }

    fn insert_sandbox(&mut self, name: &str, now: Timespec) -> FsResult<()> {
        self.tx.execute("INSERT INTO sandboxes (name, created) VALUES (?1, ?2)", params![name, now.to_nanos()]).map_err(db_err)?;
        Ok(())
    }

    fn get_sandbox(&mut self, name: &str) -> FsResult<Option<SandboxRow>> {
        self.tx
            .query_row("SELECT name, created FROM sandboxes WHERE name = ?1", params![name], |r| {
                Ok(SandboxRow { name: r.get(0)?, created: Timespec::from_nanos(r.get(1)?) })
            })
            .optional()
            .map_err(db_err)
    }

    fn list_sandboxes(&mut self) -> FsResult<Vec<SandboxRow>> {
        let mut st = self.tx.prepare("SELECT name, created FROM sandboxes ORDER BY name").map_err(db_err)?;
        let rows = st.query_map([], |r| Ok(SandboxRow { name: r.get(0)?, created: Timespec::from_nanos(r.get(1)?) })).map_err(db_err)?;
        rows.collect::<Result<_, _>>().map_err(db_err)
    }

    fn delete_sandbox(&mut self, name: &str) -> FsResult<()> {
        self.tx.execute("DELETE FROM attachments WHERE sandbox = ?1", params![name]).map_err(db_err)?;
        self.tx.execute("DELETE FROM sandboxes WHERE name = ?1", params![name]).map_err(db_err)?;
        Ok(())
    }

    fn insert_attachment(&mut self, a: &AttachmentRow) -> FsResult<u64> {
        self.tx
            .execute(
                "INSERT INTO attachments (sandbox, vol, path, read_only, subpath, state, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![a.sandbox, a.volume, a.path, a.read_only as i64, a.subpath, a.state.name(), a.reason],
            )
            .map_err(db_err)?;
        Ok(self.tx.last_insert_rowid() as u64)
    }

    fn list_attachments(&mut self, sandbox: Option<&str>, volume: Option<VolId>) -> FsResult<Vec<AttachmentRow>> {
        let sql = format!(
            "SELECT {ATTACHMENT_COLS} FROM attachments WHERE (?1 IS NULL OR sandbox = ?1) AND (?2 IS NULL OR vol = ?2) ORDER BY id"
        );
        let mut st = self.tx.prepare_cached(&sql).map_err(db_err)?;
        let rows = st.query_map(params![sandbox, volume], row_attachment).map_err(db_err)?;
        rows.collect::<Result<_, _>>().map_err(db_err)
    }

    fn get_attachment(&mut self, id: u64) -> FsResult<Option<AttachmentRow>> {
        let sql = format!("SELECT {ATTACHMENT_COLS} FROM attachments WHERE id = ?1");
        self.tx.query_row(&sql, params![id as i64], row_attachment).optional().map_err(db_err)
    }

    fn set_attachment_state(&mut self, id: u64, state: AttachState, reason: &str) -> FsResult<()> {
        self.tx
            .execute("UPDATE attachments SET state = ?2, reason = ?3 WHERE id = ?1", params![id as i64, state.name(), reason])
            .map_err(db_err)?;
        Ok(())
    }

    fn delete_attachment(&mut self, id: u64) -> FsResult<()> {
        self.tx.execute("DELETE FROM attachments WHERE id = ?1", params![id as i64]).map_err(db_err)?;
        Ok(())
    }
}

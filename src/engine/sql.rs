//! The metadata primitives ([`MetaTxn`]) written once, in the SQL that SQLite and PostgreSQL
//! share, over a connection that only runs statements ([`SqlConn`]).
//!
//! Each backend supplies its schema (the column types differ), its transactions (SQLite's one
//! writer; PostgreSQL's serializable transactions, retried) and a [`SqlConn`] that binds
//! [`Val`]s and reads columns. Statements are written with SQLite's numbered parameters (`?1`);
//! the PostgreSQL side rewrites them to `$1`. What the dialects spell differently is avoided:
//! no `INSERT OR REPLACE` (both have `ON CONFLICT ... DO UPDATE`), no two-argument `MAX` (a
//! `CASE`), no `last_insert_rowid` (`RETURNING`), no booleans (counts), no `::` casts (`CAST`).

use super::meta::*;
use crate::fs::{Attr, FsError, FsResult, Ino, Kind, Timespec};

/// The schema, in the words both stores share, with what each spells its own way left as
/// `{int}` (a 64-bit integer), `{bytes}` (a byte string), `{id}` (an integer key the store
/// chooses, never reused) and `{norowid}` (SQLite's clustered tables). Every statement is
/// idempotent: it runs at every open, and that is how a store gains what a newer version adds.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS volumes (
    id {id},
    name TEXT NOT NULL UNIQUE,
    cap {int} NOT NULL,
    used {int} NOT NULL DEFAULT 0,
    next_ino {int} NOT NULL DEFAULT 2,
    inodes {int} NOT NULL DEFAULT 1,
    created {int} NOT NULL
);
CREATE TABLE IF NOT EXISTS inodes (
    vol {int} NOT NULL,
    ino {int} NOT NULL,
    kind {int} NOT NULL,
    -- permission bits (0o7777), and above them (bit 16 up) the ACL marks of Attr::acl:
    -- rows written before ACLs have none, so no migration was needed.
    perm {int} NOT NULL,
    nlink {int} NOT NULL,
    uid {int} NOT NULL,
    gid {int} NOT NULL,
    size {int} NOT NULL,
    alloc {int} NOT NULL DEFAULT 0,
    xattrs {int} NOT NULL DEFAULT 0,
    atime {int} NOT NULL,
    mtime {int} NOT NULL,
    ctime {int} NOT NULL,
    rdev {int} NOT NULL,
    target {bytes},
    PRIMARY KEY (vol, ino)
);
CREATE INDEX IF NOT EXISTS inodes_orphans ON inodes (nlink) WHERE nlink = 0;
CREATE TABLE IF NOT EXISTS dentries (
    id {id},
    vol {int} NOT NULL,
    parent {int} NOT NULL,
    name {bytes} NOT NULL,
    ino {int} NOT NULL,
    kind {int} NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS dentries_name ON dentries (vol, parent, name);
CREATE INDEX IF NOT EXISTS dentries_ino ON dentries (vol, ino);
CREATE TABLE IF NOT EXISTS xattrs (
    vol {int} NOT NULL,
    ino {int} NOT NULL,
    name {bytes} NOT NULL,
    value {bytes} NOT NULL,
    PRIMARY KEY (vol, ino, name)
);
CREATE TABLE IF NOT EXISTS extents (
    vol {int} NOT NULL,
    ino {int} NOT NULL,
    start {int} NOT NULL,
    stop {int} NOT NULL,
    PRIMARY KEY (vol, ino, start)
){norowid};
CREATE TABLE IF NOT EXISTS replays (
    session {int} NOT NULL,
    seq {int} NOT NULL,
    a {int} NOT NULL,
    b {int} NOT NULL,
    time {int} NOT NULL,
    PRIMARY KEY (session, seq)
){norowid};
CREATE TABLE IF NOT EXISTS slices (
    id {id},
    vol {int} NOT NULL,
    ino {int} NOT NULL,
    off {int} NOT NULL,
    len {int} NOT NULL,
    block {bytes},
    block_off {int} NOT NULL
);
CREATE INDEX IF NOT EXISTS slices_ino ON slices (vol, ino, id);
CREATE INDEX IF NOT EXISTS slices_block ON slices (block);
CREATE TABLE IF NOT EXISTS servers (
    id TEXT PRIMARY KEY,
    seen {int} NOT NULL
);
CREATE TABLE IF NOT EXISTS locks (
    server TEXT NOT NULL,
    vol {int} NOT NULL,
    ino {int} NOT NULL,
    owner {int} NOT NULL,
    start {int} NOT NULL,
    stop {int} NOT NULL,
    typ {int} NOT NULL,
    pid {int} NOT NULL
);
CREATE INDEX IF NOT EXISTS locks_file ON locks (vol, ino);
CREATE TABLE IF NOT EXISTS open_files (
    server TEXT NOT NULL,
    vol {int} NOT NULL,
    ino {int} NOT NULL,
    PRIMARY KEY (server, vol, ino)
);
CREATE INDEX IF NOT EXISTS open_files_ino ON open_files (vol, ino);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    default_cap {int} NOT NULL,
    created {int} NOT NULL
);
CREATE TABLE IF NOT EXISTS sandboxes (
    name TEXT PRIMARY KEY,
    created {int} NOT NULL
);
CREATE TABLE IF NOT EXISTS attachments (
    id {id},
    sandbox TEXT NOT NULL,
    vol {int} NOT NULL,
    path TEXT NOT NULL,
    read_only {int} NOT NULL,
    subpath TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS changes (
    id {id},
    vol {int} NOT NULL,
    kind {int} NOT NULL,
    node {int} NOT NULL,
    ino {int} NOT NULL,
    path {bytes} NOT NULL,
    from_path {bytes},
    time {int} NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_vol ON changes (vol, id);
CREATE TABLE IF NOT EXISTS changes_pruned (
    vol {int} PRIMARY KEY,
    through {int} NOT NULL
);
";

/// [`SCHEMA`] in one store's words.
pub(super) fn schema(int: &str, bytes: &str, id: &str, norowid: &str) -> String {
    SCHEMA.replace("{int}", int).replace("{bytes}", bytes).replace("{id}", id).replace("{norowid}", norowid)
}

/// A statement parameter.
#[derive(Debug, Clone, Copy)]
pub(super) enum Val<'a> {
    Null,
    Int(i64),
    Bytes(&'a [u8]),
    Text(&'a str),
}

impl From<i64> for Val<'_> {
    fn from(v: i64) -> Self {
        Val::Int(v)
    }
}

impl From<u64> for Val<'_> {
    /// Unsigned quantities are stored as signed 64-bit integers; the few that can exceed
    /// `i64::MAX` (a "no limit" bound) are clamped, which is what they mean.
    fn from(v: u64) -> Self {
        Val::Int(v.min(i64::MAX as u64) as i64)
    }
}

impl<'a> From<&'a [u8]> for Val<'a> {
    fn from(v: &'a [u8]) -> Self {
        Val::Bytes(v)
    }
}

impl<'a> From<&'a str> for Val<'a> {
    fn from(v: &'a str) -> Self {
        Val::Text(v)
    }
}

impl<'a, T: Into<Val<'a>>> From<Option<T>> for Val<'a> {
    fn from(v: Option<T>) -> Self {
        v.map_or(Val::Null, Into::into)
    }
}

/// One result row. Integers of any width the backend returns read as `i64`.
pub(super) trait SqlRow {
    fn opt_int(&self, i: usize) -> FsResult<Option<i64>>;
    fn opt_bytes(&self, i: usize) -> FsResult<Option<Vec<u8>>>;
    fn text(&self, i: usize) -> FsResult<String>;

    fn int(&self, i: usize) -> FsResult<i64> {
        self.opt_int(i)?.ok_or_else(|| corrupt(i, "NULL integer"))
    }
    fn uint(&self, i: usize) -> FsResult<u64> {
        Ok(self.int(i)? as u64)
    }
    fn bytes(&self, i: usize) -> FsResult<Vec<u8>> {
        self.opt_bytes(i)?.ok_or_else(|| corrupt(i, "NULL bytes"))
    }
}

fn corrupt(col: usize, what: &str) -> FsError {
    FsError::new(libc::EIO, format!("metadata store: {what} in column {col}"))
}

/// Runs statements inside a backend's open transaction.
pub(super) trait SqlConn {
    /// Runs a statement that returns no rows; returns how many rows it changed.
    fn exec(&mut self, sql: &'static str, params: &[Val]) -> FsResult<u64>;
    /// Runs a query and hands each row to `each`, in order.
    fn query(&mut self, sql: &'static str, params: &[Val], each: &mut dyn FnMut(&dyn SqlRow) -> FsResult<()>) -> FsResult<()>;
    /// [`MetaTxn::announce`]: a store shared by servers has a way; SQLite has none to need.
    fn announce(&mut self, message: &str) -> FsResult<()>;
    /// The store's clock, for a store that servers on several machines share (`None`: this
    /// machine's clock is the store's).
    fn clock(&mut self) -> FsResult<Option<Timespec>>;
}

impl dyn SqlConn + '_ {
    fn all<T>(&mut self, sql: &'static str, params: &[Val], f: impl Fn(&dyn SqlRow) -> FsResult<T>) -> FsResult<Vec<T>> {
        let mut out = Vec::new();
        self.query(sql, params, &mut |r| {
            out.push(f(r)?);
            Ok(())
        })?;
        Ok(out)
    }

    fn first<T>(&mut self, sql: &'static str, params: &[Val], f: impl Fn(&dyn SqlRow) -> FsResult<T>) -> FsResult<Option<T>> {
        let mut out = None;
        self.query(sql, params, &mut |r| {
            if out.is_none() {
                out = Some(f(r)?);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// A query that yields exactly one integer (a count, a `RETURNING` id).
    fn int(&mut self, sql: &'static str, params: &[Val]) -> FsResult<i64> {
        self.first(sql, params, |r| r.int(0))?.ok_or_else(|| FsError::new(libc::EIO, format!("metadata store: no row from {sql}")))
    }
}

/// The transaction primitives over any [`SqlConn`].
pub(super) struct SqlTxn<'a>(pub &'a mut dyn SqlConn);

macro_rules! volume_cols {
    () => {
        "id, name, cap, used, inodes, created"
    };
}
macro_rules! attr_cols {
    () => {
        "ino, kind, perm, nlink, uid, gid, size, atime, mtime, ctime, rdev, alloc, xattrs"
    };
}
macro_rules! change_cols {
    () => {
        "id, kind, node, ino, path, from_path, time"
    };
}
macro_rules! attachment_cols {
    () => {
        "id, sandbox, vol, path, read_only, subpath, state, reason"
    };
}
macro_rules! tenant_cols {
    () => {
        "name, token_sha256, default_cap, created"
    };
}

/// Where the ACL marks ([`Attr::acl`]) sit in the `perm` column.
const ACL_SHIFT: u32 = 16;

fn row_volume(r: &dyn SqlRow) -> FsResult<VolumeRow> {
    Ok(VolumeRow {
        id: r.int(0)?,
        name: r.text(1)?,
        cap: r.uint(2)?,
        used: r.uint(3)?,
        inodes: r.uint(4)?,
        created: Timespec::from_nanos(r.int(5)?),
    })
}

fn row_attr(r: &dyn SqlRow) -> FsResult<Attr> {
    let perm = r.int(2)? as u32;
    Ok(Attr {
        ino: r.uint(0)?,
        kind: kind(r.int(1)?),
        perm: perm & 0o7777,
        nlink: r.int(3)? as u32,
        uid: r.int(4)? as u32,
        gid: r.int(5)? as u32,
        size: r.uint(6)?,
        atime: Timespec::from_nanos(r.int(7)?),
        mtime: Timespec::from_nanos(r.int(8)?),
        ctime: Timespec::from_nanos(r.int(9)?),
        rdev: r.int(10)? as u32,
        alloc: r.uint(11)?,
        xattrs: r.int(12)? != 0,
        acl: (perm >> ACL_SHIFT) as u8,
    })
}

fn kind(code: i64) -> Kind {
    Kind::from_code(code).unwrap_or(Kind::File)
}

fn row_attachment(r: &dyn SqlRow) -> FsResult<AttachmentRow> {
    Ok(AttachmentRow {
        id: r.uint(0)?,
        sandbox: r.text(1)?,
        volume: r.int(2)?,
        path: r.text(3)?,
        read_only: r.int(4)? != 0,
        subpath: r.text(5)?,
        state: AttachState::parse(&r.text(6)?).unwrap_or(AttachState::Failed),
        reason: r.text(7)?,
    })
}

fn row_change(r: &dyn SqlRow) -> FsResult<ChangeRow> {
    Ok(ChangeRow {
        id: r.uint(0)?,
        kind: ChangeKind::from_code(r.int(1)?).unwrap_or(ChangeKind::Modify),
        node: kind(r.int(2)?),
        ino: r.uint(3)?,
        path: r.bytes(4)?,
        from: r.opt_bytes(5)?,
        time: Timespec::from_nanos(r.int(6)?),
    })
}

fn row_tenant(r: &dyn SqlRow) -> FsResult<TenantRow> {
    Ok(TenantRow { name: r.text(0)?, token_sha256: r.text(1)?, default_cap: r.uint(2)?, created: Timespec::from_nanos(r.int(3)?) })
}

fn row_sandbox(r: &dyn SqlRow) -> FsResult<SandboxRow> {
    Ok(SandboxRow { name: r.text(0)?, created: Timespec::from_nanos(r.int(1)?) })
}

fn row_lock(r: &dyn SqlRow) -> FsResult<LockRow> {
    let end = r.uint(2)?;
    Ok(LockRow {
        owner: r.uint(0)?,
        start: r.uint(1)?,
        // Stored clamped to the largest signed value: that is "to the end of file".
        end: if end >= i64::MAX as u64 { u64::MAX } else { end },
        typ: r.int(3)? as i32,
        pid: r.int(4)? as u32,
    })
}

fn row_dentry(r: &dyn SqlRow) -> FsResult<DentryRow> {
    Ok(DentryRow { cookie: r.uint(0)?, name: r.bytes(1)?, ino: r.uint(2)?, kind: kind(r.int(3)?) })
}

impl MetaTxn for SqlTxn<'_> {
    fn volume_by_name(&mut self, name: &str) -> FsResult<Option<VolumeRow>> {
        self.0.first(concat!("SELECT ", volume_cols!(), " FROM volumes WHERE name = ?1"), &[name.into()], row_volume)
    }

    fn volume_by_id(&mut self, id: VolId) -> FsResult<Option<VolumeRow>> {
        self.0.first(concat!("SELECT ", volume_cols!(), " FROM volumes WHERE id = ?1"), &[id.into()], row_volume)
    }

    fn list_volumes(&mut self) -> FsResult<Vec<VolumeRow>> {
        self.0.all(concat!("SELECT ", volume_cols!(), " FROM volumes ORDER BY name"), &[], row_volume)
    }

    fn insert_volume(&mut self, name: &str, cap: u64, now: Timespec) -> FsResult<VolId> {
        self.0.int(
            "INSERT INTO volumes (name, cap, created) VALUES (?1, ?2, ?3) RETURNING id",
            &[name.into(), cap.into(), now.to_nanos().into()],
        )
    }

    fn delete_volume(&mut self, id: VolId) -> FsResult<()> {
        for sql in [
            "DELETE FROM inodes WHERE vol = ?1",
            "DELETE FROM dentries WHERE vol = ?1",
            "DELETE FROM xattrs WHERE vol = ?1",
            "DELETE FROM extents WHERE vol = ?1",
            "DELETE FROM slices WHERE vol = ?1",
            "DELETE FROM changes WHERE vol = ?1",
            "DELETE FROM changes_pruned WHERE vol = ?1",
            "DELETE FROM open_files WHERE vol = ?1",
            "DELETE FROM locks WHERE vol = ?1",
            "DELETE FROM volumes WHERE id = ?1",
        ] {
            self.0.exec(sql, &[id.into()])?;
        }
        Ok(())
    }

    fn add_used(&mut self, id: VolId, delta: i64) -> FsResult<()> {
        self.0.exec(
            "UPDATE volumes SET used = CASE WHEN used + ?2 < 0 THEN 0 ELSE used + ?2 END WHERE id = ?1",
            &[id.into(), delta.into()],
        )?;
        Ok(())
    }

    fn next_ino(&mut self, vol: VolId) -> FsResult<Ino> {
        let ino = self
            .0
            .int("UPDATE volumes SET next_ino = next_ino + 1, inodes = inodes + 1 WHERE id = ?1 RETURNING next_ino - 1", &[vol.into()])?;
        Ok(ino as u64)
    }

    fn get_inode(&mut self, vol: VolId, ino: Ino) -> FsResult<Option<Attr>> {
        self.0.first(concat!("SELECT ", attr_cols!(), " FROM inodes WHERE vol = ?1 AND ino = ?2"), &[vol.into(), ino.into()], row_attr)
    }

    fn put_inode(&mut self, vol: VolId, a: &Attr) -> FsResult<()> {
        self.0.exec(
            "INSERT INTO inodes (vol, ino, kind, perm, nlink, uid, gid, size, atime, mtime, ctime, rdev, alloc, xattrs)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
             ON CONFLICT (vol, ino) DO UPDATE SET kind = excluded.kind, perm = excluded.perm,
               nlink = excluded.nlink, uid = excluded.uid, gid = excluded.gid, size = excluded.size,
               atime = excluded.atime, mtime = excluded.mtime, ctime = excluded.ctime, rdev = excluded.rdev,
               alloc = excluded.alloc, xattrs = excluded.xattrs",
            &[
                vol.into(),
                a.ino.into(),
                a.kind.code().into(),
                (((a.perm & 0o7777) | (a.acl as u32) << ACL_SHIFT) as i64).into(),
                (a.nlink as i64).into(),
                (a.uid as i64).into(),
                (a.gid as i64).into(),
                a.size.into(),
                a.atime.to_nanos().into(),
                a.mtime.to_nanos().into(),
                a.ctime.to_nanos().into(),
                (a.rdev as i64).into(),
                a.alloc.into(),
                (a.xattrs as i64).into(),
            ],
        )?;
        Ok(())
    }

    fn delete_inode(&mut self, vol: VolId, ino: Ino) -> FsResult<()> {
        let p = [vol.into(), ino.into()];
        let n = self.0.exec("DELETE FROM inodes WHERE vol = ?1 AND ino = ?2", &p)?;
        self.0.exec("UPDATE volumes SET inodes = inodes - ?2 WHERE id = ?1", &[vol.into(), n.into()])?;
        self.0.exec("DELETE FROM xattrs WHERE vol = ?1 AND ino = ?2", &p)?;
        self.0.exec("DELETE FROM extents WHERE vol = ?1 AND ino = ?2", &p)?;
        self.0.exec("DELETE FROM slices WHERE vol = ?1 AND ino = ?2", &p)?;
        Ok(())
    }

    fn get_target(&mut self, vol: VolId, ino: Ino) -> FsResult<Vec<u8>> {
        let t = self.0.first("SELECT target FROM inodes WHERE vol = ?1 AND ino = ?2", &[vol.into(), ino.into()], |r| r.opt_bytes(0))?;
        Ok(t.flatten().unwrap_or_default())
    }

    fn set_target(&mut self, vol: VolId, ino: Ino, target: &[u8]) -> FsResult<()> {
        self.0.exec("UPDATE inodes SET target = ?3 WHERE vol = ?1 AND ino = ?2", &[vol.into(), ino.into(), target.into()])?;
        Ok(())
    }

    fn orphans(&mut self) -> FsResult<Vec<(VolId, Ino, u64)>> {
        self.0.all("SELECT vol, ino, size FROM inodes WHERE nlink = 0", &[], |r| Ok((r.int(0)?, r.uint(1)?, r.uint(2)?)))
    }

    fn get_dentry(&mut self, vol: VolId, parent: Ino, name: &[u8]) -> FsResult<Option<(Ino, Kind)>> {
        self.0.first(
            "SELECT ino, kind FROM dentries WHERE vol = ?1 AND parent = ?2 AND name = ?3",
            &[vol.into(), parent.into(), name.into()],
            |r| Ok((r.uint(0)?, kind(r.int(1)?))),
        )
    }

    fn insert_dentry(&mut self, vol: VolId, parent: Ino, name: &[u8], ino: Ino, kind: Kind) -> FsResult<()> {
        self.0.exec(
            "INSERT INTO dentries (vol, parent, name, ino, kind) VALUES (?1, ?2, ?3, ?4, ?5)",
            &[vol.into(), parent.into(), name.into(), ino.into(), kind.code().into()],
        )?;
        Ok(())
    }

    fn delete_dentry(&mut self, vol: VolId, parent: Ino, name: &[u8]) -> FsResult<()> {
        self.0.exec("DELETE FROM dentries WHERE vol = ?1 AND parent = ?2 AND name = ?3", &[vol.into(), parent.into(), name.into()])?;
        Ok(())
    }

    fn extents(&mut self, vol: VolId, ino: Ino, from: u64, to: u64) -> FsResult<Vec<(u64, u64)>> {
        // Ranges are disjoint and never touch: only the last one starting at or before `from`
        // can reach it, so the scan starts there (an index seek, not a walk of the file).
        let all = self.0.all(
            "SELECT start, stop FROM extents WHERE vol = ?1 AND ino = ?2
               AND start >= COALESCE((SELECT MAX(start) FROM extents WHERE vol = ?1 AND ino = ?2 AND start <= ?3), ?3)
               AND start <= ?4 ORDER BY start",
            &[vol.into(), ino.into(), from.into(), to.into()],
            |r| Ok((r.uint(0)?, r.uint(1)?)),
        )?;
        Ok(all.into_iter().filter(|(_, end)| *end >= from).collect())
    }

    fn replace_extents(&mut self, vol: VolId, ino: Ino, old: &[(u64, u64)], new: &[(u64, u64)]) -> FsResult<()> {
        // A range that keeps its start (an extending write, the common case) is rewritten in
        // place by the upsert: one statement, not a delete and an insert.
        for (start, _) in old.iter().filter(|(s, _)| !new.iter().any(|(n, _)| n == s)) {
            self.0.exec("DELETE FROM extents WHERE vol = ?1 AND ino = ?2 AND start = ?3", &[vol.into(), ino.into(), (*start).into()])?;
        }
        for (start, end) in new {
            self.0.exec(
                "INSERT INTO extents (vol, ino, start, stop) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (vol, ino, start) DO UPDATE SET stop = excluded.stop",
                &[vol.into(), ino.into(), (*start).into(), (*end).into()],
            )?;
        }
        Ok(())
    }

    fn all_inodes(&mut self, vol: VolId) -> FsResult<Vec<Attr>> {
        self.0.all(concat!("SELECT ", attr_cols!(), " FROM inodes WHERE vol = ?1 ORDER BY ino"), &[vol.into()], row_attr)
    }

    fn all_dentries(&mut self, vol: VolId) -> FsResult<Vec<(Ino, DentryRow)>> {
        self.0.all("SELECT parent, id, name, ino, kind FROM dentries WHERE vol = ?1 ORDER BY id", &[vol.into()], |r| {
            Ok((r.uint(0)?, DentryRow { cookie: r.uint(1)?, name: r.bytes(2)?, ino: r.uint(3)?, kind: kind(r.int(4)?) }))
        })
    }

    fn slices(&mut self, vol: VolId, ino: Ino, from: u64, to: u64) -> FsResult<Vec<SliceRow>> {
        self.0.all(
            "SELECT id, off, len, block, block_off FROM slices WHERE vol = ?1 AND ino = ?2 AND off < ?4 AND off + len > ?3 ORDER BY id",
            &[vol.into(), ino.into(), from.into(), to.into()],
            |r| {
                let block = r.opt_bytes(3)?.map(|b| String::from_utf8_lossy(&b).into_owned());
                Ok(SliceRow { id: r.uint(0)?, off: r.uint(1)?, len: r.uint(2)?, block, block_off: r.uint(4)? })
            },
        )
    }

    fn insert_slice(&mut self, vol: VolId, ino: Ino, s: &SliceRow) -> FsResult<()> {
        // Rewriting a range again and again must not grow the file's slices (and every read of
        // it) without bound.
        self.0.exec(
            "DELETE FROM slices WHERE vol = ?1 AND ino = ?2 AND off >= ?3 AND off + len <= ?4",
            &[vol.into(), ino.into(), s.off.into(), (s.off + s.len).into()],
        )?;
        self.0.exec(
            "INSERT INTO slices (vol, ino, off, len, block, block_off) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            &[vol.into(), ino.into(), s.off.into(), s.len.into(), s.block.as_deref().map(str::as_bytes).into(), s.block_off.into()],
        )?;
        Ok(())
    }

    fn truncate_slices(&mut self, vol: VolId, ino: Ino, size: u64) -> FsResult<()> {
        self.0.exec("DELETE FROM slices WHERE vol = ?1 AND ino = ?2 AND off >= ?3", &[vol.into(), ino.into(), size.into()])?;
        self.0.exec(
            "UPDATE slices SET len = ?3 - off WHERE vol = ?1 AND ino = ?2 AND off < ?3 AND off + len > ?3",
            &[vol.into(), ino.into(), size.into()],
        )?;
        Ok(())
    }

    fn drop_slices(&mut self, vol: VolId, ino: Ino, max_id: u64, end: u64) -> FsResult<()> {
        self.0.exec(
            "DELETE FROM slices WHERE vol = ?1 AND ino = ?2 AND id <= ?3 AND off < ?4",
            &[vol.into(), ino.into(), max_id.into(), end.into()],
        )?;
        Ok(())
    }

    fn referenced_blocks(&mut self) -> FsResult<Vec<String>> {
        self.0.all("SELECT DISTINCT block FROM slices WHERE block IS NOT NULL", &[], |r| {
            Ok(String::from_utf8_lossy(&r.bytes(0)?).into_owned())
        })
    }

    fn volume_blocks(&mut self, vol: VolId) -> FsResult<Vec<(String, Ino)>> {
        self.0.all("SELECT block, MIN(ino) FROM slices WHERE vol = ?1 AND block IS NOT NULL GROUP BY block", &[vol.into()], |r| {
            Ok((String::from_utf8_lossy(&r.bytes(0)?).into_owned(), r.uint(1)?))
        })
    }

    fn clone_volume(&mut self, src: VolId, name: &str, cap: u64, now: Timespec) -> FsResult<VolId> {
        let id = self.0.int(
            "INSERT INTO volumes (name, cap, used, next_ino, inodes, created)
             SELECT ?2, ?3, used, next_ino, inodes, ?4 FROM volumes WHERE id = ?1 RETURNING id",
            &[src.into(), name.into(), cap.into(), now.to_nanos().into()],
        )?;
        let p = [src.into(), id.into()];
        self.0.exec(
            "INSERT INTO inodes (vol, ino, kind, perm, nlink, uid, gid, size, alloc, xattrs, atime, mtime, ctime, rdev, target)
             SELECT ?2, ino, kind, perm, nlink, uid, gid, size, alloc, xattrs, atime, mtime, ctime, rdev, target FROM inodes WHERE vol = ?1",
            &p,
        )?;
        // In cookie order, so that listings keep their order in the copy.
        self.0.exec(
            "INSERT INTO dentries (vol, parent, name, ino, kind) SELECT ?2, parent, name, ino, kind FROM dentries WHERE vol = ?1 ORDER BY id",
            &p,
        )?;
        self.0.exec("INSERT INTO xattrs (vol, ino, name, value) SELECT ?2, ino, name, value FROM xattrs WHERE vol = ?1", &p)?;
        self.0.exec("INSERT INTO extents (vol, ino, start, stop) SELECT ?2, ino, start, stop FROM extents WHERE vol = ?1", &p)?;
        self.0.exec(
            "INSERT INTO slices (vol, ino, off, len, block, block_off) SELECT ?2, ino, off, len, block, block_off FROM slices WHERE vol = ?1 ORDER BY id",
            &p,
        )?;
        Ok(id)
    }

    fn insert_replay(&mut self, session: u64, seq: u64, rec: (u64, u64), now: Timespec) -> FsResult<()> {
        self.0.exec(
            "INSERT INTO replays (session, seq, a, b, time) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (session, seq) DO UPDATE SET a = excluded.a, b = excluded.b, time = excluded.time",
            &[session.into(), seq.into(), rec.0.into(), rec.1.into(), now.to_nanos().into()],
        )?;
        Ok(())
    }

    fn get_replay(&mut self, session: u64, seq: u64) -> FsResult<Option<(u64, u64)>> {
        self.0.first("SELECT a, b FROM replays WHERE session = ?1 AND seq = ?2", &[session.into(), seq.into()], |r| {
            Ok((r.uint(0)?, r.uint(1)?))
        })
    }

    fn last_replay_seq(&mut self, session: u64) -> FsResult<u64> {
        let n = self.0.first("SELECT MAX(seq) FROM replays WHERE session = ?1", &[session.into()], |r| r.opt_int(0))?;
        Ok(n.flatten().unwrap_or(0) as u64)
    }

    fn prune_replays(&mut self, session: u64, below: u64) -> FsResult<()> {
        self.0.exec("DELETE FROM replays WHERE session = ?1 AND seq < ?2", &[session.into(), below.into()])?;
        Ok(())
    }

    fn expire_replays(&mut self, before: Timespec) -> FsResult<u64> {
        self.0.exec("DELETE FROM replays WHERE time < ?1", &[before.to_nanos().into()])
    }

    fn move_dentry(&mut self, vol: VolId, parent: Ino, name: &[u8], new_parent: Ino, new_name: &[u8]) -> FsResult<()> {
        self.0.exec(
            "UPDATE dentries SET parent = ?4, name = ?5 WHERE vol = ?1 AND parent = ?2 AND name = ?3",
            &[vol.into(), parent.into(), name.into(), new_parent.into(), new_name.into()],
        )?;
        Ok(())
    }

    fn set_dentry_target(&mut self, vol: VolId, parent: Ino, name: &[u8], ino: Ino, kind: Kind) -> FsResult<()> {
        self.0.exec(
            "UPDATE dentries SET ino = ?4, kind = ?5 WHERE vol = ?1 AND parent = ?2 AND name = ?3",
            &[vol.into(), parent.into(), name.into(), ino.into(), kind.code().into()],
        )?;
        Ok(())
    }

    fn list_dentries(&mut self, vol: VolId, parent: Ino, after: u64, limit: u32) -> FsResult<Vec<DentryRow>> {
        self.0.all(
            "SELECT id, name, ino, kind FROM dentries WHERE vol = ?1 AND parent = ?2 AND id > ?3 ORDER BY id LIMIT ?4",
            &[vol.into(), parent.into(), after.into(), (limit as i64).into()],
            row_dentry,
        )
    }

    fn has_dentries(&mut self, vol: VolId, parent: Ino) -> FsResult<bool> {
        let n = self.0.int(
            "SELECT COUNT(*) FROM (SELECT 1 FROM dentries WHERE vol = ?1 AND parent = ?2 LIMIT 1) AS one",
            &[vol.into(), parent.into()],
        )?;
        Ok(n > 0)
    }

    fn dir_parent(&mut self, vol: VolId, ino: Ino) -> FsResult<Option<Ino>> {
        self.0.first("SELECT parent FROM dentries WHERE vol = ?1 AND ino = ?2 LIMIT 1", &[vol.into(), ino.into()], |r| r.uint(0))
    }

    fn parents(&mut self, vol: VolId, ino: Ino) -> FsResult<Vec<Ino>> {
        self.0.all("SELECT DISTINCT parent FROM dentries WHERE vol = ?1 AND ino = ?2", &[vol.into(), ino.into()], |r| r.uint(0))
    }

    fn name_of(&mut self, vol: VolId, ino: Ino) -> FsResult<Option<(Ino, Vec<u8>)>> {
        self.0.first("SELECT parent, name FROM dentries WHERE vol = ?1 AND ino = ?2 ORDER BY id LIMIT 1", &[vol.into(), ino.into()], |r| {
            Ok((r.uint(0)?, r.bytes(1)?))
        })
    }

    fn get_xattr(&mut self, vol: VolId, ino: Ino, name: &[u8]) -> FsResult<Option<Vec<u8>>> {
        self.0.first("SELECT value FROM xattrs WHERE vol = ?1 AND ino = ?2 AND name = ?3", &[vol.into(), ino.into(), name.into()], |r| {
            r.bytes(0)
        })
    }

    fn set_xattr(&mut self, vol: VolId, ino: Ino, name: &[u8], value: &[u8]) -> FsResult<()> {
        self.0.exec(
            "INSERT INTO xattrs (vol, ino, name, value) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (vol, ino, name) DO UPDATE SET value = excluded.value",
            &[vol.into(), ino.into(), name.into(), value.into()],
        )?;
        Ok(())
    }

    fn list_xattrs(&mut self, vol: VolId, ino: Ino) -> FsResult<Vec<(Vec<u8>, usize)>> {
        self.0.all(
            "SELECT name, CAST(length(value) AS BIGINT) FROM xattrs WHERE vol = ?1 AND ino = ?2 ORDER BY name",
            &[vol.into(), ino.into()],
            |r| Ok((r.bytes(0)?, r.int(1)? as usize)),
        )
    }

    fn remove_xattr(&mut self, vol: VolId, ino: Ino, name: &[u8]) -> FsResult<bool> {
        Ok(self.0.exec("DELETE FROM xattrs WHERE vol = ?1 AND ino = ?2 AND name = ?3", &[vol.into(), ino.into(), name.into()])? > 0)
    }

    fn lock_volume(&mut self, vol: VolId) -> FsResult<()> {
        // PostgreSQL only (called with a shared store; SQLite has one writer and no FOR
        // UPDATE): a row lock without a new row version (an `UPDATE ... SET used = used`
        // would leave a dead tuple and WAL at every mutation). A second transaction waits for
        // the first to end, then goes on.
        self.0.query("SELECT id FROM volumes WHERE id = ?1 FOR UPDATE", &[vol.into()], &mut |_| Ok(()))
    }

    fn insert_change(&mut self, vol: VolId, c: &ChangeRow) -> FsResult<u64> {
        let id = self.0.int(
            "INSERT INTO changes (vol, kind, node, ino, path, from_path, time) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
            &[
                vol.into(),
                c.kind.code().into(),
                c.node.code().into(),
                c.ino.into(),
                c.path.as_slice().into(),
                c.from.as_deref().into(),
                c.time.to_nanos().into(),
            ],
        )?;
        Ok(id as u64)
    }

    fn last_change(&mut self, vol: VolId) -> FsResult<Option<ChangeRow>> {
        self.0.first(concat!("SELECT ", change_cols!(), " FROM changes WHERE vol = ?1 ORDER BY id DESC LIMIT 1"), &[vol.into()], row_change)
    }

    fn delete_change(&mut self, vol: VolId, id: u64) -> FsResult<()> {
        self.0.exec("DELETE FROM changes WHERE vol = ?1 AND id = ?2", &[vol.into(), id.into()])?;
        Ok(())
    }

    fn list_changes(&mut self, vol: VolId, after: u64, limit: u32) -> FsResult<Vec<ChangeRow>> {
        self.0.all(
            concat!("SELECT ", change_cols!(), " FROM changes WHERE vol = ?1 AND id > ?2 ORDER BY id LIMIT ?3"),
            &[vol.into(), after.into(), (limit as i64).into()],
            row_change,
        )
    }

    fn prune_changes(&mut self, vol: VolId, keep: u64) -> FsResult<u64> {
        let cut =
            self.0.first("SELECT id FROM changes WHERE vol = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2", &[vol.into(), keep.into()], |r| {
                r.int(0)
            })?;
        let Some(cut) = cut else { return Ok(0) };
        let n = self.0.exec("DELETE FROM changes WHERE vol = ?1 AND id <= ?2", &[vol.into(), cut.into()])?;
        self.0.exec(
            "INSERT INTO changes_pruned (vol, through) VALUES (?1, ?2)
             ON CONFLICT (vol) DO UPDATE SET through = CASE WHEN excluded.through > changes_pruned.through
               THEN excluded.through ELSE changes_pruned.through END",
            &[vol.into(), cut.into()],
        )?;
        Ok(n)
    }

    fn changes_pruned_through(&mut self, vol: VolId) -> FsResult<u64> {
        Ok(self.0.first("SELECT through FROM changes_pruned WHERE vol = ?1", &[vol.into()], |r| r.uint(0))?.unwrap_or(0))
    }

    fn heartbeat(&mut self, server: &str, now: Timespec) -> FsResult<Option<Timespec>> {
        let before = self.0.first("SELECT seen FROM servers WHERE id = ?1", &[server.into()], |r| Ok(Timespec::from_nanos(r.int(0)?)))?;
        self.0.exec(
            "INSERT INTO servers (id, seen) VALUES (?1, ?2) ON CONFLICT (id) DO UPDATE SET seen = excluded.seen",
            &[server.into(), now.to_nanos().into()],
        )?;
        Ok(before)
    }

    fn store_time(&mut self) -> FsResult<Timespec> {
        Ok(self.0.clock()?.unwrap_or_else(Timespec::now))
    }

    fn sweep_servers(&mut self, before: Timespec) -> FsResult<u64> {
        // Also the rows of a server that never said it was alive (it died before its first beat).
        for sql in [
            "DELETE FROM locks WHERE server NOT IN (SELECT id FROM servers WHERE seen >= ?1)",
            "DELETE FROM open_files WHERE server NOT IN (SELECT id FROM servers WHERE seen >= ?1)",
        ] {
            self.0.exec(sql, &[before.to_nanos().into()])?;
        }
        self.0.exec("DELETE FROM servers WHERE seen < ?1", &[before.to_nanos().into()])
    }

    fn lock_conflict(&mut self, server: &str, alive: Timespec, vol: VolId, ino: Ino, want: &LockRow) -> FsResult<Option<LockRow>> {
        self.0.first(
            "SELECT l.owner, l.start, l.stop, l.typ, l.pid FROM locks l JOIN servers s ON s.id = l.server
             WHERE l.vol = ?1 AND l.ino = ?2 AND l.server <> ?3 AND s.seen >= ?4 AND l.start <= ?6 AND ?5 <= l.stop
               AND (l.typ = ?8 OR ?7 = ?8) ORDER BY l.start LIMIT 1",
            &[
                vol.into(),
                ino.into(),
                server.into(),
                alive.to_nanos().into(),
                want.start.into(),
                want.end.into(),
                (want.typ as i64).into(),
                (libc::F_WRLCK as i64).into(),
            ],
            row_lock,
        )
    }

    fn put_server_locks(&mut self, server: &str, vol: VolId, ino: Ino, held: &[LockRow]) -> FsResult<()> {
        self.0.exec("DELETE FROM locks WHERE server = ?1 AND vol = ?2 AND ino = ?3", &[server.into(), vol.into(), ino.into()])?;
        for l in held {
            self.0.exec(
                "INSERT INTO locks (server, vol, ino, owner, start, stop, typ, pid) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                &[
                    server.into(),
                    vol.into(),
                    ino.into(),
                    l.owner.into(),
                    l.start.into(),
                    l.end.into(),
                    (l.typ as i64).into(),
                    (l.pid as i64).into(),
                ],
            )?;
        }
        Ok(())
    }

    fn drop_server_locks(&mut self, server: &str) -> FsResult<()> {
        self.0.exec("DELETE FROM locks WHERE server = ?1", &[server.into()])?;
        Ok(())
    }

    fn put_open(&mut self, server: &str, vol: VolId, ino: Ino) -> FsResult<()> {
        self.0.exec(
            "INSERT INTO open_files (server, vol, ino) VALUES (?1, ?2, ?3) ON CONFLICT (server, vol, ino) DO NOTHING",
            &[server.into(), vol.into(), ino.into()],
        )?;
        Ok(())
    }

    fn drop_open(&mut self, server: &str, vol: VolId, ino: Ino) -> FsResult<()> {
        self.0.exec("DELETE FROM open_files WHERE server = ?1 AND vol = ?2 AND ino = ?3", &[server.into(), vol.into(), ino.into()])?;
        Ok(())
    }

    fn held_open(&mut self, vol: VolId, ino: Ino) -> FsResult<bool> {
        Ok(self.0.int("SELECT COUNT(*) FROM open_files WHERE vol = ?1 AND ino = ?2", &[vol.into(), ino.into()])? > 0)
    }

    fn opens_of(&mut self, server: &str) -> FsResult<Vec<(VolId, Ino)>> {
        self.0.all("SELECT vol, ino FROM open_files WHERE server = ?1", &[server.into()], |r| Ok((r.int(0)?, r.uint(1)?)))
    }

    fn announce(&mut self, message: &str) -> FsResult<()> {
        self.0.announce(message)
    }

    fn get_setting(&mut self, key: &str) -> FsResult<Option<String>> {
        self.0.first("SELECT value FROM settings WHERE key = ?1", &[key.into()], |r| r.text(0))
    }

    fn init_setting(&mut self, key: &str, value: &str) -> FsResult<String> {
        self.0.exec("INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING", &[key.into(), value.into()])?;
        self.get_setting(key)?.ok_or_else(|| FsError::new(libc::EIO, format!("metadata store: setting {key} vanished")))
    }

    fn insert_tenant(&mut self, t: &TenantRow) -> FsResult<()> {
        self.0.exec(
            "INSERT INTO tenants (name, token_sha256, default_cap, created) VALUES (?1, ?2, ?3, ?4)",
            &[t.name.as_str().into(), t.token_sha256.as_str().into(), t.default_cap.into(), t.created.to_nanos().into()],
        )?;
        Ok(())
    }

    fn tenant_by_token(&mut self, token_sha256: &str) -> FsResult<Option<TenantRow>> {
        self.0.first(concat!("SELECT ", tenant_cols!(), " FROM tenants WHERE token_sha256 = ?1"), &[token_sha256.into()], row_tenant)
    }

    fn list_tenants(&mut self) -> FsResult<Vec<TenantRow>> {
        self.0.all(concat!("SELECT ", tenant_cols!(), " FROM tenants ORDER BY name"), &[], row_tenant)
    }

    fn insert_sandbox(&mut self, name: &str, now: Timespec) -> FsResult<()> {
        self.0.exec("INSERT INTO sandboxes (name, created) VALUES (?1, ?2)", &[name.into(), now.to_nanos().into()])?;
        Ok(())
    }

    fn get_sandbox(&mut self, name: &str) -> FsResult<Option<SandboxRow>> {
        self.0.first("SELECT name, created FROM sandboxes WHERE name = ?1", &[name.into()], row_sandbox)
    }

    fn list_sandboxes(&mut self) -> FsResult<Vec<SandboxRow>> {
        self.0.all("SELECT name, created FROM sandboxes ORDER BY name", &[], row_sandbox)
    }

    fn delete_sandbox(&mut self, name: &str) -> FsResult<()> {
        self.0.exec("DELETE FROM attachments WHERE sandbox = ?1", &[name.into()])?;
        self.0.exec("DELETE FROM sandboxes WHERE name = ?1", &[name.into()])?;
        Ok(())
    }

    fn insert_attachment(&mut self, a: &AttachmentRow) -> FsResult<u64> {
        let id = self.0.int(
            "INSERT INTO attachments (sandbox, vol, path, read_only, subpath, state, reason) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
            &[
                a.sandbox.as_str().into(),
                a.volume.into(),
                a.path.as_str().into(),
                (a.read_only as i64).into(),
                a.subpath.as_str().into(),
                a.state.name().into(),
                a.reason.as_str().into(),
            ],
        )?;
        Ok(id as u64)
    }

    fn list_attachments(&mut self, sandbox: Option<&str>, volume: Option<VolId>) -> FsResult<Vec<AttachmentRow>> {
        // Two statements rather than `?1 IS NULL OR ...`: PostgreSQL cannot type a parameter
        // that is only ever compared with NULL, and each form gets its own plan.
        match (sandbox, volume) {
            (None, None) => self.0.all(concat!("SELECT ", attachment_cols!(), " FROM attachments ORDER BY id"), &[], row_attachment),
            (Some(s), None) => self.0.all(
                concat!("SELECT ", attachment_cols!(), " FROM attachments WHERE sandbox = ?1 ORDER BY id"),
                &[s.into()],
                row_attachment,
            ),
            (None, Some(v)) => self.0.all(
                concat!("SELECT ", attachment_cols!(), " FROM attachments WHERE vol = ?1 ORDER BY id"),
                &[v.into()],
                row_attachment,
            ),
            (Some(s), Some(v)) => self.0.all(
                concat!("SELECT ", attachment_cols!(), " FROM attachments WHERE sandbox = ?1 AND vol = ?2 ORDER BY id"),
                &[s.into(), v.into()],
                row_attachment,
            ),
        }
    }

    fn get_attachment(&mut self, id: u64) -> FsResult<Option<AttachmentRow>> {
        self.0.first(concat!("SELECT ", attachment_cols!(), " FROM attachments WHERE id = ?1"), &[id.into()], row_attachment)
    }

    fn set_attachment_state(&mut self, id: u64, state: AttachState, reason: &str) -> FsResult<()> {
        self.0.exec("UPDATE attachments SET state = ?2, reason = ?3 WHERE id = ?1", &[id.into(), state.name().into(), reason.into()])?;
        Ok(())
    }

    fn delete_attachment(&mut self, id: u64) -> FsResult<()> {
        self.0.exec("DELETE FROM attachments WHERE id = ?1", &[id.into()])?;
        Ok(())
    }
}

//! The metadata side of the engine: a small set of transactional primitives.
//!
//! POSIX semantics live once, in [`super::Engine`]; a metadata backend only stores rows. Every
//! engine operation runs in exactly one [`MetaStore::transact`] call, so a backend gives
//! atomicity for free and a crash leaves either all of an operation or none of it. Keep the SQL
//! portable (SQLite now, PostgreSQL next): plain tables, integer keys, byte-string names.
//!
//! The same store keeps the control-plane records (sandboxes, attachments) so that a server
//! restart knows every intent it had.

use crate::fs::{Attr, FsResult, Ino, Kind, Timespec};

/// Volume id: an integer chosen by the store, never reused.
pub type VolId = i64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRow {
    pub id: VolId,
    pub name: String,
    pub cap: u64,
    pub used: u64,
    pub inodes: u64,
    pub created: Timespec,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxRow {
    pub name: String,
    pub created: Timespec,
}

/// The lifecycle of an attachment (see docs/semantics.md: leases and the sandbox lifecycle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachState {
    /// Recorded; no guest has mounted it yet.
    Attached,
    /// A guest session holds a live lease.
    Mounted,
    /// Intent kept, no lease (hibernated, paused, or the guest went away cleanly).
    Released,
    /// Could not be mounted; `reason` says why.
    Failed,
}

impl AttachState {
    pub fn name(self) -> &'static str {
        match self {
            AttachState::Attached => "attached",
            AttachState::Mounted => "mounted",
            AttachState::Released => "released",
            AttachState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<AttachState> {
        Some(match s {
            "attached" => AttachState::Attached,
            "mounted" => AttachState::Mounted,
            "released" => AttachState::Released,
            "failed" => AttachState::Failed,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentRow {
    pub id: u64,
    pub sandbox: String,
    pub volume: VolId,
    pub path: String,
    pub read_only: bool,
    pub subpath: String,
    pub state: AttachState,
    pub reason: String,
}

/// A dentry as stored: `cookie` is a stable, increasing position within its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DentryRow {
    pub cookie: u64,
    pub name: Vec<u8>,
    pub ino: Ino,
    pub kind: Kind,
}

/// A metadata backend.
pub trait MetaStore: Send + Sync {
    /// Runs `f` in one transaction: committed if it returns `Ok`, rolled back otherwise.
    fn transact(&self, f: &mut dyn FnMut(&mut dyn MetaTxn) -> FsResult<()>) -> FsResult<()>;

    /// Makes every committed transaction durable (called by fsync).
    fn sync(&self) -> FsResult<()>;
}

/// The primitives available inside a transaction.
pub trait MetaTxn {
    fn volume_by_name(&mut self, name: &str) -> FsResult<Option<VolumeRow>>;
    fn volume_by_id(&mut self, id: VolId) -> FsResult<Option<VolumeRow>>;
    fn list_volumes(&mut self) -> FsResult<Vec<VolumeRow>>;
    fn insert_volume(&mut self, name: &str, cap: u64, now: Timespec) -> FsResult<VolId>;
    /// Removes the volume and every row that belongs to it.
    fn delete_volume(&mut self, id: VolId) -> FsResult<()>;
    /// Adds `delta` bytes to the volume's usage (negative to free).
    fn add_used(&mut self, id: VolId, delta: i64) -> FsResult<()>;

    /// A fresh inode number for this volume (never reused); counts one more inode.
    fn next_ino(&mut self, vol: VolId) -> FsResult<Ino>;
    fn get_inode(&mut self, vol: VolId, ino: Ino) -> FsResult<Option<Attr>>;
    /// Inserts or replaces the inode row.
    fn put_inode(&mut self, vol: VolId, attr: &Attr) -> FsResult<()>;
    /// Removes the inode row and its xattrs and symlink target; counts one inode less.
    fn delete_inode(&mut self, vol: VolId, ino: Ino) -> FsResult<()>;
    fn get_target(&mut self, vol: VolId, ino: Ino) -> FsResult<Vec<u8>>;
    fn set_target(&mut self, vol: VolId, ino: Ino, target: &[u8]) -> FsResult<()>;
    /// Inodes with no name left (unlinked while open when the server stopped).
    fn orphans(&mut self) -> FsResult<Vec<(VolId, Ino, u64)>>;

    fn get_dentry(&mut self, vol: VolId, parent: Ino, name: &[u8]) -> FsResult<Option<(Ino, Kind)>>;
    fn insert_dentry(&mut self, vol: VolId, parent: Ino, name: &[u8], ino: Ino, kind: Kind) -> FsResult<()>;
    fn delete_dentry(&mut self, vol: VolId, parent: Ino, name: &[u8]) -> FsResult<()>;
    /// Entries with cookie greater than `after`, in cookie order, at most `limit`.
    fn list_dentries(&mut self, vol: VolId, parent: Ino, after: u64, limit: u32) -> FsResult<Vec<DentryRow>>;
    fn has_dentries(&mut self, vol: VolId, parent: Ino) -> FsResult<bool>;
    /// The directory that holds directory `ino` (directories have exactly one name).
    fn dir_parent(&mut self, vol: VolId, ino: Ino) -> FsResult<Option<Ino>>;
    /// Every directory holding a name of `ino` (several for hard links).
    fn parents(&mut self, vol: VolId, ino: Ino) -> FsResult<Vec<Ino>>;

    fn get_xattr(&mut self, vol: VolId, ino: Ino, name: &[u8]) -> FsResult<Option<Vec<u8>>>;
    fn set_xattr(&mut self, vol: VolId, ino: Ino, name: &[u8], value: &[u8]) -> FsResult<()>;
    fn list_xattrs(&mut self, vol: VolId, ino: Ino) -> FsResult<Vec<(Vec<u8>, usize)>>;
    fn remove_xattr(&mut self, vol: VolId, ino: Ino, name: &[u8]) -> FsResult<bool>;

    fn insert_sandbox(&mut self, name: &str, now: Timespec) -> FsResult<()>;
    fn get_sandbox(&mut self, name: &str) -> FsResult<Option<SandboxRow>>;
    fn list_sandboxes(&mut self) -> FsResult<Vec<SandboxRow>>;
    fn delete_sandbox(&mut self, name: &str) -> FsResult<()>;

    fn insert_attachment(&mut self, a: &AttachmentRow) -> FsResult<u64>;
    fn list_attachments(&mut self, sandbox: Option<&str>, volume: Option<VolId>) -> FsResult<Vec<AttachmentRow>>;
    fn get_attachment(&mut self, id: u64) -> FsResult<Option<AttachmentRow>>;
    fn set_attachment_state(&mut self, id: u64, state: AttachState, reason: &str) -> FsResult<()>;
    fn delete_attachment(&mut self, id: u64) -> FsResult<()>;
}

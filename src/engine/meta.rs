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

/// A tenant: its own namespace of volumes and sandboxes (see [`super::TENANT_SEP`]), reached
/// with its own API token (only the token's SHA-256 is stored) and a default cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRow {
    pub name: String,
    pub token_sha256: String,
    pub default_cap: u64,
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

/// What happened to a name, as the change log records it (see [`super::Engine::changes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// A new name: create, mknod, mkdir, symlink, or link (a second name of an existing file).
    Create,
    /// Data written or truncated, attributes set (mode, owner, size, times), xattrs changed.
    Modify,
    /// A name removed: unlink, rmdir, or the target a rename replaced.
    Delete,
    /// A name moved from `from` to `path` (a rename; an exchange is two moves).
    Move,
}

impl ChangeKind {
    /// The name the API uses: "create", "modify", "delete" or "move".
    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::Create => "create",
            ChangeKind::Modify => "modify",
            ChangeKind::Delete => "delete",
            ChangeKind::Move => "move",
        }
    }

    pub fn parse(s: &str) -> Option<ChangeKind> {
        Some(match s {
            "create" => ChangeKind::Create,
            "modify" => ChangeKind::Modify,
            "delete" => ChangeKind::Delete,
            "move" => ChangeKind::Move,
            _ => return None,
        })
    }

    /// Stable small code used by the metadata stores.
    pub fn code(self) -> i64 {
        match self {
            ChangeKind::Create => 1,
            ChangeKind::Modify => 2,
            ChangeKind::Delete => 3,
            ChangeKind::Move => 4,
        }
    }

    pub fn from_code(code: i64) -> Option<ChangeKind> {
        Some(match code {
            1 => ChangeKind::Create,
            2 => ChangeKind::Modify,
            3 => ChangeKind::Delete,
            4 => ChangeKind::Move,
            _ => return None,
        })
    }
}

/// One entry of a volume's change log, as [`super::Engine::changes`] returns it.
///
/// Paths are `/`-separated from the volume root (`/` is the root itself) and are the paths the
/// names had when the change was made, not now. Names are bytes and may not be UTF-8: they are
/// converted lossily here (an invalid sequence becomes U+FFFD), which is what the API can carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Strictly increasing and never reused, across volumes and server restarts; ids of one
    /// volume are not consecutive (other volumes' changes, coalesced writes and pruning leave
    /// gaps).
    pub id: u64,
    pub kind: ChangeKind,
    /// The name changed; for a move, where it went.
    pub path: String,
    /// For a move, where the name was.
    pub from: Option<String>,
    /// What the name is: file, directory, symlink...
    pub node: Kind,
    /// When the change was made. A run of writes to one file folded into one row (see
    /// [`super::changelog`]) has the time of its first change since a reader last saw the row.
    pub time: Timespec,
}

/// A page of a volume's change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Changes with ids greater than the one asked for, oldest first.
    pub events: Vec<Change>,
    /// Some changes after the id asked for are no longer in the log (pruned by retention): the
    /// caller missed events and must resynchronise (list the tree again).
    pub truncated: bool,
}

/// A change log row as stored. Paths are the exact bytes of the names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRow {
    /// Chosen by the store on insert (ignored there).
    pub id: u64,
    pub kind: ChangeKind,
    pub node: Kind,
    /// The inode the change is about (lets a store coalesce a run of writes).
    pub ino: Ino,
    pub path: Vec<u8>,
    pub from: Option<Vec<u8>>,
    pub time: Timespec,
}

/// A piece of a file's data in a block store (see [`super::blocks`]): bytes `[off, off+len)`
/// of the file are bytes `[block_off, block_off+len)` of block `block`, or zeros when `block` is
/// `None` (a punched or zeroed range). Slices are never changed in place except to be cut short
/// by a truncate; a later slice (greater `id`) lies over earlier ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceRow {
    /// Chosen by the store on insert (ignored there); orders slices oldest first.
    pub id: u64,
    pub off: u64,
    pub len: u64,
    pub block: Option<String>,
    pub block_off: u64,
}

/// A byte-range lock held through a server, as servers sharing a store publish them (see
/// `server::locks`). `end` is inclusive; `u64::MAX` (to the end of file) is stored clamped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockRow {
    pub owner: u64,
    pub start: u64,
    pub end: u64,
    pub typ: i32,
    pub pid: u32,
}

/// A metadata backend.
pub trait MetaStore: Send + Sync {
    /// Runs `f` in one transaction: committed if it returns `Ok`, rolled back otherwise.
    fn transact(&self, f: &mut dyn FnMut(&mut dyn MetaTxn) -> FsResult<()>) -> FsResult<()>;

    /// Makes every committed transaction durable (called by fsync).
    fn sync(&self) -> FsResult<()>;

    /// The same store on a connection of its own, for work that must not wait behind this
    /// one's transactions (the heartbeat); `None` when there is nothing to gain (SQLite has
    /// one writer).
    fn side(&self) -> FsResult<Option<Box<dyn MetaStore>>> {
        Ok(None)
    }

    /// A listener for what other servers sharing this store announce with
    /// [`MetaTxn::announce`]; `None` for a store only this server uses.
    fn listen(&self) -> FsResult<Option<Box<dyn Listener>>> {
        Ok(None)
    }
}

/// Announcements of other servers' changes, in commit order (see [`MetaStore::listen`]).
pub trait Listener: Send {
    /// Waits at most `timeout` for announcements; an error means the connection broke (some
    /// may have been missed: make a new listener).
    fn wait(&mut self, timeout: std::time::Duration) -> FsResult<Vec<String>>;
}

/// The primitives available inside a transaction.
pub trait MetaTxn {
    fn volume_by_name(&mut self, name: &str) -> FsResult<Option<VolumeRow>>;
    fn volume_by_id(&mut self, id: VolId) -> FsResult<Option<VolumeRow>>;
    fn list_volumes(&mut self) -> FsResult<Vec<VolumeRow>>;
    fn insert_volume(&mut self, name: &str, cap: u64, now: Timespec) -> FsResult<VolId>;
    /// Removes the volume and every row that belongs to it, its change log included.
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
    /// The stored byte ranges `[start, end)` of a file that overlap or touch `[from, to]`, in
    /// order. A file's ranges are disjoint and never touch (they are merged as they are made).
    fn extents(&mut self, vol: VolId, ino: Ino, from: u64, to: u64) -> FsResult<Vec<(u64, u64)>>;
    /// Removes the ranges `old` (as `extents` returned them) and adds `new`.
    fn replace_extents(&mut self, vol: VolId, ino: Ino, old: &[(u64, u64)], new: &[(u64, u64)]) -> FsResult<()>;
    /// Every inode of the volume (for fsck).
    fn all_inodes(&mut self, vol: VolId) -> FsResult<Vec<Attr>>;
    /// Every name of the volume with the directory that holds it (for fsck).
    fn all_dentries(&mut self, vol: VolId) -> FsResult<Vec<(Ino, DentryRow)>>;
    /// The slices of a file that overlap `[from, to)`, oldest first.
    fn slices(&mut self, vol: VolId, ino: Ino, from: u64, to: u64) -> FsResult<Vec<SliceRow>>;
    /// Adds a slice over the file's others; those it covers whole (never read again) go.
    fn insert_slice(&mut self, vol: VolId, ino: Ino, s: &SliceRow) -> FsResult<()>;
    /// Cuts the file's slices at `size`: those past it go, one across it ends there.
    fn truncate_slices(&mut self, vol: VolId, ino: Ino, size: u64) -> FsResult<()>;
    /// Deletes the file's slices with ids up to `max_id` that start below `end` (what a
    /// compaction read and replaces).
    fn drop_slices(&mut self, vol: VolId, ino: Ino, max_id: u64, end: u64) -> FsResult<()>;
    /// Every block some slice of some volume refers to (what garbage collection keeps).
    fn referenced_blocks(&mut self) -> FsResult<Vec<String>>;
    /// The blocks the volume's slices refer to, with the inode of one slice for each.
    fn volume_blocks(&mut self, vol: VolId) -> FsResult<Vec<(String, Ino)>>;
    /// A new volume `name` with cap `cap` holding a copy of every row of volume `src` (inodes,
    /// names, xattrs, stored ranges, slices: blocks are shared), usage and inode count included.
    fn clone_volume(&mut self, src: VolId, name: &str, cap: u64, now: Timespec) -> FsResult<VolId>;
    /// Records the result of guest request `seq` of mount session `session` (see
    /// [`super::Engine::recording`]): the inode it made or changed and a number.
    fn insert_replay(&mut self, session: u64, seq: u64, rec: (u64, u64), now: Timespec) -> FsResult<()>;
    fn get_replay(&mut self, session: u64, seq: u64) -> FsResult<Option<(u64, u64)>>;
    /// The highest request recorded for the session (0 if none).
    fn last_replay_seq(&mut self, session: u64) -> FsResult<u64>;
    /// Forgets the session's records of requests before `below`.
    fn prune_replays(&mut self, session: u64, below: u64) -> FsResult<()>;
    /// Forgets every record made before `before`; returns how many.
    fn expire_replays(&mut self, before: Timespec) -> FsResult<u64>;
    /// Renames an entry in place: it keeps its cookie (no target may exist at the new name).
    fn move_dentry(&mut self, vol: VolId, parent: Ino, name: &[u8], new_parent: Ino, new_name: &[u8]) -> FsResult<()>;
    /// Points an existing entry at another inode, keeping its cookie.
    fn set_dentry_target(&mut self, vol: VolId, parent: Ino, name: &[u8], ino: Ino, kind: Kind) -> FsResult<()>;
    /// Entries with cookie greater than `after`, in cookie order, at most `limit`.
    fn list_dentries(&mut self, vol: VolId, parent: Ino, after: u64, limit: u32) -> FsResult<Vec<DentryRow>>;
    fn has_dentries(&mut self, vol: VolId, parent: Ino) -> FsResult<bool>;
    /// The directory that holds directory `ino` (directories have exactly one name).
    fn dir_parent(&mut self, vol: VolId, ino: Ino) -> FsResult<Option<Ino>>;
    /// Every directory holding a name of `ino` (several for hard links).
    fn parents(&mut self, vol: VolId, ino: Ino) -> FsResult<Vec<Ino>>;
    /// The oldest name of `ino` (its directory and name), or `None` if it has none.
    fn name_of(&mut self, vol: VolId, ino: Ino) -> FsResult<Option<(Ino, Vec<u8>)>>;

    fn get_xattr(&mut self, vol: VolId, ino: Ino, name: &[u8]) -> FsResult<Option<Vec<u8>>>;
    fn set_xattr(&mut self, vol: VolId, ino: Ino, name: &[u8], value: &[u8]) -> FsResult<()>;
    fn list_xattrs(&mut self, vol: VolId, ino: Ino) -> FsResult<Vec<(Vec<u8>, usize)>>;
    fn remove_xattr(&mut self, vol: VolId, ino: Ino, name: &[u8]) -> FsResult<bool>;

    /// Takes the volume's row until the transaction ends: transactions that take it commit one
    /// after another (with a shared store, change ids are taken under it, so that one volume's
    /// changes commit in id order and a reader that saw an id never misses a smaller one).
    fn lock_volume(&mut self, vol: VolId) -> FsResult<()>;

    /// Appends a row to the volume's change log; returns its id, greater than any id the log
    /// ever handed out (for any volume, even one since deleted, even before a restart).
    fn insert_change(&mut self, vol: VolId, c: &ChangeRow) -> FsResult<u64>;
    /// The volume's newest change log row.
    fn last_change(&mut self, vol: VolId) -> FsResult<Option<ChangeRow>>;
    fn delete_change(&mut self, vol: VolId, id: u64) -> FsResult<()>;
    /// Rows with id greater than `after`, in id order, at most `limit`.
    fn list_changes(&mut self, vol: VolId, after: u64, limit: u32) -> FsResult<Vec<ChangeRow>>;
    /// Deletes all but the newest `keep` rows of the volume's log and remembers the largest id
    /// deleted (see [`MetaTxn::changes_pruned_through`]); returns how many went.
    fn prune_changes(&mut self, vol: VolId, keep: u64) -> FsResult<u64>;
    /// The largest id that pruning has removed from the volume's log (0 if none).
    fn changes_pruned_through(&mut self, vol: VolId) -> FsResult<u64>;

    /// Records that server `server` is alive at `now`; returns when it was last seen (`None`:
    /// never, or forgotten since).
    fn heartbeat(&mut self, server: &str, now: Timespec) -> FsResult<Option<Timespec>>;
    /// The store's clock: every server's liveness is measured on it (servers' own clocks may
    /// disagree).
    fn store_time(&mut self) -> FsResult<Timespec>;
    /// Forgets the servers not seen since `before` and the locks held through them; returns how
    /// many servers went.
    fn sweep_servers(&mut self, before: Timespec) -> FsResult<u64>;
    /// The first lock on the file held through a server other than `server` and seen since
    /// `alive` that conflicts with `want` (any lock conflicts with a write lock; read locks
    /// share).
    fn lock_conflict(&mut self, server: &str, alive: Timespec, vol: VolId, ino: Ino, want: &LockRow) -> FsResult<Option<LockRow>>;
    /// Replaces the locks on the file held through `server` with `held`.
    fn put_server_locks(&mut self, server: &str, vol: VolId, ino: Ino, held: &[LockRow]) -> FsResult<()>;
    /// Removes every lock held through `server` (it restarted: its guests reclaim theirs).
    fn drop_server_locks(&mut self, server: &str) -> FsResult<()>;

    /// Server `server` holds inode `ino` open (one row however many handles: the count is
    /// the server's own). With a shared store an inode without names is freed only once no
    /// server holds it open.
    fn put_open(&mut self, server: &str, vol: VolId, ino: Ino) -> FsResult<()>;
    fn drop_open(&mut self, server: &str, vol: VolId, ino: Ino) -> FsResult<()>;
    /// Whether any server holds the inode open.
    fn held_open(&mut self, vol: VolId, ino: Ino) -> FsResult<bool>;
    /// The inodes server `server` holds open.
    fn opens_of(&mut self, server: &str) -> FsResult<Vec<(VolId, Ino)>>;

    /// Tells the other servers sharing the store `message`, when (and only if) this
    /// transaction commits; nothing for a store only this server uses.
    fn announce(&mut self, message: &str) -> FsResult<()>;

    /// A store-wide setting (see [`super::Engine::open_store`]'s pairing of stores).
    fn get_setting(&mut self, key: &str) -> FsResult<Option<String>>;
    /// Sets `key` unless it is set already; returns the value it has now.
    fn init_setting(&mut self, key: &str, value: &str) -> FsResult<String>;

    fn insert_tenant(&mut self, t: &TenantRow) -> FsResult<()>;
    fn tenant_by_token(&mut self, token_sha256: &str) -> FsResult<Option<TenantRow>>;
    fn list_tenants(&mut self) -> FsResult<Vec<TenantRow>>;
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

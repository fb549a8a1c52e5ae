//! The volume engine: POSIX semantics, implemented once, over a [`MetaStore`] and a [`BlobStore`].
//!
//! Every operation's metadata changes commit in one transaction (freeing an inode whose last
//! name and handle are gone is a second one, after it). The engine knows nothing of FUSE, sockets or
//! HTTP: callers name a volume id, inode numbers and a [`Caller`], and get attributes or an
//! [`FsError`] carrying the errno to report.
//!
//! Invariants:
//! - A directory's `nlink` is 2 plus its number of subdirectories; the root has no dentry.
//! - A volume's `used` is the sum of the bytes its regular files store (including files
//!   unlinked while still open), of its symlink targets and of its xattr names and values; it
//!   never exceeds `cap` (a write, fallocate, copy, symlink or setxattr that would pass it fails
//!   with `EDQUOT` and changes nothing). A file stores the byte ranges its writes and
//!   preallocations cover (kept in the metadata store, merged, so `Attr::alloc` and `used` are
//!   exact whatever the host filesystem does with holes); holes are free. Inodes are bounded by
//!   [`max_inodes`].
//! - An inode whose last name is removed while it is open stays (with `nlink == 0`) until the last
//!   handle is released; orphans left by a server stop can be reopened after the restart and are
//!   reclaimed when [`Engine::reclaim_orphans`] finds them unheld (the server calls it once the
//!   guests have had a lease TTL to reconnect).
//! - Every change to a name, a file's data or attributes is recorded in the volume's change log in
//!   the transaction that makes it (see [`changelog`]), so watchers see what guests do too.
//! - Permission checks follow POSIX for the caller's uid, gid and supplementary groups (setgid
//!   directories, sticky bit, owner-only chmod/utimes, root-only chown), and POSIX.1e ACLs on
//!   inodes that have one (see [`acl`]). They are semantics, not
//!   security: the attachment's scope, enforced by the server, is the security boundary.

pub mod acl;
pub mod blob;
pub mod blocks;
pub mod buffer;
pub mod changelog;
pub mod meta;
pub mod pg;
mod registry;
mod small;
mod sql;
pub mod sqlite;

use crate::fs::*;
use acl::Acl;
use blob::BlobStore;
pub use changelog::{parse_announcement, Announced, ChangeNotifier, ChangeRetention};
use changelog::{ChangeLog, Event};
pub use meta::{Change, ChangeKind, Changes};
use meta::{DentryRow, MetaStore, MetaTxn, SliceRow, VolId};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Default volume cap: 2 GiB.
pub const DEFAULT_CAP: u64 = 2 << 30;
/// Largest file size (as ext4 with 4 KiB blocks).
pub const MAX_FILE_SIZE: u64 = 16 << 40;
const MAX_LINKS: u32 = 65000;
/// Total bytes of xattr names and values on one inode: room for several values of the largest
/// size Linux allows (`XATTR_SIZE_MAX`, 64 KiB), as XFS and btrfs give; the cap charges them all.
const XATTR_TOTAL_MAX: usize = 256 << 10;
/// Total bytes of xattr names (each with its NUL) on one inode: what one `listxattr` can return
/// (Linux's `XATTR_LIST_MAX`).
const XATTR_LIST_MAX: usize = 64 << 10;
/// A volume may hold one inode per this many bytes of its cap (at least [`MIN_INODES`]): the
/// metadata rows of a volume, which the cap does not count, stay bounded by its size. ext4's
/// default is one per 16 KiB.
pub const BYTES_PER_INODE: u64 = 4096;
pub const MIN_INODES: u64 = 4096;

/// The most inodes a volume with this cap may hold.
pub fn max_inodes(cap: u64) -> u64 {
    (cap / BYTES_PER_INODE).max(MIN_INODES)
}
const BLOCK: u64 = 4096;

/// The open flag execve(2) adds (`__FMODE_EXEC` in Linux's uapi fcntl.h); FUSE passes it on.
const FMODE_EXEC: i32 = 0o40;

const R: u32 = 4;
const W: u32 = 2;
const X: u32 = 1;

/// Handles per inode, and the open inodes whose last name is gone: only those need any work
/// when their last handle is released (every other close costs nothing here).
#[derive(Default)]
struct OpenTable {
    counts: HashMap<(VolId, Ino), u32>,
    unlinked: std::collections::HashSet<(VolId, Ino)>,
    /// With a shared store, inodes this server no longer holds whose `open_files` rows are
    /// still to go (at the next heartbeat, see [`Engine::flush_closed`]): a close costs no
    /// transaction.
    closed: std::collections::HashSet<(VolId, Ino)>,
}

pub struct Engine {
    meta: Box<dyn MetaStore>,
    data: Data,
    /// Open handles per inode, across every session and API caller.
    open: Mutex<OpenTable>,
    /// Per volume, a counter moved by every operation that can take a name out of a subtree
    /// (rename, unlink): whoever caches "inode I lies inside subtree S" must check again once
    /// it moves. See [`Engine::scope_epoch`].
    scope_epochs: Mutex<HashMap<VolId, u64>>,
    /// Every mutation is recorded in the volume's change log (see [`changelog`]).
    changelog: ChangeLog,
    /// The metadata lives outside this server (PostgreSQL), so other servers may change any
    /// volume: nothing this server remembers about a volume between requests is trusted
    /// (see [`Engine::shared`]). Moves with every [`Engine::scope_epoch`] call when set.
    shared: Option<std::sync::atomic::AtomicU64>,
    /// With a shared store, the id this server's announcements carry (see
    /// [`Engine::set_origin`]).
    origin: std::sync::OnceLock<String>,
    /// With a shared store, the heartbeat's own connection (see [`Engine::server_heartbeat`]).
    beat: std::sync::OnceLock<Box<dyn MetaStore>>,
    /// With a block store, writes to each file since it was last considered for compaction,
    /// and the files due for it (see [`Engine::compact`]).
    compaction: Mutex<Compaction>,
    /// With a block store, the volumes where a write was refused for want of space lately:
    /// their writes are checked before their blocks are uploaded (see [`Engine::write`]).
    full: Mutex<std::collections::HashSet<VolId>>,
    /// With a block store and a server, guests' writes held back per open file (see
    /// [`buffer`]).
    buffers: buffer::Buffers,
}

/// Files written since they were last considered for compaction (see [`Engine::compact`]).
#[derive(Default)]
struct Compaction {
    writes: HashMap<(VolId, Ino), u32>,
    due: std::collections::BTreeSet<(VolId, Ino)>,
}

/// A file is considered for compaction after this many writes...
const COMPACT_AFTER_WRITES: u32 = 64;
/// ...and rewritten if it has more slices than this per [`blocks::BLOCK_MAX`] of its size.
const COMPACT_SLICES_PER_BLOCK: usize = 4;
/// The most bytes one compaction rewrites (a larger file in small pieces is left as it is)...
const COMPACT_MAX_BYTES: u64 = 256 << 20;
/// ...and the longest it may take: its new blocks must not be older than gc's grace (an hour
/// by default) when it swaps them in.
const COMPACT_PASS_MAX: std::time::Duration = std::time::Duration::from_secs(300);
/// Files whose writes are counted at once (past that the counts start again: memory stays
/// bounded however many files a server writes).
const COMPACT_TRACKED: usize = 1 << 16;

/// What a heartbeat found (see [`Engine::server_heartbeat`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    /// Servers silent for a TTL, forgotten with their locks and handles.
    pub forgotten: u64,
    /// This server itself was silent for a TTL (or is new): its locks must be published again.
    pub missed: bool,
}

/// Told the attributes of every inode that a mutation on its thread changes, inside the
/// mutation's transaction (see [`Engine::observed`]).
pub trait Observer: Send + Sync {
    fn changed(&self, a: &Attr);
}

thread_local! {
    /// Who is told what mutations on this thread change, set by [`Engine::observed`].
    static OBSERVER: std::cell::RefCell<Option<Arc<dyn Observer>>> = const { std::cell::RefCell::new(None) };
    /// The guest request (mount session, sequence number) whose mutation runs on this thread,
    /// set by [`Engine::recording`]: the first mutation's result is recorded in its own
    /// transaction, so a reply lost in a server crash can be given again, not applied twice.
    static REPLAY_TAG: std::cell::Cell<Option<(u64, u64)>> = const { std::cell::Cell::new(None) };
}

/// Records of one session older than this many requests are pruned (its guest never has more
/// than a window's worth of requests unanswered).
const REPLAY_KEEP: u64 = 4096;

/// What a mutation's result leaves for a replay: the inode it made or changed, and a number
/// (where an append landed, how many bytes a copy copied).
pub trait Recorded {
    fn recorded(&self) -> (u64, u64);
}

impl Recorded for Attr {
    fn recorded(&self) -> (u64, u64) {
        (self.ino, 0)
    }
}

impl Recorded for (u64, Attr) {
    fn recorded(&self) -> (u64, u64) {
        (self.1.ino, self.0)
    }
}

impl Recorded for () {
    fn recorded(&self) -> (u64, u64) {
        (0, 0)
    }
}

/// Removals and renames: the inode to purge afterwards is nobody's business on a replay.
impl Recorded for Option<Ino> {
    fn recorded(&self) -> (u64, u64) {
        (0, 0)
    }
}

/// Inside a mutation's transaction: records its result if a guest request is being recorded.
/// Tells this thread's observer (if any) the attributes after of the inodes `events` changed.
fn tell_observer(t: &mut dyn MetaTxn, vol: VolId, events: &[changelog::Event], held: &dyn Fn(Attr) -> Attr) -> FsResult<()> {
    let Some(o) = observer() else { return Ok(()) };
    let mut inodes: Vec<Ino> = Vec::with_capacity(4);
    for ev in events {
        match ev {
            changelog::Event::Name { ino, dir, .. } => inodes.extend([*dir, *ino]),
            changelog::Event::Move { ino, dir, new_dir, .. } => inodes.extend([*dir, *new_dir, *ino]),
            changelog::Event::Modify { ino, .. } => inodes.push(*ino),
        }
    }
    inodes.sort_unstable();
    inodes.dedup();
    for ino in inodes {
        // A removed inode has nothing to tell.
        if let Some(a) = t.get_inode(vol, ino)? {
            o.changed(&held(a));
        }
    }
    Ok(())
}

/// This thread's observer, if [`Engine::observed`] set one.
fn observer() -> Option<Arc<dyn Observer>> {
    OBSERVER.with(|c| c.borrow().clone())
}

/// The request this thread's next mutation records its result under, if any (see
/// [`Engine::recording`]). Read before the transaction and consumed only once it commits
/// ([`consume_replay_tag`]): a transaction run again after a serialization failure records too.
fn replay_tag() -> Option<(u64, u64)> {
    REPLAY_TAG.with(|c| c.get())
}

fn consume_replay_tag() {
    REPLAY_TAG.with(|c| c.set(None));
}

/// Runs `f` with no request recorded by its mutations (a flush of held-back writes made during
/// another request: that request's own mutation is the one recorded).
fn unrecorded<T>(f: impl FnOnce() -> T) -> T {
    let tag = REPLAY_TAG.with(|c| c.take());
    let out = f();
    if tag.is_some() {
        REPLAY_TAG.with(|c| c.set(tag));
    }
    out
}

fn record_replay(t: &mut dyn MetaTxn, tag: Option<(u64, u64)>, out: &impl Recorded) -> FsResult<()> {
    let Some((session, seq)) = tag else { return Ok(()) };
    t.insert_replay(session, seq, out.recorded(), Timespec::now())?;
    if seq.is_multiple_of(REPLAY_KEEP / 4) {
        t.prune_replays(session, seq.saturating_sub(REPLAY_KEEP))?;
    }
    Ok(())
}

/// Clears the replay tag however `recording`'s body ends (a panic included).
struct TagGuard;

impl Drop for TagGuard {
    fn drop(&mut self) {
        REPLAY_TAG.with(|c| c.set(None));
    }
}

/// Runs `f` in one transaction of `store` and returns what it produced (the last run's, if the
/// store ran it again).
fn transact<T>(store: &dyn MetaStore, mut f: impl FnMut(&mut dyn MetaTxn) -> FsResult<T>) -> FsResult<T> {
    let mut out = None;
    store.transact(&mut |t| {
        out = Some(f(t)?);
        Ok(())
    })?;
    Ok(out.expect("committed transaction produced a value"))
}

/// The one stored range that `[start, end)` and the ranges `old` it touches become, and how many
/// bytes that adds to them.
fn merged_extent(old: &[(u64, u64)], start: u64, end: u64) -> ((u64, u64), u64) {
    let lo = old.first().map_or(start, |r| r.0.min(start));
    let hi = old.last().map_or(end, |r| r.1.max(end));
    ((lo, hi), (hi - lo) - old.iter().map(|(s, e)| e - s).sum::<u64>())
}

/// `EDQUOT` unless volume `v` has room for `grow` more bytes.
fn room(v: &meta::VolumeRow, grow: u64) -> FsResult<()> {
    match v.used.saturating_add(grow) > v.cap {
        true => {
            Err(FsError::new(libc::EDQUOT, format!("volume `{}` is full: {} of {} bytes used, {grow} more needed", v.name, v.used, v.cap)))
        }
        false => Ok(()),
    }
}

fn enoent(what: impl std::fmt::Display) -> FsError {
    FsError::new(libc::ENOENT, format!("{what} does not exist"))
}

/// An inode number that names nothing (any more): `ESTALE`, as NFS says it. A guest kernel whose
/// cached name still points at a replaced file retries the lookup on `ESTALE` (Linux's
/// `LOOKUP_REVAL`) and finds the new file, where `ENOENT` would reach the program.
fn stale(ino: Ino) -> FsError {
    FsError::new(libc::ESTALE, format!("inode {ino} no longer exists"))
}

fn lossy(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

/// Whether `c` has all of `want` (R/W/X bits) on `a`; `acl` is `a`'s access ACL when it has one
/// (see [`Engine::access_acl`]), which then decides instead of the group and other bits.
fn permits(a: &Attr, acl: Option<&Acl>, c: &Caller, want: u32) -> bool {
    if c.is_root() {
        // Root may do anything but execute a file that nobody may execute.
        return want & X == 0 || a.kind == Kind::Dir || a.perm & 0o111 != 0;
    }
    if let Some(acl) = acl {
        return acl.permits(a, c, want);
    }
    let bits = if c.uid == a.uid {
        (a.perm >> 6) & 7
    } else if c.in_group(a.gid) {
        (a.perm >> 3) & 7
    } else {
        a.perm & 7
    };
    bits & want == want
}

/// An ACL xattr to store: its name ([`acl::ACCESS`] or [`acl::DEFAULT`]) and value.
type AclXattr = (&'static [u8], Vec<u8>);

fn check_access(a: &Attr, acl: Option<&Acl>, c: &Caller, want: u32) -> FsResult<()> {
    if permits(a, acl, c, want) {
        return Ok(());
    }
    let need = [(R, "read"), (W, "write"), (X, "search/execute")]
        .iter()
        .filter(|(b, _)| want & b != 0)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join("+");
    Err(FsError::new(
        libc::EACCES,
        format!(
            "uid {} lacks {need} permission on inode {} (mode {:o}, owner {}:{}{})",
            c.uid,
            a.ino,
            a.perm,
            a.uid,
            a.gid,
            if acl.is_some() { ", with an ACL" } else { "" }
        ),
    ))
}

/// Data operations need a regular file: `EISDIR` for a directory, `EINVAL` for anything else.
fn regular(a: &Attr) -> FsResult<()> {
    match a.kind {
        Kind::File => Ok(()),
        Kind::Dir => Err(FsError::new(libc::EISDIR, format!("inode {} is a directory", a.ino))),
        Kind::Symlink | Kind::Fifo | Kind::Socket | Kind::CharDev | Kind::BlockDev => {
            Err(FsError::new(libc::EINVAL, format!("inode {} is not a regular file", a.ino)))
        }
    }
}

/// A write, truncate or owner change by someone other than root drops setuid, and setgid when
/// the group may execute (without group execute, setgid means mandatory locking and stays).
fn drop_setid(a: &mut Attr) {
    a.perm &= !libc::S_ISUID;
    if a.perm & libc::S_IXGRP != 0 {
        a.perm &= !libc::S_ISGID;
    }
}

/// The sticky-bit rule: in a sticky directory only the owner of the entry, the owner of the
/// directory or root may remove or rename it.
fn check_sticky(dir: &Attr, child: &Attr, c: &Caller) -> FsResult<()> {
    if dir.perm & libc::S_ISVTX != 0 && !c.is_root() && c.uid != dir.uid && c.uid != child.uid {
        return Err(FsError::new(libc::EPERM, format!("directory {} is sticky and uid {} owns neither it nor the entry", dir.ino, c.uid)));
    }
    Ok(())
}

/// Parses sizes such as `2GiB`, `512MiB`, `10MB`, `4096`, `1.5GiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|ch: char| !(ch.is_ascii_digit() || ch == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "kb" => 1000,
        "m" | "mib" => 1 << 20,
        "mb" => 1_000_000,
        "g" | "gib" => 1 << 30,
        "gb" => 1_000_000_000,
        "t" | "tib" => 1 << 40,
        "tb" => 1_000_000_000_000,
        _ => return Err(format!("invalid size {s:?}: unknown unit {unit:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")),
    };
    let n: f64 = num.parse().map_err(|_| format!("invalid size {s:?}: expected a number with an optional unit, like 2GiB"))?;
    let bytes = n * mult as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("invalid size {s:?}: must be at least 1 byte"));
    }
    Ok(bytes as u64)
}

/// Makes sure the metadata was written with file data kept as `layout` ("files" or "blocks"):
/// the layout is recorded at first open (a store from before the record, with bytes stored, was
/// written as files). Reading one layout's metadata as the other would read every file as zeros.
fn check_layout(meta: &dyn MetaStore, layout: &str) -> FsResult<()> {
    let mut recorded = String::new();
    meta.transact(&mut |t| {
        recorded = match t.get_setting("data_layout")? {
            Some(l) => l,
            None => {
                let old_files = t.list_volumes()?.iter().any(|v| v.used > 0);
                t.init_setting("data_layout", if old_files { "files" } else { layout })?
            }
        };
        Ok(())
    })?;
    if recorded == layout {
        return Ok(());
    }
    let how = if recorded == "blocks" { "with --blocks URL" } else { "without --blocks" };
    Err(FsError::new(
        libc::EINVAL,
        format!("this store keeps file data as {recorded}, not {layout}: start the server {how}, as it was made"),
    ))
}

/// The half of a store that keeps file data, as [`pair_stores`] sees it: somewhere to keep the
/// store id.
trait DataId {
    fn get_id(&self) -> FsResult<Option<String>>;
    fn put_id(&self, id: &str) -> FsResult<()>;
    fn describe(&self) -> String;
}

/// `DIR/store-id`, for file data under the data directory.
struct LocalId(std::path::PathBuf);

impl DataId for LocalId {
    fn get_id(&self) -> FsResult<Option<String>> {
        match std::fs::read_to_string(&self.0) {
            Ok(s) => Ok(Some(s.trim().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(FsError::new(libc::EIO, format!("cannot read {}: {e}", self.0.display()))),
        }
    }

    fn put_id(&self, id: &str) -> FsResult<()> {
        std::fs::write(&self.0, format!("{id}\n")).map_err(|e| FsError::new(libc::EIO, format!("cannot write {}: {e}", self.0.display())))
    }

    fn describe(&self) -> String {
        format!("data directory {}", self.0.parent().unwrap_or(&self.0).display())
    }
}

impl DataId for blocks::BlockStore {
    fn get_id(&self) -> FsResult<Option<String>> {
        self.get_meta("store-id")
    }

    fn put_id(&self, id: &str) -> FsResult<()> {
        self.put_meta("store-id", id)
    }

    fn describe(&self) -> String {
        format!("block store {}", self.url)
    }
}

/// Makes sure that the metadata in `meta` and the file data in `data`, kept apart, are the two
/// halves of one store: each holds the same store id (setting `store_id`; `DIR/store-id` or the
/// block store's `store-id` object), given to both on first use. A server started with empty
/// data against metadata that has files, or with another store's data, is refused: it would
/// read every file as zeros.
fn pair_stores(meta: &dyn MetaStore, data: &dyn DataId) -> FsResult<()> {
    let local = data.get_id()?;
    let now = Timespec::now();
    let fresh = format!("{:x}{:08x}{:x}", now.sec, now.nsec, std::process::id());
    let mut remote = None;
    meta.transact(&mut |t| {
        remote = Some(match &local {
            Some(_) => t.get_setting("store_id")?,
            None => Some(t.init_setting("store_id", &fresh)?),
        });
        Ok(())
    })?;
    match (local, remote.flatten()) {
        (Some(l), Some(r)) if l == r => Ok(()),
        (None, None) => Err(FsError::new(libc::EIO, "metadata store: the store id was not recorded")),
        (None, Some(r)) if r == fresh => data.put_id(&r),
        (None, Some(r)) => Err(FsError::new(
            libc::EINVAL,
            format!(
                "the metadata store belongs to other data (store id {r}) and the {} has none: start the server with \
                 that store's data (if this is it, give it the id {r})",
                data.describe()
            ),
        )),
        (Some(l), r) => Err(FsError::new(
            libc::EINVAL,
            format!(
                "the {} belongs to store {l}, but the metadata store holds {}: start the server with the metadata \
                 store this data was made with",
                data.describe(),
                r.map_or("no store".to_string(), |r| format!("store {r}"))
            ),
        )),
    }
}

/// What a volume is, as the API reports it.
pub use meta::VolumeRow as VolumeInfo;

/// Separates a tenant's name from the name of one of its volumes or sandboxes: tenant `acme`'s
/// volume `data` is `acme~data` to the engine and the operator, and `data` to acme. Names given
/// by anyone cannot contain it (see [`check_object_name`]), so no tenant can spell its way into
/// another's namespace.
pub const TENANT_SEP: char = '~';

/// Checks a volume or sandbox name: 1–63 characters of `[A-Za-z0-9._-]`, not starting with `.`,
/// optionally behind a tenant's name and [`TENANT_SEP`] (itself such a name).
pub fn check_object_name(what: &str, name: &str) -> FsResult<()> {
    if let Some((tenant, rest)) = name.split_once(TENANT_SEP) {
        check_plain_name("tenant", tenant)?;
        return check_plain_name(what, rest);
    }
    check_plain_name(what, name)
}

/// [`check_object_name`] without a tenant part.
pub fn check_plain_name(what: &str, name: &str) -> FsResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(FsError::new(
            libc::EINVAL,
            format!("invalid {what} name {name:?}: use 1-63 letters, digits, '.', '-' or '_', not starting with '.'"),
        ))
    }
}

/// What [`Engine::fsck`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct FsckReport {
    pub volume: String,
    pub inodes: u64,
    pub names: u64,
    /// Blocks the volume refers to (0 without a block store).
    pub blocks: u64,
    /// Inodes without names, kept while open (freed at the next restart otherwise).
    pub orphans: u64,
    /// Empty when the volume is consistent.
    pub problems: Vec<String>,
}

/// Where file contents live.
enum Data {
    /// A byte store written in place ([`BlobStore`]): the embedded default.
    Bytes(Box<dyn BlobStore>),
    /// Immutable blocks, referred to by slice rows in the metadata ([`blocks`]).
    Blocks(Box<blocks::BlockStore>),
}

impl Engine {
    fn with_data(meta: Box<dyn MetaStore>, data: Data) -> FsResult<Engine> {
        Ok(Engine {
            meta,
            data,
            shared: None,
            origin: std::sync::OnceLock::new(),
            beat: std::sync::OnceLock::new(),
            full: Mutex::default(),
            buffers: Default::default(),
            compaction: Mutex::default(),
            open: Mutex::new(OpenTable::default()),
            scope_epochs: Mutex::default(),
            changelog: ChangeLog::default(),
        })
    }

    /// The embedded default: SQLite metadata and local data files under one directory.
    pub fn open_dir(dir: &Path) -> FsResult<Engine> {
        Engine::open_store(dir, None, None)
    }

    /// Metadata in SQLite under `dir` (`meta` `None`) or in the PostgreSQL database at `meta`
    /// (`postgres://...`, see [`pg`]); file data under `dir` (`blocks` `None`) or as blocks in
    /// the object store at `blocks` (`file:///dir`, `s3://bucket?...`, see [`blocks`]).
    pub fn open_store(dir: &Path, meta: Option<&str>, blocks: Option<&str>) -> FsResult<Engine> {
        Engine::open_store_cached(dir, meta, blocks, blocks::DISK_CACHE_DEFAULT)
    }

    /// [`Engine::open_store`] with an on-disk cache of `disk_cache` bytes (under
    /// `dir/block-cache`; 0: none) for the blocks of a remote (S3) store.
    pub fn open_store_cached(dir: &Path, meta: Option<&str>, blocks: Option<&str>, disk_cache: u64) -> FsResult<Engine> {
        std::fs::create_dir_all(dir)
            .map_err(|e| FsError::new(libc::EIO, format!("cannot create data directory {}: {e}", dir.display())))?;
        let local_meta = meta.is_none();
        let meta: Box<dyn MetaStore> = match meta {
            None => Box::new(sqlite::SqliteMeta::open(&dir.join("meta.db"))?),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => Box::new(pg::PgMeta::open(url)?),
            Some(other) => {
                return Err(FsError::new(
                    libc::EINVAL,
                    format!("unknown metadata store {other:?}: expected postgres://user@host:port/database"),
                ))
            }
        };
        let data = match blocks {
            None => Data::Bytes(Box::new(small::SmallFirst::open(&dir.join("blobs"), &dir.join("blobs.db"))?)),
            Some(url) => {
                let disk = (!url.starts_with("file://")).then(|| dir.join("block-cache"));
                Data::Blocks(Box::new(blocks::BlockStore::open(url, blocks::CACHE_DEFAULT, disk.as_deref().map(|d| (d, disk_cache)))?))
            }
        };
        check_layout(&*meta, if matches!(data, Data::Blocks(_)) { "blocks" } else { "files" })?;
        // Metadata and data kept apart must be the two halves of one store.
        match (&data, local_meta) {
            (Data::Bytes(_), true) => {}
            (Data::Bytes(_), false) => pair_stores(&*meta, &LocalId(dir.join("store-id")))?,
            (Data::Blocks(b), _) => pair_stores(&*meta, &**b)?,
        }
        let mut e = Engine::with_data(meta, data)?;
        if !local_meta {
            e.shared = Some(std::sync::atomic::AtomicU64::new(0));
        }
        Ok(e)
    }

    /// With a shared store: from now on every change is announced to the other servers
    /// (delivered when its transaction commits), tagged `id` so that this server can tell its
    /// own announcements from theirs.
    pub fn set_origin(&self, id: &str) {
        if self.shared() {
            let _ = self.origin.set(id.to_string());
        }
    }

    fn origin(&self) -> Option<&str> {
        self.origin.get().map(String::as_str)
    }

    /// A listener for the other servers' announcements ([`changelog::parse_announcement`]
    /// reads them); `None` with a store only this server uses.
    pub fn listen(&self) -> FsResult<Option<Box<dyn meta::Listener>>> {
        self.meta.listen()
    }

    /// Whether other servers may change this engine's volumes (its metadata is in a store they
    /// share): then a session cannot rely on pushes alone to hear of changes.
    pub fn shared(&self) -> bool {
        self.shared.is_some()
    }

    // ----- locks across servers (see server::locks) ------------------------------------------

    /// Server `server` starts: the locks published by its previous run go (its guests reclaim
    /// theirs, checked against everyone else's).
    pub fn server_started(&self, server: &str) -> FsResult<()> {
        self.tx(|t| t.drop_server_locks(server))
    }

    /// Server `server` is alive; servers not seen for `ttl` are forgotten with their locks.
    /// The orphans only the forgotten servers held open are freed. Runs on a connection of
    /// its own (a long transaction of this server's must not delay it past the others' patience)
    /// and on the store's clock. If this server was silent for a TTL itself (the others may
    /// have forgotten it), its open handles are published again and the caller must publish its
    /// locks again ([`Beat::missed`]).
    pub fn server_heartbeat(&self, server: &str, ttl: std::time::Duration) -> FsResult<Beat> {
        let (forgotten, missed) = self.beat_tx(|t| {
            let now = t.store_time()?;
            let last = t.heartbeat(server, now)?;
            Ok((t.sweep_servers(now.minus(ttl))?, last.is_none_or(|l| l < now.minus(ttl))))
        })?;
        if missed {
            self.tx(|t| {
                let held: Vec<(VolId, Ino)> = self.open.lock().unwrap().counts.keys().copied().collect();
                held.into_iter().try_for_each(|(vol, ino)| t.put_open(self.holder(), vol, ino))
            })?;
        }
        self.flush_closed()?;
        if forgotten > 0 {
            self.purge_unheld_orphans()?;
        }
        Ok(Beat { forgotten, missed })
    }

    /// A transaction on the heartbeat's own connection (the main one where the store has no
    /// second).
    fn beat_tx<T>(&self, f: impl FnMut(&mut dyn MetaTxn) -> FsResult<T>) -> FsResult<T> {
        if self.beat.get().is_none() {
            match self.meta.side()? {
                Some(side) => {
                    let _ = self.beat.set(side);
                }
                None => return self.tx(f),
            }
        }
        transact(&**self.beat.get().expect("set above"), f)
    }

    /// In one transaction: the first lock held through another live server (seen within `ttl`)
    /// that conflicts with `check`, or else this server's locks on the file become `held`.
    /// With `freed` (bytes were unlocked or downgraded), the other servers are told, so that
    /// their guests waiting on the file try again ([`changelog::Announced::locks`]).
    #[allow(clippy::too_many_arguments)]
    pub fn publish_locks(
        &self,
        server: &str,
        ttl: std::time::Duration,
        vol: VolId,
        ino: Ino,
        held: &[meta::LockRow],
        check: Option<&meta::LockRow>,
        freed: bool,
    ) -> FsResult<Option<meta::LockRow>> {
        self.tx(|t| {
            let alive = t.store_time()?.minus(ttl);
            if let Some(l) = check {
                if let Some(c) = t.lock_conflict(server, alive, vol, ino, l)? {
                    return Ok(Some(c));
                }
            }
            t.put_server_locks(server, vol, ino, held)?;
            if freed {
                t.announce(&changelog::locks_freed(server, vol, ino))?;
            }
            Ok(None)
        })
    }

    /// The first lock held through another live server that conflicts with `l` (F_GETLK).
    pub fn remote_lock(
        &self,
        server: &str,
        ttl: std::time::Duration,
        vol: VolId,
        ino: Ino,
        l: &meta::LockRow,
    ) -> FsResult<Option<meta::LockRow>> {
        self.tx(|t| {
            let alive = t.store_time()?.minus(ttl);
            t.lock_conflict(server, alive, vol, ino, l)
        })
    }

    /// The block cache's counters, with a block store.
    pub fn block_cache_stats(&self) -> Option<blocks::CacheStats> {
        match &self.data {
            Data::Bytes(_) => None,
            Data::Blocks(b) => Some(b.cache_stats()),
        }
    }

    /// Whether file data lives as shared blocks (clone, gc and fsck of blocks need them).
    pub fn has_blocks(&self) -> bool {
        matches!(self.data, Data::Blocks(_))
    }

    // ----- the data path, for either store ------------------------------------------------------

    /// Before a write's transaction: block stores write the data as new blocks here.
    fn stage(&self, data: &[u8]) -> FsResult<Vec<blocks::Staged>> {
        match &self.data {
            Data::Bytes(_) => Ok(Vec::new()),
            Data::Blocks(b) => b.stage(data),
        }
    }

    /// Inside a write's transaction: the byte store writes (data first, so that a failure rolls
    /// the metadata back); a block store records the staged blocks as slices.
    fn put_data(&self, t: &mut dyn MetaTxn, vol: VolId, ino: Ino, offset: u64, data: &[u8], staged: &[blocks::Staged]) -> FsResult<()> {
        match &self.data {
            Data::Bytes(b) => b.write(vol, ino, offset, data),
            Data::Blocks(_) => {
                for s in blocks::slices_of(offset, staged) {
                    t.insert_slice(vol, ino, &s)?;
                }
                Ok(())
            }
        }
    }

    fn truncate_data(&self, t: &mut dyn MetaTxn, vol: VolId, ino: Ino, size: u64) -> FsResult<()> {
        match &self.data {
            Data::Bytes(b) => b.truncate(vol, ino, size),
            Data::Blocks(_) => t.truncate_slices(vol, ino, size),
        }
    }

    fn zero_data(&self, t: &mut dyn MetaTxn, vol: VolId, ino: Ino, offset: u64, len: u64) -> FsResult<()> {
        match &self.data {
            Data::Bytes(b) => b.zero(vol, ino, offset, len),
            Data::Blocks(_) => t.insert_slice(vol, ino, &blocks::zeros(offset, len)),
        }
    }

    /// Reads file bytes outside any transaction (a block store finds its slices in one first).
    fn get_data(&self, vol: VolId, ino: Ino, offset: u64, buf: &mut [u8]) -> FsResult<()> {
        match &self.data {
            Data::Bytes(b) => b.read(vol, ino, offset, buf),
            Data::Blocks(b) => self.read_held(vol, ino, offset, buf, |buf| {
                let end = offset + buf.len() as u64;
                let slices = self.tx(|t| t.slices(vol, ino, offset, end))?;
                b.read(&slices, offset, buf)
            }),
        }
    }

    /// Copies `[src_off, src_off+len)` of `src` over `dst` at `dst_off` inside a transaction:
    /// a block store shares the source's blocks (new slices, no data moved).
    #[allow(clippy::too_many_arguments)]
    fn copy_data(
        &self,
        t: &mut dyn MetaTxn,
        vol: VolId,
        src: Ino,
        src_off: u64,
        dst: Ino,
        dst_off: u64,
        data: &[(u64, u64)],
    ) -> FsResult<()> {
        match &self.data {
            Data::Bytes(b) => {
                let longest = data.iter().map(|(s, e)| e - s).max().unwrap_or(0);
                let mut buf = vec![0u8; (1u64 << 20).min(longest) as usize];
                for &(s, e) in data {
                    let mut at = s;
                    while at < e {
                        let k = ((e - at) as usize).min(buf.len());
                        b.read(vol, src, at, &mut buf[..k])?;
                        b.write(vol, dst, dst_off + (at - src_off), &buf[..k])?;
                        at += k as u64;
                    }
                }
                Ok(())
            }
            Data::Blocks(_) => {
                for &(s, e) in data {
                    for sl in t.slices(vol, src, s, e)? {
                        let from = sl.off.max(s);
                        let to = (sl.off + sl.len).min(e);
                        let shifted = SliceRow {
                            id: 0,
                            off: dst_off + (from - src_off),
                            len: to - from,
                            block_off: sl.block_off + (from - sl.off),
                            block: sl.block,
                        };
                        t.insert_slice(vol, dst, &shifted)?;
                    }
                }
                Ok(())
            }
        }
    }

    fn remove_data(&self, vol: VolId, ino: Ino) -> FsResult<()> {
        match &self.data {
            Data::Bytes(b) => b.remove(vol, ino),
            // The slices went with the inode's rows; the blocks are garbage collection's.
            Data::Blocks(_) => {
                self.discard_held(vol, ino);
                Ok(())
            }
        }
    }

    fn sync_data(&self, vol: VolId, ino: Ino) -> FsResult<()> {
        match &self.data {
            Data::Bytes(b) => b.sync(vol, ino),
            // A block is durable before any slice refers to it.
            Data::Blocks(_) => Ok(()),
        }
    }

    /// Runs `f` in one metadata transaction. Nothing done here reaches the change log: files
    /// change through the engine's operations, which log what they do.
    fn tx<T>(&self, f: impl FnMut(&mut dyn MetaTxn) -> FsResult<T>) -> FsResult<T> {
        transact(&*self.meta, f)
    }

    /// Runs `f` (one guest request) so that the first mutation it makes records its result under
    /// `(session, seq)` in the same transaction: if the server dies before the reply reaches the
    /// guest, the guest's resent request finds the record ([`Engine::replayed`]) instead of
    /// applying the change twice.
    /// Runs `f` with `o` told, inside each transaction, the attributes after of every inode a
    /// mutation in `f` changes (a directory whose entries changed, a renamed or linked inode, a
    /// written file) or whose atime a read or listing in `f` moves. What `o` does there is ordered before any later change to those inodes:
    /// a mount session pushes them to its guest, which answers the kernel's next getattr with
    /// them instead of asking again.
    pub fn observed<T>(&self, o: Arc<dyn Observer>, f: impl FnOnce() -> T) -> T {
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                OBSERVER.with(|c| c.borrow_mut().take());
            }
        }
        OBSERVER.with(|c| *c.borrow_mut() = Some(o));
        let _reset = Reset;
        f()
    }

    pub fn recording<T>(&self, session: u64, seq: u64, f: impl FnOnce() -> T) -> T {
        REPLAY_TAG.with(|c| c.set(Some((session, seq))));
        let _guard = TagGuard;
        f()
    }

    /// The recorded result of request `seq` of `session`, if it was applied.
    pub fn replayed(&self, session: u64, seq: u64) -> FsResult<Option<(u64, u64)>> {
        self.tx(|t| t.get_replay(session, seq))
    }

    /// The session's highest recorded request (0 if none).
    pub fn last_replayed_seq(&self, session: u64) -> FsResult<u64> {
        self.tx(|t| t.last_replay_seq(session))
    }

    /// Forgets a session's records (it ended, or its successor is past them).
    pub fn forget_replays(&self, session: u64) -> FsResult<()> {
        self.tx(|t| t.prune_replays(session, u64::MAX))
    }

    /// Forgets records older than `age` (sessions that never came back); returns how many.
    pub fn expire_replays(&self, age: std::time::Duration) -> FsResult<u64> {
        let now = Timespec::now();
        let before = now.minus(age);
        self.tx(|t| t.expire_replays(before))
    }

    /// Frees every orphan (an inode without a name) that nobody holds open; returns how many.
    /// Orphans outlive a server restart so that guests can reopen them when they reconnect;
    /// the server calls this once that grace period is over.
    /// With a shared store, orphans other servers hold open stay, and this server's handles
    /// from before its restart that no guest took again are dropped first.
    pub fn reclaim_orphans(&self) -> FsResult<usize> {
        if self.shared() {
            self.tx(|t| {
                for (vol, ino) in t.opens_of(self.holder())? {
                    if !self.open.lock().unwrap().counts.contains_key(&(vol, ino)) {
                        t.drop_open(self.holder(), vol, ino)?;
                    }
                }
                Ok(())
            })?;
        }
        self.purge_unheld_orphans()
    }

    /// Frees the orphans that nobody holds open (here, or with a shared store anywhere).
    fn purge_unheld_orphans(&self) -> FsResult<usize> {
        let orphans = self.tx(|t| t.orphans())?;
        let mut freed = 0;
        for (vol, ino, _) in orphans {
            if !self.open.lock().unwrap().counts.contains_key(&(vol, ino)) && self.purge(vol, ino)? {
                freed += 1;
            }
        }
        Ok(freed)
    }

    // ----- volumes -------------------------------------------------------------------------

    /// A writable copy of volume `src` named `name`, with cap `cap` (the source's when `None`):
    /// every name, attribute, xattr and byte as they are at one instant (one transaction), made
    /// in time proportional to the metadata. The copies share blocks; each has its own cap and
    /// usage (both start as the source's), and they diverge from there. Needs a block store.
    pub fn clone_volume(&self, src: &str, name: &str, cap: Option<u64>) -> FsResult<VolumeInfo> {
        check_object_name("volume", name)?;
        if !self.has_blocks() {
            return Err(FsError::new(
                libc::EOPNOTSUPP,
                "volume clone needs file data in a block store (volumefs server --blocks URL): the embedded store keeps a \
                 file per inode, which a clone would have to copy",
            ));
        }
        // The copy has what guests wrote through this server up to now (other servers' held
        // writes are theirs to send; they do within a second).
        if let Ok(s) = self.volume(src) {
            self.settle_volume(s.id)?;
        }
        let now = Timespec::now();
        let id = self.tx(|t| {
            let s = t.volume_by_name(src)?.ok_or_else(|| FsError::new(libc::ENOENT, format!("volume `{src}` not found")))?;
            if t.volume_by_name(name)?.is_some() {
                return Err(FsError::new(libc::EEXIST, format!("volume `{name}` already exists")));
            }
            let cap = cap.unwrap_or(s.cap);
            if cap < s.used {
                return Err(FsError::new(
                    libc::EDQUOT,
                    format!("a cap of {cap} bytes is below the {} bytes volume `{src}` uses: the copy would not fit", s.used),
                ));
            }
            t.clone_volume(s.id, name, cap, now)
        })?;
        self.volume_by_id(id)
    }

    /// Deletes blocks that no slice of any volume refers to and that are older than `grace`
    /// (younger ones may belong to a write whose transaction has not committed). The embedded
    /// store has nothing to collect: a file's data goes with its inode.
    pub fn gc(&self, grace: std::time::Duration) -> FsResult<blocks::GcReport> {
        let Data::Blocks(b) = &self.data else { return Ok(blocks::GcReport::default()) };
        // A block must be unreferenced both before and after the listing: a copy that shares a
        // block runs in one short transaction, which one of the two snapshots sees.
        let before: std::collections::HashSet<String> = self.tx(|t| t.referenced_blocks())?.into_iter().collect();
        b.gc(&before, grace, &|| Ok(self.tx(|t| t.referenced_blocks())?.into_iter().collect()))
    }

    /// Checks volume `name`: every name points at an inode of the right kind inside a
    /// directory; every inode has as many names as its link count (directories one), or none
    /// and is an orphan; the volume's inode count; and, with a block store, that every block its
    /// slices refer to is in the store.
    pub fn fsck(&self, name: &str) -> FsResult<FsckReport> {
        let (v, inodes, names, refs) = self.tx(|t| {
            let v = t.volume_by_name(name)?.ok_or_else(|| FsError::new(libc::ENOENT, format!("volume `{name}` not found")))?;
            Ok((v.clone(), t.all_inodes(v.id)?, t.all_dentries(v.id)?, t.volume_blocks(v.id)?))
        })?;
        let mut r = FsckReport { volume: name.to_string(), inodes: inodes.len() as u64, names: names.len() as u64, ..Default::default() };
        let by_ino: HashMap<Ino, &Attr> = inodes.iter().map(|a| (a.ino, a)).collect();
        let mut count: HashMap<Ino, u32> = HashMap::new();
        for (parent, DentryRow { name: n, ino, kind, .. }) in &names {
            let shown = lossy(n);
            match by_ino.get(parent) {
                Some(p) if p.kind == Kind::Dir => {}
                Some(_) => r.problems.push(format!("name {shown:?} is in inode {parent}, which is not a directory")),
                None => r.problems.push(format!("name {shown:?} is in directory {parent}, which does not exist")),
            }
            match by_ino.get(ino) {
                Some(a) if a.kind == *kind => {}
                Some(a) => r.problems.push(format!("name {shown:?} says inode {ino} is a {kind:?}; it is a {:?}", a.kind)),
                None => r.problems.push(format!("name {shown:?} points at inode {ino}, which does not exist")),
            }
            *count.entry(*ino).or_default() += 1;
        }
        for a in &inodes {
            let n = count.get(&a.ino).copied().unwrap_or(0);
            if a.ino == ROOT_INO {
                if a.kind != Kind::Dir {
                    r.problems.push("the root is not a directory".into());
                }
                continue;
            }
            if n == 0 && a.nlink == 0 {
                r.orphans += 1;
            } else if a.kind == Kind::Dir && n != 1 {
                r.problems.push(format!("directory inode {} has {n} names (directories have one)", a.ino));
            } else if a.kind != Kind::Dir && n != a.nlink {
                r.problems.push(format!("inode {} has {n} names but a link count of {}", a.ino, a.nlink));
            }
        }
        if !by_ino.contains_key(&ROOT_INO) {
            r.problems.push("the root directory is missing".into());
        }
        if v.inodes != inodes.len() as u64 {
            r.problems.push(format!("the volume counts {} inodes; it has {}", v.inodes, inodes.len()));
        }
        if let Data::Blocks(b) = &self.data {
            r.blocks = refs.len() as u64;
            for (key, ino) in &refs {
                if !b.exists(key)? {
                    r.problems.push(format!("block {key} (of inode {ino}) is missing from {}", b.url));
                }
            }
        }
        Ok(r)
    }

    pub fn create_volume(&self, name: &str, cap: u64) -> FsResult<VolumeInfo> {
        check_object_name("volume", name)?;
        if cap == 0 {
            return Err(FsError::new(libc::EINVAL, "a volume cap must be at least 1 byte"));
        }
        let now = Timespec::now();
        self.tx(|t| {
            if t.volume_by_name(name)?.is_some() {
                return Err(FsError::new(libc::EEXIST, format!("volume `{name}` already exists")));
            }
            let id = t.insert_volume(name, cap, now)?;
            t.put_inode(
                id,
                &Attr {
                    ino: ROOT_INO,
                    kind: Kind::Dir,
                    perm: 0o755,
                    nlink: 2,
                    uid: 0,
                    gid: 0,
                    size: 0,
                    alloc: 0,
                    xattrs: false,
                    atime: now,
                    mtime: now,
                    ctime: now,
                    rdev: 0,
                    acl: 0,
                },
            )?;
            t.volume_by_id(id)?.ok_or_else(|| enoent(format!("volume `{name}`")))
        })
    }

    pub fn list_volumes(&self) -> FsResult<Vec<VolumeInfo>> {
        self.tx(|t| t.list_volumes())
    }

    pub fn volume(&self, name: &str) -> FsResult<VolumeInfo> {
        self.tx(|t| t.volume_by_name(name))?.ok_or_else(|| FsError::new(libc::ENOENT, format!("volume `{name}` not found")))
    }

    pub fn volume_by_id(&self, id: VolId) -> FsResult<VolumeInfo> {
        self.tx(|t| t.volume_by_id(id))?.ok_or_else(|| FsError::new(libc::ENOENT, format!("volume #{id} not found")))
    }

    /// Deletes a volume and all its data, its change log included. Attachments are the caller's
    /// business.
    pub fn delete_volume(&self, id: VolId) -> FsResult<()> {
        self.tx(|t| t.delete_volume(id))?;
        self.forget_volume_log(id);
        let mut open = self.open.lock().unwrap();
        open.counts.retain(|(v, _), _| *v != id);
        open.unlinked.retain(|(v, _)| *v != id);
        drop(open);
        match &self.data {
            Data::Bytes(b) => b.remove_volume(id),
            Data::Blocks(_) => Ok(()),
        }
    }

    // ----- lookups and attributes -----------------------------------------------------------

    fn inode(t: &mut dyn MetaTxn, vol: VolId, ino: Ino) -> FsResult<Attr> {
        t.get_inode(vol, ino)?.ok_or_else(|| stale(ino))
    }

    /// `a`'s access ACL, read only when `a` is marked as having one: an inode without an ACL
    /// costs no query.
    fn access_acl(t: &mut dyn MetaTxn, vol: VolId, a: &Attr) -> FsResult<Option<Acl>> {
        if a.acl & ACL_ACCESS == 0 {
            return Ok(None);
        }
        match t.get_xattr(vol, a.ino, acl::ACCESS)? {
            Some(v) => Acl::parse(&v),
            None => Ok(None),
        }
    }

    /// The permission check, ACL included (root needs none: it passes the same way with one).
    fn access(t: &mut dyn MetaTxn, vol: VolId, a: &Attr, c: &Caller, want: u32) -> FsResult<()> {
        let acl = if c.is_root() { None } else { Self::access_acl(t, vol, a)? };
        check_access(a, acl.as_ref(), c, want)
    }

    /// [`Engine::access`] outside a transaction: one is opened only for an inode with an ACL.
    fn check(&self, vol: VolId, a: &Attr, c: &Caller, want: u32) -> FsResult<()> {
        if a.acl & ACL_ACCESS == 0 || c.is_root() {
            return check_access(a, None, c, want);
        }
        self.tx(|t| Self::access(t, vol, a, c, want))
    }

    fn dir(t: &mut dyn MetaTxn, vol: VolId, ino: Ino) -> FsResult<Attr> {
        let a = Self::inode(t, vol, ino)?;
        if a.kind != Kind::Dir {
            return Err(FsError::new(libc::ENOTDIR, format!("inode {ino} is not a directory")));
        }
        if a.nlink == 0 {
            return Err(FsError::new(libc::ENOENT, format!("directory {ino} has been removed")));
        }
        Ok(a)
    }

    pub fn getattr(&self, vol: VolId, ino: Ino) -> FsResult<Attr> {
        self.tx(|t| Self::inode(t, vol, ino)).map(|a| self.with_held(vol, a))
    }

    pub fn lookup(&self, vol: VolId, parent: Ino, name: &[u8], c: &Caller) -> FsResult<Attr> {
        check_name(name)?;
        self.tx(|t| {
            let p = Self::dir(t, vol, parent)?;
            Self::access(t, vol, &p, c, X)?;
            let (ino, _) = t.get_dentry(vol, parent, name)?.ok_or_else(|| enoent(format!("`{}`", lossy(name))))?;
            Self::inode(t, vol, ino)
        })
        .map(|a| self.with_held(vol, a))
    }

    /// The directory containing directory `ino` (the root is its own parent).
    pub fn dir_parent(&self, vol: VolId, ino: Ino) -> FsResult<Ino> {
        if ino == ROOT_INO {
            return Ok(ROOT_INO);
        }
        self.tx(|t| t.dir_parent(vol, ino))?.ok_or_else(|| stale(ino))
    }

    /// Whether inode `ino` exists and has a name inside the tree rooted at directory `root`
    /// (or is `root`). This is the scope rule of subpath attachments.
    pub fn within(&self, vol: VolId, ino: Ino, root: Ino) -> FsResult<bool> {
        self.tx(|t| {
            if t.get_inode(vol, ino)?.is_none() {
                return Ok(false);
            }
            if ino == root || root == ROOT_INO {
                return Ok(true);
            }
            for parent in t.parents(vol, ino)? {
                if Self::is_within(t, vol, parent, root)? {
                    return Ok(true);
                }
            }
            Ok(false)
        })
    }

    /// The volume's scope epoch. A result of [`Engine::within`] obtained after reading epoch
    /// `e` stays true while the epoch is still `e`: the epoch moves before and after every
    /// operation that can move a name out of a subtree, so no such change can slip between.
    ///
    /// With a shared store another server's rename moves no epoch here, so every call returns a
    /// new epoch and every scope is checked at each use.
    pub fn scope_epoch(&self, vol: VolId) -> u64 {
        if let Some(ticker) = &self.shared {
            return ticker.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        }
        self.scope_epochs.lock().unwrap().get(&vol).copied().unwrap_or(0)
    }

    /// Runs a namespace change that may move names out of subtrees, between two epoch moves.
    fn moving<T>(&self, vol: VolId, f: impl FnOnce() -> FsResult<T>) -> FsResult<T> {
        let bump = || *self.scope_epochs.lock().unwrap().entry(vol).or_insert(0) += 1;
        bump();
        let r = f();
        bump();
        r
    }

    /// Resolves a `/`-separated path from the volume root (no symlinks followed).
    pub fn resolve(&self, vol: VolId, path: &str, c: &Caller) -> FsResult<Attr> {
        let mut cur = self.getattr(vol, ROOT_INO)?;
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            if part == ".." {
                return Err(FsError::new(libc::EINVAL, format!("path {path:?} may not contain `..`")));
            }
            cur = self.lookup(vol, cur.ino, part.as_bytes(), c).map_err(|e| {
                if e.errno == libc::ENOENT {
                    FsError::new(libc::ENOENT, format!("path {path:?} does not exist"))
                } else {
                    e
                }
            })?;
        }
        Ok(cur)
    }

    pub fn setattr(&self, vol: VolId, ino: Ino, set: &SetAttr, c: &Caller) -> FsResult<Attr> {
        // Held-back bytes go first, so that a truncate cuts them, an extension after it reads
        // zeros, and the attributes answered are the committed ones.
        let now = Timespec::now();
        self.mutate_after_held(vol, ino, |t, log| {
            let mut a = Self::inode(t, vol, ino)?;
            let old_size = a.size;
            let owner = c.is_root() || c.uid == a.uid;
            if let Some(mode) = set.mode {
                if !owner {
                    return Err(FsError::new(libc::EPERM, format!("only the owner (uid {}) or root may chmod inode {ino}", a.uid)));
                }
                let mut perm = mode & 0o7777;
                if !c.is_root() && !c.in_group(a.gid) {
                    perm &= !libc::S_ISGID;
                }
                a.perm = perm;
                if let Some(mut acl) = Self::access_acl(t, vol, &a)? {
                    // posix_acl_chmod: the ACL's owner, mask (or group) and other follow the mode.
                    acl.chmod(perm);
                    t.set_xattr(vol, ino, acl::ACCESS, &acl.encode())?;
                }
            }
            if set.uid.is_some() || set.gid.is_some() {
                let new_uid = set.uid.unwrap_or(a.uid);
                let new_gid = set.gid.unwrap_or(a.gid);
                if !c.is_root() {
                    if new_uid != a.uid {
                        return Err(FsError::new(libc::EPERM, "only root may change a file's owner"));
                    }
                    if new_gid != a.gid && !(c.uid == a.uid && c.in_group(new_gid)) {
                        return Err(FsError::new(
                            libc::EPERM,
                            format!("uid {} may not change the group of inode {ino} to {new_gid}", c.uid),
                        ));
                    }
                }
                if (new_uid != a.uid || new_gid != a.gid) && a.kind != Kind::Dir {
                    drop_setid(&mut a);
                }
                a.uid = new_uid;
                a.gid = new_gid;
            }
            for (time, which) in [(set.atime, 0), (set.mtime, 1)] {
                let Some(time) = time else { continue };
                let value = match time {
                    SetTime::Now => {
                        if !owner && !permits(&a, Self::access_acl(t, vol, &a)?.as_ref(), c, W) {
                            return Err(FsError::new(libc::EACCES, format!("uid {} may not touch inode {ino}", c.uid)));
                        }
                        now
                    }
                    SetTime::At(ts) => {
                        if !owner {
                            return Err(FsError::new(
                                libc::EPERM,
                                format!("only the owner (uid {}) or root may set times of inode {ino}", a.uid),
                            ));
                        }
                        ts
                    }
                };
                if which == 0 {
                    a.atime = value;
                } else {
                    a.mtime = value;
                }
            }
            if let Some(size) = set.size {
                regular(&a)?;
                if size > MAX_FILE_SIZE {
                    return Err(FsError::new(libc::EFBIG, format!("{size} bytes is larger than the largest file ({MAX_FILE_SIZE})")));
                }
                if size < old_size {
                    // Growing makes a hole, which costs nothing; cutting frees what lay past the
                    // new end (space preallocated beyond it too, as on ext4).
                    let freed = Self::deallocate(t, vol, &mut a, size, u64::MAX)?;
                    Self::charge(t, vol, freed, 0)?;
                }
                if size != old_size {
                    a.size = size;
                    if set.mtime.is_none() {
                        a.mtime = now;
                    }
                }
                if !c.is_root() {
                    drop_setid(&mut a);
                }
            }
            a.ctime = now;
            t.put_inode(vol, &a)?;
            if *set != SetAttr::default() {
                log.push(Event::Modify { node: a.kind, ino });
            }
            if let Some(size) = set.size {
                // Inside the transaction: if the data store fails, the size change is undone.
                if size > old_size {
                    // Cut first so that bytes past the old size (left by a crash) read as zeros.
                    self.truncate_data(t, vol, ino, old_size)?;
                }
                self.truncate_data(t, vol, ino, size)?;
            }
            Ok(a)
        })
    }

    /// Moves the volume's usage from `old` to `new` bytes, refusing to pass the cap.
    fn charge(t: &mut dyn MetaTxn, vol: VolId, old: u64, new: u64) -> FsResult<()> {
        if new > old {
            let grow = new - old;
            room(&t.volume_by_id(vol)?.ok_or_else(|| stale(ROOT_INO))?, grow)?;
            t.add_used(vol, grow as i64)
        } else if new < old {
            t.add_used(vol, -((old - new) as i64))
        } else {
            Ok(())
        }
    }

    /// Records `[start, end)` of file `a` as stored (merged with the ranges it touches); returns
    /// the bytes newly stored, which the caller charges.
    fn allocate(t: &mut dyn MetaTxn, vol: VolId, a: &mut Attr, start: u64, end: u64) -> FsResult<u64> {
        if start >= end {
            return Ok(0);
        }
        let old = t.extents(vol, a.ino, start, end)?;
        if let [(s, e)] = old[..] {
            if s <= start && e >= end {
                return Ok(0);
            }
        }
        let (merged, added) = merged_extent(&old, start, end);
        t.replace_extents(vol, a.ino, &old, &[merged])?;
        a.alloc += added;
        Ok(added)
    }

    /// Forgets `[start, end)` of file `a` (it becomes a hole); returns the bytes freed.
    fn deallocate(t: &mut dyn MetaTxn, vol: VolId, a: &mut Attr, start: u64, end: u64) -> FsResult<u64> {
        if start >= end {
            return Ok(0);
        }
        let old: Vec<(u64, u64)> = t.extents(vol, a.ino, start, end)?.into_iter().filter(|(s, e)| *e > start && *s < end).collect();
        if old.is_empty() {
            return Ok(0);
        }
        let mut keep = Vec::new();
        let mut freed = 0;
        for &(s, e) in &old {
            if s < start {
                keep.push((s, start));
            }
            if e > end {
                keep.push((end, e));
            }
            freed += e.min(end) - s.max(start);
        }
        t.replace_extents(vol, a.ino, &old, &keep)?;
        a.alloc -= freed;
        Ok(freed)
    }

    pub fn readlink(&self, vol: VolId, ino: Ino) -> FsResult<Vec<u8>> {
        self.tx(|t| {
            let a = Self::inode(t, vol, ino)?;
            if a.kind != Kind::Symlink {
                return Err(FsError::new(libc::EINVAL, format!("inode {ino} is not a symlink")));
            }
            t.get_target(vol, ino)
        })
    }

    // ----- creating names -------------------------------------------------------------------

    /// Creates a new inode named `name` in `parent`. The umask applies to `perm` unless `parent`
    /// has a default ACL, which the new inode inherits instead (`posix_acl_create`). With
    /// `open`, the caller takes a handle on it (published with a shared store).
    #[allow(clippy::too_many_arguments)]
    fn make(
        &self,
        vol: VolId,
        parent: Ino,
        name: &[u8],
        kind: Kind,
        perm: u32,
        umask: u32,
        rdev: u32,
        target: Option<&[u8]>,
        open: bool,
        c: &Caller,
    ) -> FsResult<Attr> {
        check_name(name)?;
        let now = Timespec::now();
        self.mutate(vol, |t, log| {
            let mut p = Self::dir(t, vol, parent)?;
            Self::access(t, vol, &p, c, W | X)?;
            if t.get_dentry(vol, parent, name)?.is_some() {
                return Err(FsError::new(libc::EEXIST, format!("`{}` already exists", lossy(name))));
            }
            let setgid_dir = p.perm & libc::S_ISGID != 0;
            let gid = if setgid_dir { p.gid } else { c.gid };
            let mut perm = perm & 0o7777;
            let (acls, acl_mark) = Self::inherit_acls(t, vol, &p, kind, &mut perm, umask)?;
            if kind == Kind::Dir && setgid_dir {
                perm |= libc::S_ISGID;
            } else if kind != Kind::Dir && perm & libc::S_ISGID != 0 && !c.is_root() && !c.in_group(gid) {
                perm &= !libc::S_ISGID;
            }
            let v = t.volume_by_id(vol)?.ok_or_else(|| stale(ROOT_INO))?;
            if v.inodes >= max_inodes(v.cap) {
                return Err(FsError::new(
                    libc::ENOSPC,
                    format!("volume `{}` holds its most inodes ({}: one per {BYTES_PER_INODE} bytes of cap)", v.name, v.inodes),
                ));
            }
            if let Some(target) = target {
                Self::charge(t, vol, 0, target.len() as u64)?;
            }
            Self::charge(t, vol, 0, acls.iter().map(|(n, v)| (n.len() + v.len()) as u64).sum())?;
            let ino = t.next_ino(vol)?;
            let a = Attr {
                ino,
                kind,
                perm,
                nlink: if kind == Kind::Dir { 2 } else { 1 },
                uid: c.uid,
                gid,
                size: target.map_or(0, |t| t.len() as u64),
                alloc: 0,
                xattrs: !acls.is_empty(),
                atime: now,
                mtime: now,
                ctime: now,
                rdev,
                acl: acl_mark,
            };
            t.put_inode(vol, &a)?;
            if open && self.shared() {
                // Published with the name: no other server can see the file unheld.
                t.put_open(self.holder(), vol, ino)?;
            }
            if let Some(target) = target {
                t.set_target(vol, ino, target)?;
            }
            for (n, v) in &acls {
                t.set_xattr(vol, ino, n, v)?;
            }
            t.insert_dentry(vol, parent, name, ino, kind)?;
            if kind == Kind::Dir {
                p.nlink += 1;
            }
            p.mtime = now;
            p.ctime = now;
            t.put_inode(vol, &p)?;
            log.push(Event::name(ChangeKind::Create, kind, ino, parent, name));
            Ok(a)
        })
    }

    /// What a new inode of `kind` in directory `p` inherits from `p`'s default ACL: its ACL
    /// xattrs to store and its [`Attr::acl`] mark; `perm` is masked by the ACL, or by `umask`
    /// when `p` has none (symlinks take neither).
    fn inherit_acls(t: &mut dyn MetaTxn, vol: VolId, p: &Attr, kind: Kind, perm: &mut u32, umask: u32) -> FsResult<(Vec<AclXattr>, u8)> {
        let default = match p.acl & ACL_DEFAULT != 0 && kind != Kind::Symlink {
            true => t.get_xattr(vol, p.ino, acl::DEFAULT)?.map(|v| Acl::parse(&v)).transpose()?.flatten(),
            false => None,
        };
        let Some(default) = default else {
            *perm &= !umask;
            return Ok((Vec::new(), 0));
        };
        let (mut acls, mut mark) = (Vec::new(), 0);
        let mut access = default.clone();
        let (masked, keep) = access.create_masq(*perm);
        *perm = masked;
        if keep {
            acls.push((acl::ACCESS, access.encode()));
            mark |= ACL_ACCESS;
        }
        if kind == Kind::Dir {
            acls.push((acl::DEFAULT, default.encode()));
            mark |= ACL_DEFAULT;
        }
        Ok((acls, mark))
    }

    pub fn mknod(&self, vol: VolId, parent: Ino, name: &[u8], mode: u32, umask: u32, rdev: u32, c: &Caller) -> FsResult<Attr> {
        let kind = Kind::from_mode(mode).ok_or_else(|| FsError::new(libc::EINVAL, format!("invalid file type in mode {mode:o}")))?;
        match kind {
            Kind::Dir | Kind::Symlink => return Err(FsError::new(libc::EINVAL, "mknod cannot make directories or symlinks")),
            Kind::CharDev | Kind::BlockDev if !c.is_root() => return Err(FsError::new(libc::EPERM, "only root may make device nodes")),
            _ => {}
        }
        self.make(vol, parent, name, kind, mode, umask, rdev, None, false, c)
    }

    pub fn mkdir(&self, vol: VolId, parent: Ino, name: &[u8], mode: u32, umask: u32, c: &Caller) -> FsResult<Attr> {
        self.make(vol, parent, name, Kind::Dir, mode, umask, 0, None, false, c)
    }

    pub fn symlink(&self, vol: VolId, parent: Ino, name: &[u8], target: &[u8], c: &Caller) -> FsResult<Attr> {
        if target.is_empty() || target.len() > SYMLINK_MAX || target.contains(&0) {
            return Err(FsError::new(libc::ENAMETOOLONG, format!("symlink target must be 1-{SYMLINK_MAX} bytes without NUL")));
        }
        self.make(vol, parent, name, Kind::Symlink, 0o777, 0, 0, Some(target), false, c)
    }

    /// Creates and opens a regular file (the caller must `release` it).
    pub fn create(&self, vol: VolId, parent: Ino, name: &[u8], mode: u32, umask: u32, c: &Caller) -> FsResult<Attr> {
        let a = self.make(vol, parent, name, Kind::File, mode, umask, 0, None, true, c)?;
        // Nobody else here can hold the new inode yet (its row went in with the name).
        *self.open.lock().unwrap().counts.entry((vol, a.ino)).or_insert(0) += 1;
        Ok(a)
    }

    pub fn link(&self, vol: VolId, ino: Ino, new_parent: Ino, new_name: &[u8], c: &Caller) -> FsResult<Attr> {
        check_name(new_name)?;
        let now = Timespec::now();
        self.mutate_after_held(vol, ino, |t, log| {
            let mut a = Self::inode(t, vol, ino)?;
            if a.kind == Kind::Dir {
                return Err(FsError::new(libc::EPERM, "hard links to directories are not allowed"));
            }
            if a.nlink == 0 {
                return Err(FsError::new(libc::ENOENT, format!("inode {ino} has been removed")));
            }
            if a.nlink >= MAX_LINKS {
                return Err(FsError::new(libc::EMLINK, format!("inode {ino} has {MAX_LINKS} links already")));
            }
            let mut p = Self::dir(t, vol, new_parent)?;
            Self::access(t, vol, &p, c, W | X)?;
            if t.get_dentry(vol, new_parent, new_name)?.is_some() {
                return Err(FsError::new(libc::EEXIST, format!("`{}` already exists", lossy(new_name))));
            }
            t.insert_dentry(vol, new_parent, new_name, ino, a.kind)?;
            a.nlink += 1;
            a.ctime = now;
            t.put_inode(vol, &a)?;
            p.mtime = now;
            p.ctime = now;
            t.put_inode(vol, &p)?;
            log.push(Event::name(ChangeKind::Create, a.kind, ino, new_parent, new_name));
            Ok(a)
        })
    }

    // ----- removing names -------------------------------------------------------------------

    /// Drops one link of `child` (its dentry is already gone). Returns true if the inode must be
    /// purged now (no links and no open handles).
    fn drop_link(&self, t: &mut dyn MetaTxn, vol: VolId, child: &mut Attr, now: Timespec) -> FsResult<bool> {
        child.nlink = if child.kind == Kind::Dir { 0 } else { child.nlink.saturating_sub(1) };
        child.ctime = now;
        t.put_inode(vol, child)?;
        if child.nlink != 0 {
            return Ok(false);
        }
        let mut open = self.open.lock().unwrap();
        if open.counts.contains_key(&(vol, child.ino)) {
            // The last release frees it.
            open.unlinked.insert((vol, child.ino));
            return Ok(false);
        }
        if !self.shared() {
            return Ok(true);
        }
        // With a shared store this server's row may linger (closed since its last heartbeat),
        // and another server may hold the inode: then the last release anywhere frees it.
        drop(open);
        t.drop_open(self.holder(), vol, child.ino)?;
        Ok(!t.held_open(vol, child.ino)?)
    }

    /// Deletes an inode that has neither names nor handles: its row, xattrs, data and usage.
    /// Returns whether it went.
    fn purge(&self, vol: VolId, ino: Ino) -> FsResult<bool> {
        let gone = self.tx(|t| self.purge_in(t, vol, ino))?;
        if gone {
            self.remove_data(vol, ino)?;
        }
        Ok(gone)
    }

    /// [`Engine::purge`]'s metadata half, inside `t`: nothing if the inode has a name again or
    /// (with a shared store) a server holds it open. The caller removes the data after commit.
    fn purge_in(&self, t: &mut dyn MetaTxn, vol: VolId, ino: Ino) -> FsResult<bool> {
        let Some(a) = t.get_inode(vol, ino)? else { return Ok(false) };
        if a.nlink != 0 || (self.shared() && t.held_open(vol, ino)?) {
            return Ok(false);
        }
        let xattrs: usize = t.list_xattrs(vol, ino)?.iter().map(|(n, l)| n.len() + l).sum();
        t.add_used(vol, -((a.stored() + xattrs as u64) as i64))?;
        t.delete_inode(vol, ino)?;
        Ok(true)
    }

    pub fn unlink(&self, vol: VolId, parent: Ino, name: &[u8], c: &Caller) -> FsResult<()> {
        // A hard-linked file may lose its only name inside a subtree.
        self.moving(vol, || self.remove(vol, parent, name, false, c))
    }

    pub fn rmdir(&self, vol: VolId, parent: Ino, name: &[u8], c: &Caller) -> FsResult<()> {
        self.remove(vol, parent, name, true, c)
    }

    fn remove(&self, vol: VolId, parent: Ino, name: &[u8], dir: bool, c: &Caller) -> FsResult<()> {
        check_name(name)?;
        let now = Timespec::now();
        let purge = self.mutate(vol, |t, log| {
            let mut p = Self::dir(t, vol, parent)?;
            Self::access(t, vol, &p, c, W | X)?;
            let (ino, _) = t.get_dentry(vol, parent, name)?.ok_or_else(|| enoent(format!("`{}`", lossy(name))))?;
            let mut child = Self::inode(t, vol, ino)?;
            check_sticky(&p, &child, c)?;
            if dir {
                if child.kind != Kind::Dir {
                    return Err(FsError::new(libc::ENOTDIR, format!("`{}` is not a directory", lossy(name))));
                }
                if t.has_dentries(vol, ino)? {
                    return Err(FsError::new(libc::ENOTEMPTY, format!("directory `{}` is not empty", lossy(name))));
                }
                p.nlink -= 1;
            } else if child.kind == Kind::Dir {
                return Err(FsError::new(libc::EISDIR, format!("`{}` is a directory", lossy(name))));
            }
            t.delete_dentry(vol, parent, name)?;
            p.mtime = now;
            p.ctime = now;
            t.put_inode(vol, &p)?;
            log.push(Event::name(ChangeKind::Delete, child.kind, ino, parent, name));
            Ok(self.drop_link(t, vol, &mut child, now)?.then_some(ino))
        })?;
        if let Some(ino) = purge {
            self.purge(vol, ino)?;
        }
        Ok(())
    }

    /// Whether directory `dir` is `ancestor` or lies below it.
    fn is_within(t: &mut dyn MetaTxn, vol: VolId, mut dir: Ino, ancestor: Ino) -> FsResult<bool> {
        for _ in 0..4096 {
            if dir == ancestor {
                return Ok(true);
            }
            if dir == ROOT_INO {
                return Ok(false);
            }
            match t.dir_parent(vol, dir)? {
                Some(p) => dir = p,
                None => return Ok(false),
            }
        }
        Err(FsError::new(libc::ELOOP, "directory tree too deep"))
    }

    pub fn rename(&self, vol: VolId, parent: Ino, name: &[u8], new_parent: Ino, new_name: &[u8], flags: u32, c: &Caller) -> FsResult<()> {
        self.moving(vol, || self.rename_names(vol, parent, name, new_parent, new_name, flags, c))
    }

    fn rename_names(&self, vol: VolId, parent: Ino, name: &[u8], new_parent: Ino, new_name: &[u8], flags: u32, c: &Caller) -> FsResult<()> {
        check_name(name)?;
        check_name(new_name)?;
        let known = RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT;
        if flags & !known != 0 || flags & RENAME_EXCHANGE != 0 && flags & (RENAME_NOREPLACE | RENAME_WHITEOUT) != 0 {
            return Err(FsError::new(libc::EINVAL, format!("unsupported rename flags {flags:#x}")));
        }
        if flags & RENAME_WHITEOUT != 0 && !c.is_root() {
            // A whiteout is a device node (0:0): Linux asks for CAP_MKNOD.
            return Err(FsError::new(libc::EPERM, "only root may leave a whiteout"));
        }
        let now = Timespec::now();
        let purge = self.mutate(vol, |t, log| {
            let mut sp = Self::dir(t, vol, parent)?;
            Self::access(t, vol, &sp, c, W | X)?;
            let mut dp = if new_parent == parent { sp.clone() } else { Self::dir(t, vol, new_parent)? };
            Self::access(t, vol, &dp, c, W | X)?;
            let (src_ino, _) = t.get_dentry(vol, parent, name)?.ok_or_else(|| enoent(format!("`{}`", lossy(name))))?;
            let mut src = Self::inode(t, vol, src_ino)?;
            check_sticky(&sp, &src, c)?;
            let dst = t.get_dentry(vol, new_parent, new_name)?;
            if src.kind == Kind::Dir && new_parent != parent {
                if Self::is_within(t, vol, new_parent, src_ino)? {
                    return Err(FsError::new(libc::EINVAL, "cannot move a directory into itself"));
                }
                // Moving a directory rewrites its `..`.
                Self::access(t, vol, &src, c, W)?;
            }
            if flags & RENAME_EXCHANGE != 0 {
                let (dst_ino, _) = dst.ok_or_else(|| enoent(format!("`{}`", lossy(new_name))))?;
                if dst_ino == src_ino {
                    // Exchanging a name with itself (or with another name of the same inode):
                    // Linux does nothing and succeeds. Found by the reference model.
                    return Ok(None);
                }
                let mut other = Self::inode(t, vol, dst_ino)?;
                check_sticky(&dp, &other, c)?;
                if other.kind == Kind::Dir && new_parent != parent {
                    if Self::is_within(t, vol, parent, dst_ino)? {
                        return Err(FsError::new(libc::EINVAL, "cannot move a directory into itself"));
                    }
                    Self::access(t, vol, &other, c, W)?;
                }
                // Each name keeps its place in its directory's listing.
                t.set_dentry_target(vol, parent, name, dst_ino, other.kind)?;
                t.set_dentry_target(vol, new_parent, new_name, src_ino, src.kind)?;
                if new_parent != parent {
                    let (sd, od) = ((src.kind == Kind::Dir) as u32, (other.kind == Kind::Dir) as u32);
                    sp.nlink = sp.nlink + od - sd;
                    dp.nlink = dp.nlink + sd - od;
                }
                src.ctime = now;
                other.ctime = now;
                t.put_inode(vol, &src)?;
                t.put_inode(vol, &other)?;
                Self::touch_parents(t, vol, &mut sp, &mut dp, now)?;
                let (name, new_name) = (name.to_vec(), new_name.to_vec());
                log.push(Event::Move {
                    node: src.kind,
                    ino: src_ino,
                    dir: parent,
                    name: name.clone(),
                    new_dir: new_parent,
                    new_name: new_name.clone(),
                });
                log.push(Event::Move { node: other.kind, ino: dst_ino, dir: new_parent, name: new_name, new_dir: parent, new_name: name });
                return Ok(None);
            }
            let mut purge = None;
            if let Some((dst_ino, _)) = dst {
                // NOREPLACE refuses any existing target, even another name of the same inode
                // (Linux checks it before anything else).
                if flags & RENAME_NOREPLACE != 0 {
                    return Err(FsError::new(libc::EEXIST, format!("`{}` already exists", lossy(new_name))));
                }
                if dst_ino == src_ino {
                    // Two names of one inode: POSIX says do nothing.
                    return Ok(None);
                }
                let mut victim = Self::inode(t, vol, dst_ino)?;
                check_sticky(&dp, &victim, c)?;
                match (src.kind == Kind::Dir, victim.kind == Kind::Dir) {
                    (true, false) => return Err(FsError::new(libc::ENOTDIR, format!("`{}` is not a directory", lossy(new_name)))),
                    (false, true) => return Err(FsError::new(libc::EISDIR, format!("`{}` is a directory", lossy(new_name)))),
                    (true, true) => {
                        if t.has_dentries(vol, dst_ino)? {
                            return Err(FsError::new(libc::ENOTEMPTY, format!("directory `{}` is not empty", lossy(new_name))));
                        }
                        dp.nlink -= 1;
                    }
                    (false, false) => {}
                }
                t.delete_dentry(vol, new_parent, new_name)?;
                log.push(Event::name(ChangeKind::Delete, victim.kind, dst_ino, new_parent, new_name));
                if self.drop_link(t, vol, &mut victim, now)? {
                    purge = Some(dst_ino);
                }
            }
            // The entry keeps its place (cookie) in listings: a directory read while its files
            // are renamed returns each file once, under one of its names.
            t.move_dentry(vol, parent, name, new_parent, new_name)?;
            if flags & RENAME_WHITEOUT != 0 {
                // overlayfs marks a name deleted in its lower layer with a 0:0 character device.
                let v = t.volume_by_id(vol)?.ok_or_else(|| stale(ROOT_INO))?;
                if v.inodes >= max_inodes(v.cap) {
                    return Err(FsError::new(libc::ENOSPC, format!("volume `{}` holds its most inodes", v.name)));
                }
                let ino = t.next_ino(vol)?;
                let w = Attr {
                    ino,
                    kind: Kind::CharDev,
                    perm: 0,
                    nlink: 1,
                    uid: c.uid,
                    gid: c.gid,
                    size: 0,
                    alloc: 0,
                    xattrs: false,
                    atime: now,
                    mtime: now,
                    ctime: now,
                    rdev: 0,
                    acl: 0,
                };
                t.put_inode(vol, &w)?;
                t.insert_dentry(vol, parent, name, ino, Kind::CharDev)?;
                log.push(Event::name(ChangeKind::Create, Kind::CharDev, ino, parent, name));
            }
            if src.kind == Kind::Dir && new_parent != parent {
                sp.nlink -= 1;
                dp.nlink += 1;
            }
            src.ctime = now;
            t.put_inode(vol, &src)?;
            Self::touch_parents(t, vol, &mut sp, &mut dp, now)?;
            log.push(Event::Move {
                node: src.kind,
                ino: src_ino,
                dir: parent,
                name: name.to_vec(),
                new_dir: new_parent,
                new_name: new_name.to_vec(),
            });
            Ok(purge)
        })?;
        if let Some(ino) = purge {
            self.purge(vol, ino)?;
        }
        Ok(())
    }

    fn touch_parents(t: &mut dyn MetaTxn, vol: VolId, sp: &mut Attr, dp: &mut Attr, now: Timespec) -> FsResult<()> {
        sp.mtime = now;
        sp.ctime = now;
        if sp.ino == dp.ino {
            // One directory: only `dp` carries link-count changes (a replaced subdirectory).
            sp.nlink = dp.nlink;
            return t.put_inode(vol, sp);
        }
        dp.mtime = now;
        dp.ctime = now;
        t.put_inode(vol, sp)?;
        t.put_inode(vol, dp)
    }

    // ----- open files and data ---------------------------------------------------------------

    /// Takes one more handle on an inode (open files keep unlinked inodes alive). With a
    /// shared store the handle is published in the store too (`open_files`: the inode is freed
    /// only once no server holds it).
    pub fn hold(&self, vol: VolId, ino: Ino) -> FsResult<()> {
        if self.shared() {
            return self.held(vol, ino, |_| Ok(()));
        }
        *self.open.lock().unwrap().counts.entry((vol, ino)).or_insert(0) += 1;
        Ok(())
    }

    /// Takes a handle on an inode: counted here first (so that the flush of a closed handle
    /// meanwhile cannot take the row away), then, with a shared store, published in the same
    /// transaction as `check` (which reads the inode and may refuse) before the open answers,
    /// so an unlink through another server from then on leaves the inode to this handle.
    fn held<T>(&self, vol: VolId, ino: Ino, mut check: impl FnMut(&mut dyn MetaTxn) -> FsResult<T>) -> FsResult<T> {
        {
            let mut open = self.open.lock().unwrap();
            *open.counts.entry((vol, ino)).or_insert(0) += 1;
            open.closed.remove(&(vol, ino));
        }
        let out = self.tx(|t| {
            let out = check(t)?;
            if self.shared() {
                t.put_open(self.holder(), vol, ino)?;
            }
            Ok(out)
        });
        if out.is_err() {
            let _ = self.release(vol, ino);
        }
        out
    }

    /// One more handle on an inode this server already holds (a forked session's copy of its
    /// parent's): nothing to publish.
    pub fn hold_again(&self, vol: VolId, ino: Ino) {
        let mut open = self.open.lock().unwrap();
        let n = open.counts.entry((vol, ino)).or_insert(0);
        debug_assert!(*n > 0, "hold_again of an inode not held");
        *n += 1;
    }

    /// With a shared store, the name this engine's open handles are recorded under: its
    /// server's id ([`Engine::set_origin`]), or "" for an engine without a server.
    fn holder(&self) -> &str {
        self.origin().unwrap_or("")
    }

    /// Checks access for `flags` (as open(2)) and takes a handle on the inode.
    pub fn open(&self, vol: VolId, ino: Ino, flags: i32, c: &Caller) -> FsResult<Attr> {
        let want = match flags & libc::O_ACCMODE {
            // execve opens with `__FMODE_EXEC`: it needs execute permission, not read (a 0711
            // binary runs for everyone).
            libc::O_RDONLY if flags & FMODE_EXEC != 0 => X,
            libc::O_RDONLY => R,
            libc::O_WRONLY => W,
            _ => R | W,
        } | if flags & libc::O_TRUNC != 0 { W } else { 0 };
        let refuse_dir = |a: &Attr| match a.kind == Kind::Dir && want & W != 0 {
            true => Err(FsError::new(libc::EISDIR, format!("inode {ino} is a directory"))),
            false => Ok(()),
        };
        if self.shared() {
            // One transaction: the inode, the permission check and the published handle.
            let a = self.held(vol, ino, |t| {
                let a = Self::inode(t, vol, ino)?;
                refuse_dir(&a)?;
                Self::access(t, vol, &a, c, want)?;
                Ok(a)
            })?;
            if a.nlink == 0 {
                // An orphan reopened after a restart: its last release here frees it at once
                // (unless another server holds it).
                self.open.lock().unwrap().unlinked.insert((vol, ino));
            }
            return Ok(self.with_held(vol, a));
        }
        let a = self.getattr(vol, ino)?;
        refuse_dir(&a)?;
        self.check(vol, &a, c, want)?;
        let mut open = self.open.lock().unwrap();
        *open.counts.entry((vol, ino)).or_insert(0) += 1;
        if a.nlink == 0 {
            // An orphan reopened after a server restart: its last release frees it.
            open.unlinked.insert((vol, ino));
        }
        Ok(a)
    }

    /// Opens a directory for listing.
    pub fn opendir(&self, vol: VolId, ino: Ino, c: &Caller) -> FsResult<Attr> {
        if self.shared() {
            return self.held(vol, ino, |t| {
                let a = Self::dir(t, vol, ino)?;
                Self::access(t, vol, &a, c, R)?;
                Ok(a)
            });
        }
        let a = self.tx(|t| Self::dir(t, vol, ino))?;
        self.check(vol, &a, c, R)?;
        self.hold(vol, ino)?;
        Ok(a)
    }

    /// Drops a handle taken by `open`, `opendir` or `create`; the last one of an unlinked inode
    /// frees it.
    pub fn release(&self, vol: VolId, ino: Ino) -> FsResult<()> {
        let (orphan, last) = {
            let mut open = self.open.lock().unwrap();
            match open.counts.get_mut(&(vol, ino)) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    (false, false)
                }
                Some(_) => {
                    open.counts.remove(&(vol, ino));
                    (open.unlinked.remove(&(vol, ino)), true)
                }
                None => (false, false),
            }
        };
        if last {
            // This server's last handle: what it holds back goes up now (an orphan's too:
            // another server may hold it open). A failure leaves it to the periodic flush.
            if let Err(e) = self.settle(vol, ino) {
                tracing::warn!(vol, ino, "flushing held-back writes at the last close: {e}");
            }
        }
        match (orphan, last && self.shared()) {
            (true, false) => drop(self.purge(vol, ino)?),
            // An orphan (unlinked here, or perhaps through another server: it announced a
            // change): its row goes now, and the inode with it if it has no name and no holder.
            (true, true) => self.flush(vec![(vol, ino)])?,
            // This server's last handle: its row goes at the next heartbeat.
            (false, true) => drop(self.open.lock().unwrap().closed.insert((vol, ino))),
            (false, false) => {}
        }
        Ok(())
    }

    /// Another server announced a change of `ino` (it may have taken its last name): if this
    /// server holds it open, its last release here checks at once whether to free it, instead
    /// of at the next heartbeat.
    pub fn changed_elsewhere(&self, vol: VolId, ino: Ino) {
        let mut open = self.open.lock().unwrap();
        if open.counts.contains_key(&(vol, ino)) {
            open.unlinked.insert((vol, ino));
        }
    }

    /// With a shared store, drops the rows of the inodes this server closed since the last
    /// flush, and frees those of them that have no name and no other holder (unlinked through
    /// another server while open here).
    pub fn flush_closed(&self) -> FsResult<()> {
        let closed: Vec<(VolId, Ino)> = std::mem::take(&mut self.open.lock().unwrap().closed).into_iter().collect();
        self.flush(closed)
    }

    fn flush(&self, closed: Vec<(VolId, Ino)>) -> FsResult<()> {
        if closed.is_empty() {
            return Ok(());
        }
        let gone = self.tx(|t| {
            let mut gone = Vec::new();
            for &(vol, ino) in &closed {
                // Taken again meanwhile: the row stays.
                if self.open.lock().unwrap().counts.contains_key(&(vol, ino)) {
                    continue;
                }
                t.drop_open(self.holder(), vol, ino)?;
                if self.purge_in(t, vol, ino)? {
                    gone.push((vol, ino));
                }
            }
            Ok(gone)
        });
        let gone = match gone {
            Ok(g) => g,
            Err(e) => {
                // Tried again at the next flush.
                self.open.lock().unwrap().closed.extend(closed);
                return Err(e);
            }
        };
        for (vol, ino) in gone {
            self.remove_data(vol, ino)?;
        }
        Ok(())
    }

    pub fn read(&self, vol: VolId, ino: Ino, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        self.read_as(vol, ino, offset, size, false)
    }

    /// A read by a program through a mount: with `touch`, the access moves atime as a
    /// `relatime` mount does (see [`Engine::touch_atime`]).
    pub fn read_as(&self, vol: VolId, ino: Ino, offset: u64, size: u32, touch: bool) -> FsResult<Vec<u8>> {
        let a = self.getattr(vol, ino)?;
        regular(&a)?;
        if touch {
            self.touch_atime(vol, &a)?;
        }
        if offset >= a.size {
            return Ok(Vec::new());
        }
        let n = (a.size - offset).min(size as u64) as usize;
        let mut buf = vec![0u8; n];
        self.get_data(vol, ino, offset, &mut buf)?;
        Ok(buf)
    }

    /// Writes `data` at `offset`, or, when `append`, at the end of file as it stands inside this
    /// transaction (so concurrent appenders never overwrite one another); returns the offset
    /// written at and the attributes after the write. Writes held back for the file
    /// ([`Engine::write_behind`]) go first.
    pub fn write(&self, vol: VolId, ino: Ino, offset: u64, data: &[u8], append: bool, c: &Caller) -> FsResult<(u64, Attr)> {
        self.after_held(vol, ino, || self.write_through(vol, ino, offset, data, append, c))
    }

    /// [`Engine::write`] once nothing is held back for the file: a block store uploads the data
    /// as new blocks, then the transaction records them.
    fn write_through(&self, vol: VolId, ino: Ino, offset: u64, data: &[u8], append: bool, c: &Caller) -> FsResult<(u64, Attr)> {
        if self.has_blocks() && self.full.lock().unwrap().contains(&vol) {
            // The volume refused a write lately: check this one fits before its blocks go up
            // (a guest looping on a full volume would otherwise leave garbage at every try).
            self.tx(|t| {
                let a = Self::inode(t, vol, ino)?;
                let start = if append { a.size } else { offset };
                let end = start.saturating_add(data.len() as u64);
                let (_, added) = merged_extent(&t.extents(vol, ino, start, end)?, start, end);
                room(&t.volume_by_id(vol)?.ok_or_else(|| stale(ROOT_INO))?, added)
            })?;
        }
        let staged = self.stage(data)?;
        let out = self.write_tx(vol, ino, offset, data, append, c, Some(&staged), Timespec::now());
        if self.has_blocks() {
            match &out {
                Err(e) if e.errno == libc::EDQUOT => self.full.lock().unwrap().insert(vol),
                Ok(_) => self.full.lock().unwrap().remove(&vol),
                Err(_) => false,
            };
            if out.is_ok() {
                self.wrote_slices(vol, ino);
            }
        }
        out
    }

    /// A write's transaction: the space, size and times (`now` becomes the file's mtime and
    /// ctime), and (given `staged`, the data's blocks or nothing for a byte store) the data;
    /// without `staged` the data is held back by [`Engine::write_behind`] and recorded later.
    #[allow(clippy::too_many_arguments)]
    fn write_tx(
        &self,
        vol: VolId,
        ino: Ino,
        offset: u64,
        data: &[u8],
        append: bool,
        c: &Caller,
        staged: Option<&[blocks::Staged]>,
        now: Timespec,
    ) -> FsResult<(u64, Attr)> {
        // A held-back write leaves the committed size alone (it moves when its bytes go up, see
        // `buffer`): what this server holds may reach further. Read before the transaction (the
        // caller holds the file's buffer, so nothing else moves it): a transaction run again
        // after a serialization failure must not find its own first run's end there.
        let held = if staged.is_none() { self.held_size(vol, ino).unwrap_or(0) } else { 0 };
        self.mutate(vol, |t, log| {
            let mut a = Self::inode(t, vol, ino)?;
            regular(&a)?;
            let offset = if append { a.size.max(held) } else { offset };
            let end = offset
                .checked_add(data.len() as u64)
                .filter(|e| *e <= MAX_FILE_SIZE)
                .ok_or_else(|| FsError::new(libc::EFBIG, format!("a write ending past {MAX_FILE_SIZE} bytes")))?;
            let added = Self::allocate(t, vol, &mut a, offset, end)?;
            Self::charge(t, vol, 0, added)?;
            a.mtime = now;
            a.ctime = now;
            if !c.is_root() {
                drop_setid(&mut a);
            }
            // Data first, inside the transaction: if it fails, the size change is rolled back.
            match staged {
                Some(staged) => {
                    a.size = a.size.max(end);
                    self.put_data(t, vol, ino, offset, data, staged)?;
                }
                None => self.hold_size(vol, ino, end),
            }
            t.put_inode(vol, &a)?;
            log.push(Event::Modify { node: a.kind, ino });
            Ok((offset, Attr { size: a.size.max(held).max(end), ..a }))
        })
    }

    /// With a block store, counts a write of new slices to `ino` towards its compaction.
    fn wrote_slices(&self, vol: VolId, ino: Ino) {
        let mut c = self.compaction.lock().unwrap();
        if c.writes.len() >= COMPACT_TRACKED {
            c.writes.clear();
        }
        let n = c.writes.entry((vol, ino)).or_insert(0);
        *n += 1;
        if *n >= COMPACT_AFTER_WRITES {
            c.writes.remove(&(vol, ino));
            c.due.insert((vol, ino));
        }
    }

    /// The files written often enough since they were last considered to be worth a
    /// [`Engine::compact`] (taken: each is returned once).
    pub fn compaction_due(&self) -> Vec<(VolId, Ino)> {
        std::mem::take(&mut self.compaction.lock().unwrap().due).into_iter().collect()
    }

    /// With a block store, rewrites file `ino` as whole blocks if its slices have piled up
    /// (every write adds one: a file grown 4 KiB at a time is thousands of tiny blocks, and a
    /// read of it as many fetches): each [`blocks::BLOCK_MAX`] of the file that has data
    /// becomes one new block and one slice (a range that already is one whole slice is kept;
    /// holes stay holes). The new blocks go up first; one transaction then swaps the slices,
    /// only if the file's slices and size are still what was read (a write meanwhile wins and
    /// the file is left for next time). The old blocks are garbage for [`Engine::gc`] (unless
    /// a clone shares them). Returns the slices before and after, or `None` if there was
    /// nothing to do. The bytes read are the same before and after.
    pub fn compact(&self, vol: VolId, ino: Ino) -> FsResult<Option<(usize, usize)>> {
        self.compact_over(vol, ino, COMPACT_SLICES_PER_BLOCK)
    }

    /// [`Engine::compact`] if the file has more than `per_block` slices per block of its size.
    fn compact_over(&self, vol: VolId, ino: Ino, per_block: usize) -> FsResult<Option<(usize, usize)>> {
        let Data::Blocks(b) = &self.data else { return Ok(None) };
        let (size, before) = self.tx(|t| {
            let a = Self::inode(t, vol, ino)?;
            match a.kind == Kind::File && a.size > 0 {
                true => Ok((a.size, t.slices(vol, ino, 0, a.size)?)),
                false => Ok((0, Vec::new())),
            }
        })?;
        let started = std::time::Instant::now();
        let chunk = blocks::BLOCK_MAX as u64;
        let chunks = size.div_ceil(chunk) as usize;
        if before.len() <= chunks * per_block {
            return Ok(None);
        }
        // Each chunk's slices (a slice may lie across several).
        let mut by_chunk: Vec<Vec<&meta::SliceRow>> = vec![Vec::new(); chunks];
        for s in before.iter().filter(|s| s.len > 0) {
            let last = ((s.off + s.len - 1) / chunk).min(chunks as u64 - 1);
            for k in s.off / chunk..=last {
                by_chunk[k as usize].push(s);
            }
        }
        let mut new = Vec::new();
        let mut rewritten = 0u64;
        for (k, covering) in by_chunk.iter().enumerate() {
            let off = k as u64 * chunk;
            let len = (size - off).min(chunk);
            match covering[..] {
                [] => {}
                [s] if s.off == off && s.len == len => new.push(meta::SliceRow { id: 0, ..s.clone() }),
                _ if covering.iter().all(|s| s.block.is_none()) => {}
                _ => {
                    // From the first byte with data to the last: zeros around it need no block.
                    let data = covering.iter().filter(|s| s.block.is_some());
                    let lo = data.clone().map(|s| s.off).min().unwrap_or(off).max(off);
                    let hi = data.map(|s| s.off + s.len).max().unwrap_or(off).min(off + len);
                    rewritten += hi - lo;
                    if rewritten > COMPACT_MAX_BYTES {
                        tracing::info!(vol, ino, size, "file too large to compact in one pass: left as it is");
                        return Ok(None);
                    }
                    let mut buf = vec![0u8; (hi - lo) as usize];
                    b.read(&covering.iter().map(|s| (*s).clone()).collect::<Vec<_>>(), lo, &mut buf)?;
                    new.extend(blocks::slices_of(lo, &b.stage(&buf)?));
                }
            }
        }
        // Swapped only if nothing changed below `size` meanwhile (appends past it may go on),
        // and soon enough that gc cannot have taken the new blocks for garbage.
        let max_id = before.iter().map(|s| s.id).max().unwrap_or(0);
        let swapped = self.tx(|t| {
            let unchanged = started.elapsed() < COMPACT_PASS_MAX
                && t.get_inode(vol, ino)?.is_some_and(|a| a.size >= size)
                && t.slices(vol, ino, 0, size)? == before;
            if unchanged {
                t.drop_slices(vol, ino, max_id, size)?;
                new.iter().try_for_each(|s| t.insert_slice(vol, ino, s))?;
            }
            Ok(unchanged)
        })?;
        Ok(swapped.then_some((before.len(), new.len())))
    }

    /// fallocate(2) on a regular file. Mode 0 stores (and charges) `[offset, offset+length)`,
    /// growing the file; `FALLOC_FL_KEEP_SIZE` does so without changing the size (space kept
    /// past the end); `FALLOC_FL_PUNCH_HOLE` (always with KEEP_SIZE) turns the range into a hole
    /// and frees it; `FALLOC_FL_ZERO_RANGE` zeroes it and keeps it stored. Collapse, insert and
    /// unshare are `EOPNOTSUPP`.
    pub fn fallocate(&self, vol: VolId, ino: Ino, offset: u64, length: u64, mode: i32, c: &Caller) -> FsResult<Attr> {
        if length == 0 {
            return Err(FsError::new(libc::EINVAL, "fallocate of 0 bytes"));
        }
        let end = offset
            .checked_add(length)
            .filter(|e| *e <= MAX_FILE_SIZE)
            .ok_or_else(|| FsError::new(libc::EFBIG, format!("a range ending past {MAX_FILE_SIZE} bytes")))?;
        let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let now = Timespec::now();
        self.mutate_after_held(vol, ino, |t, log| {
            let mut a = Self::inode(t, vol, ino)?;
            regular(&a)?;
            let old_size = a.size;
            match mode & !libc::FALLOC_FL_KEEP_SIZE {
                0 => {
                    let added = Self::allocate(t, vol, &mut a, offset, end)?;
                    Self::charge(t, vol, 0, added)?;
                }
                libc::FALLOC_FL_PUNCH_HOLE if keep => {
                    let freed = Self::deallocate(t, vol, &mut a, offset, end)?;
                    Self::charge(t, vol, freed, 0)?;
                    if offset < a.size {
                        self.zero_data(t, vol, ino, offset, end.min(a.size) - offset)?;
                    }
                    a.mtime = now;
                }
                libc::FALLOC_FL_ZERO_RANGE => {
                    let added = Self::allocate(t, vol, &mut a, offset, end)?;
                    Self::charge(t, vol, 0, added)?;
                    if offset < a.size {
                        self.zero_data(t, vol, ino, offset, end.min(a.size) - offset)?;
                    }
                    a.mtime = now;
                }
                other => {
                    return Err(FsError::new(
                        libc::EOPNOTSUPP,
                        format!("fallocate mode {other:#x} is not supported (preallocate, KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE are)"),
                    ))
                }
            }
            if !keep && end > old_size {
                // Bytes past the old end (left by a crash) must read as zeros.
                self.truncate_data(t, vol, ino, old_size)?;
                a.size = end;
                a.mtime = now;
            }
            a.ctime = now;
            if !c.is_root() {
                drop_setid(&mut a);
            }
            t.put_inode(vol, &a)?;
            log.push(Event::Modify { node: a.kind, ino });
            Ok(a)
        })
    }

    /// lseek(2) with `SEEK_DATA` (the first stored byte at or after `offset`) or `SEEK_HOLE`
    /// (the first byte of a hole at or after it; the end of file counts as one). `ENXIO` at or
    /// past the end of file.
    pub fn lseek(&self, vol: VolId, ino: Ino, offset: u64, whence: i32) -> FsResult<u64> {
        self.settle(vol, ino)?;
        self.tx(|t| {
            let a = Self::inode(t, vol, ino)?;
            regular(&a)?;
            if offset >= a.size {
                return Err(FsError::new(libc::ENXIO, format!("offset {offset} is at or past the end of file ({})", a.size)));
            }
            let ranges: Vec<(u64, u64)> = t.extents(vol, ino, offset, a.size)?.into_iter().filter(|(_, e)| *e > offset).collect();
            match whence {
                libc::SEEK_DATA => match ranges.first() {
                    Some(&(s, _)) if s < a.size => Ok(s.max(offset)),
                    _ => Err(FsError::new(libc::ENXIO, format!("no data at or after offset {offset}"))),
                },
                // Ranges never touch, so the one holding `offset` ends at a hole.
                libc::SEEK_HOLE => Ok(match ranges.first() {
                    Some(&(s, e)) if s <= offset => e.min(a.size),
                    _ => offset,
                }),
                other => Err(FsError::new(libc::EINVAL, format!("lseek whence {other} is not SEEK_DATA or SEEK_HOLE"))),
            }
        })
    }

    /// copy_file_range(2) on the host: copies up to `len` bytes (at most [`COPY_MAX`], and not
    /// past the source's end) from `src` at `src_off` to `dst` at `dst_off`, holes included;
    /// returns the bytes copied and the destination's attributes.
    #[allow(clippy::too_many_arguments)]
    pub fn copy_range(&self, vol: VolId, src: Ino, src_off: u64, dst: Ino, dst_off: u64, len: u64, c: &Caller) -> FsResult<(u64, Attr)> {
        // A block store copies slices: held-back bytes of either file must be slices first.
        self.settle(vol, src)?;
        let now = Timespec::now();
        self.mutate_after_held(vol, dst, |t, log| {
            let sa = Self::inode(t, vol, src)?;
            regular(&sa)?;
            let mut d = Self::inode(t, vol, dst)?;
            regular(&d)?;
            let n = len.min(COPY_MAX).min(sa.size.saturating_sub(src_off));
            if n == 0 {
                return Ok((0, d));
            }
            if src == dst && src_off < dst_off + n && dst_off < src_off + n {
                return Err(FsError::new(libc::EINVAL, "copy_file_range within one file with overlapping ranges"));
            }
            let dst_end = dst_off
                .checked_add(n)
                .filter(|e| *e <= MAX_FILE_SIZE)
                .ok_or_else(|| FsError::new(libc::EFBIG, format!("a copy ending past {MAX_FILE_SIZE} bytes")))?;
            let data: Vec<(u64, u64)> = t
                .extents(vol, src, src_off, src_off + n)?
                .into_iter()
                .map(|(s, e)| (s.max(src_off), e.min(src_off + n)))
                .filter(|(s, e)| s < e)
                .collect();
            // The destination range becomes what the source range is: its holes as holes.
            let freed = Self::deallocate(t, vol, &mut d, dst_off, dst_end)?;
            let mut added = 0;
            for &(s, e) in &data {
                added += Self::allocate(t, vol, &mut d, dst_off + (s - src_off), dst_off + (e - src_off))?;
            }
            Self::charge(t, vol, freed, added)?;
            if dst_off < d.size {
                self.zero_data(t, vol, dst, dst_off, dst_end.min(d.size) - dst_off)?;
            }
            if dst_end > d.size {
                // Bytes past the old end (left by a crash) must read as zeros.
                self.truncate_data(t, vol, dst, d.size)?;
                d.size = dst_end;
            }
            self.copy_data(t, vol, src, src_off, dst, dst_off, &data)?;
            d.mtime = now;
            d.ctime = now;
            if !c.is_root() {
                drop_setid(&mut d);
            }
            t.put_inode(vol, &d)?;
            log.push(Event::Modify { node: d.kind, ino: dst });
            Ok((n, d))
        })
    }

    /// Moves atime as Linux's default `relatime` does: to now when it is not after mtime or
    /// ctime or is a day old. Otherwise, the common case, nothing is written. When atime moves,
    /// this thread's observer (see [`Engine::observed`]) is told the new attributes inside the
    /// transaction that moves it, as for any change.
    fn touch_atime(&self, vol: VolId, a: &Attr) -> FsResult<()> {
        let now = Timespec::now();
        if a.atime > a.mtime && a.atime > a.ctime && now.sec - a.atime.sec < 24 * 3600 {
            return Ok(());
        }
        // Its own small transaction (atime is not a change: no ctime, no change-log event); an
        // inode removed meanwhile is left alone.
        self.tx(|t| match t.get_inode(vol, a.ino)? {
            Some(mut cur) => {
                cur.atime = now;
                t.put_inode(vol, &cur)?;
                if let Some(o) = observer() {
                    // As this server's guests see it: with the size of writes it holds back
                    // (the committed one would cut their cached size short).
                    o.changed(&self.with_held(vol, cur));
                }
                Ok(())
            }
            None => Ok(()),
        })
    }

    /// Makes the inode's data and all committed metadata durable on the host.
    pub fn fsync(&self, vol: VolId, ino: Ino, datasync: bool) -> FsResult<()> {
        self.settle(vol, ino)?;
        let a = self.getattr(vol, ino)?;
        if a.kind == Kind::File {
            self.sync_data(vol, ino)?;
        }
        let _ = datasync;
        self.meta.sync()
    }

    // ----- directories -----------------------------------------------------------------------

    /// Lists entries after `cookie`, including `.` (cookie 1) and `..` (cookie 2). With `plus`,
    /// each entry carries its attributes.
    pub fn readdir(&self, vol: VolId, ino: Ino, cookie: u64, limit: u32, plus: bool) -> FsResult<Vec<DirEntry>> {
        self.readdir_as(vol, ino, cookie, limit, plus, false)
    }

    /// A listing by a program through a mount: with `touch`, the first batch (cookie 0) moves
    /// the directory's atime as a `relatime` mount does (see [`Engine::read_as`]).
    pub fn readdir_as(&self, vol: VolId, ino: Ino, cookie: u64, limit: u32, plus: bool, touch: bool) -> FsResult<Vec<DirEntry>> {
        let limit = limit.clamp(1, 4096);
        let (d, out) = self.tx(|t| {
            let d = Self::dir(t, vol, ino)?;
            let mut out = Vec::new();
            if cookie < 1 {
                out.push(DirEntry { name: b".".to_vec(), ino, kind: Kind::Dir, cookie: 1, attr: plus.then(|| d.clone()) });
            }
            if cookie < 2 {
                let pino = if ino == ROOT_INO { ROOT_INO } else { t.dir_parent(vol, ino)?.unwrap_or(ROOT_INO) };
                let pattr = if plus { t.get_inode(vol, pino)? } else { None };
                out.push(DirEntry { name: b"..".to_vec(), ino: pino, kind: Kind::Dir, cookie: 2, attr: pattr });
            }
            let after = cookie.saturating_sub(2);
            let rows = t.list_dentries(vol, ino, after, limit.saturating_sub(out.len() as u32).max(1))?;
            for r in rows {
                let attr = if plus {
                    match t.get_inode(vol, r.ino)? {
                        Some(a) => Some(self.with_held(vol, a)),
                        None => continue,
                    }
                } else {
                    None
                };
                out.push(DirEntry { name: r.name, ino: r.ino, kind: r.kind, cookie: r.cookie + 2, attr });
            }
            Ok((d, out))
        })?;
        if touch && cookie == 0 {
            self.touch_atime(vol, &d)?;
        }
        Ok(out)
    }

    pub fn statfs(&self, vol: VolId) -> FsResult<StatFs> {
        let v = self.volume_by_id(vol)?;
        let blocks = v.cap / BLOCK;
        let free = v.cap.saturating_sub(v.used) / BLOCK;
        let files = max_inodes(v.cap);
        Ok(StatFs {
            blocks,
            bfree: free,
            bavail: free,
            files,
            ffree: files.saturating_sub(v.inodes),
            bsize: BLOCK as u32,
            namelen: NAME_MAX as u32,
            frsize: BLOCK as u32,
        })
    }

    // ----- extended attributes ---------------------------------------------------------------

    fn xattr_access(t: &mut dyn MetaTxn, vol: VolId, a: &Attr, name: &[u8], c: &Caller, write: bool) -> FsResult<()> {
        if name.is_empty() || name.len() > XATTR_NAME_MAX {
            return Err(FsError::new(libc::ERANGE, format!("xattr names are 1-{XATTR_NAME_MAX} bytes")));
        }
        if name == acl::ACCESS || name == acl::DEFAULT {
            // Anyone may read an ACL (the kernel reads it to check permissions); only the owner
            // or root may change one. Symlinks have none, as on Linux.
            if write && a.kind == Kind::Symlink {
                return Err(FsError::new(libc::EOPNOTSUPP, "symlinks have no POSIX ACLs"));
            }
            return if !write || c.is_root() || c.uid == a.uid {
                Ok(())
            } else {
                Err(FsError::new(libc::EPERM, format!("only the owner (uid {}) or root may change the ACLs of inode {}", a.uid, a.ino)))
            };
        }
        if name.starts_with(b"user.") {
            if !matches!(a.kind, Kind::File | Kind::Dir) {
                return Err(FsError::new(libc::EPERM, "user xattrs are only allowed on files and directories"));
            }
            return Self::access(t, vol, a, c, if write { W } else { R });
        }
        if name.starts_with(b"trusted.") {
            return if c.is_root() { Ok(()) } else { Err(FsError::new(libc::EPERM, "trusted xattrs need root")) };
        }
        if name.starts_with(b"security.") {
            return if !write || c.is_root() || c.uid == a.uid {
                Ok(())
            } else {
                Err(FsError::new(libc::EPERM, "security xattrs need the owner or root"))
            };
        }
        Err(FsError::new(
            libc::ENOTSUP,
            format!(
                "xattr namespace of {:?} is not supported (user., trusted., security., and system.posix_acl_access/default)",
                lossy(name)
            ),
        ))
    }

    pub fn setxattr(&self, vol: VolId, ino: Ino, name: &[u8], value: &[u8], flags: i32, c: &Caller) -> FsResult<()> {
        if value.len() > XATTR_SIZE_MAX {
            return Err(FsError::new(libc::E2BIG, format!("xattr values are at most {XATTR_SIZE_MAX} bytes")));
        }
        if name == acl::ACCESS || name == acl::DEFAULT {
            return self.set_acl(vol, ino, name, value, c);
        }
        self.mutate(vol, |t, log| {
            let mut a = Self::inode(t, vol, ino)?;
            Self::xattr_access(t, vol, &a, name, c, true)?;
            let existing = t.list_xattrs(vol, ino)?;
            let old = existing.iter().find(|(n, _)| n == name);
            if flags & XATTR_CREATE != 0 && old.is_some() {
                return Err(FsError::new(libc::EEXIST, format!("xattr {:?} exists", lossy(name))));
            }
            if flags & XATTR_REPLACE != 0 && old.is_none() {
                return Err(FsError::new(libc::ENODATA, format!("xattr {:?} does not exist", lossy(name))));
            }
            Self::store_xattr(t, vol, ino, name, value)?;
            a.xattrs = true;
            a.ctime = Timespec::now();
            log.push(Event::Modify { node: a.kind, ino });
            t.put_inode(vol, &a)
        })
    }

    /// Stores one xattr value (new or replacing), within the per-inode limits and the cap.
    fn store_xattr(t: &mut dyn MetaTxn, vol: VolId, ino: Ino, name: &[u8], value: &[u8]) -> FsResult<()> {
        let existing = t.list_xattrs(vol, ino)?;
        let old = existing.iter().find(|(n, _)| n == name);
        let others = existing.iter().filter(|(n, _)| n != name);
        let total: usize = others.clone().map(|(n, l)| n.len() + l).sum::<usize>() + name.len() + value.len();
        if total > XATTR_TOTAL_MAX {
            return Err(FsError::new(libc::ENOSPC, format!("xattrs of inode {ino} would exceed {XATTR_TOTAL_MAX} bytes")));
        }
        if others.map(|(n, _)| n.len() + 1).sum::<usize>() + name.len() + 1 > XATTR_LIST_MAX {
            return Err(FsError::new(libc::ENOSPC, format!("xattr names of inode {ino} would exceed {XATTR_LIST_MAX} bytes")));
        }
        let before = old.map_or(0, |(n, l)| n.len() + l);
        Self::charge(t, vol, before as u64, (name.len() + value.len()) as u64)?;
        t.set_xattr(vol, ino, name, value)
    }

    /// Removes one xattr and gives its bytes back to the cap; false if there was none.
    fn drop_xattr(t: &mut dyn MetaTxn, vol: VolId, ino: Ino, name: &[u8]) -> FsResult<bool> {
        if let Some((n, l)) = t.list_xattrs(vol, ino)?.iter().find(|(n, _)| n == name) {
            Self::charge(t, vol, (n.len() + l) as u64, 0)?;
        }
        t.remove_xattr(vol, ino, name)
    }

    /// setfacl: sets (or, with a value of no entries, removes) the access or default ACL, as
    /// Linux's `set_posix_acl`. An access ACL also sets the permission bits (owner, mask or
    /// owning group, other); one the bits say entirely is not stored. XATTR_CREATE/REPLACE are
    /// ignored for ACLs, as on Linux.
    fn set_acl(&self, vol: VolId, ino: Ino, name: &[u8], value: &[u8], c: &Caller) -> FsResult<()> {
        let parsed = Acl::parse(value)?;
        let default = name == acl::DEFAULT;
        let mark = if default { ACL_DEFAULT } else { ACL_ACCESS };
        self.mutate(vol, |t, log| {
            let mut a = Self::inode(t, vol, ino)?;
            if default && a.kind != Kind::Dir && parsed.is_some() {
                return Err(FsError::new(libc::EACCES, format!("inode {ino} is not a directory: only directories have a default ACL")));
            }
            Self::xattr_access(t, vol, &a, name, c, true)?;
            let mut keep = parsed.clone();
            if let (false, Some(acl)) = (default, &parsed) {
                a.perm = (a.perm & !0o777) | acl.mode_bits();
                if !c.is_root() && !c.in_group(a.gid) {
                    a.perm &= !libc::S_ISGID;
                }
                if acl.is_minimal() {
                    keep = None;
                }
            }
            match keep {
                Some(acl) => {
                    Self::store_xattr(t, vol, ino, name, &acl.encode())?;
                    a.acl |= mark;
                }
                None => {
                    Self::drop_xattr(t, vol, ino, name)?;
                    a.acl &= !mark;
                }
            }
            a.xattrs = !t.list_xattrs(vol, ino)?.is_empty();
            a.ctime = Timespec::now();
            log.push(Event::Modify { node: a.kind, ino });
            t.put_inode(vol, &a)
        })
    }

    pub fn getxattr(&self, vol: VolId, ino: Ino, name: &[u8], c: &Caller) -> FsResult<Vec<u8>> {
        self.tx(|t| {
            let a = Self::inode(t, vol, ino)?;
            Self::xattr_access(t, vol, &a, name, c, false)?;
            t.get_xattr(vol, ino, name)?.ok_or_else(|| FsError::new(libc::ENODATA, format!("xattr {:?} does not exist", lossy(name))))
        })
    }

    /// Names, each followed by a NUL, as listxattr(2) returns them.
    pub fn listxattr(&self, vol: VolId, ino: Ino, c: &Caller) -> FsResult<Vec<u8>> {
        self.tx(|t| {
            Self::inode(t, vol, ino)?;
            let mut out = Vec::new();
            for (name, _) in t.list_xattrs(vol, ino)? {
                if name.starts_with(b"trusted.") && !c.is_root() {
                    continue;
                }
                out.extend_from_slice(&name);
                out.push(0);
            }
            Ok(out)
        })
    }

    pub fn removexattr(&self, vol: VolId, ino: Ino, name: &[u8], c: &Caller) -> FsResult<()> {
        self.mutate(vol, |t, log| {
            let mut a = Self::inode(t, vol, ino)?;
            Self::xattr_access(t, vol, &a, name, c, true)?;
            if !Self::drop_xattr(t, vol, ino, name)? {
                return Err(FsError::new(libc::ENODATA, format!("xattr {:?} does not exist", lossy(name))));
            }
            a.xattrs = !t.list_xattrs(vol, ino)?.is_empty();
            if name == acl::ACCESS {
                a.acl &= !ACL_ACCESS;
            } else if name == acl::DEFAULT {
                a.acl &= !ACL_DEFAULT;
            }
            a.ctime = Timespec::now();
            log.push(Event::Modify { node: a.kind, ino });
            t.put_inode(vol, &a)
        })
    }
}

/// An engine over `dir` for tests: metadata in SQLite there, or, when `VOLUMEFS_TEST_PG` names a
/// PostgreSQL database, in a schema of its own in that database, so that the same tests run
/// against both stores. Opening the same `dir` again (a restart) reopens the same schema; a new
/// `dir` gets a new, empty one.
#[cfg(test)]
pub(crate) fn test_engine(dir: &Path) -> Engine {
    let e = Engine::open_store(dir, test_store(dir).as_deref(), test_blocks(dir).as_deref()).unwrap();
    // As a server runs it (only guests' writes through `write_behind` are held back).
    e.write_behind_in(&dir.join("write-behind")).unwrap();
    e
}

/// A name of its own for the stores of test directory `dir` (the same for the same `dir` within
/// this process, so that a restart reopens them).
#[cfg(test)]
fn test_name(dir: &Path) -> String {
    static NAMES: Mutex<std::collections::BTreeMap<std::path::PathBuf, String>> = Mutex::new(std::collections::BTreeMap::new());
    let mut names = NAMES.lock().unwrap();
    let n = names.len();
    names.entry(dir.to_path_buf()).or_insert_with(|| format!("t{}_{n}_{}", std::process::id(), Timespec::now().nsec)).clone()
}

#[cfg(test)]
fn with_param(base: &str, param: &str) -> String {
    format!("{base}{}{param}", if base.contains('?') { '&' } else { '?' })
}

#[cfg(test)]
pub(crate) fn test_store(dir: &Path) -> Option<String> {
    let base = std::env::var("VOLUMEFS_TEST_PG").ok().filter(|s| !s.is_empty())?;
    Some(with_param(&base, &format!("schema={}", test_name(dir))))
}

/// With `VOLUMEFS_TEST_BLOCKS` set (`file:///dir` or `s3://bucket?...`), where the test engine of
/// `dir` keeps its blocks: a directory or a prefix of its own.
#[cfg(test)]
pub(crate) fn test_blocks(dir: &Path) -> Option<String> {
    let base = std::env::var("VOLUMEFS_TEST_BLOCKS").ok().filter(|s| !s.is_empty())?;
    if base.starts_with("file://") {
        return Some(format!("file://{}", dir.join("blocks").display()));
    }
    Some(with_param(&base, &format!("prefix={}", test_name(dir))))
}

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;

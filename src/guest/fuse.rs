//! The FUSE adapter: each `fuser::Filesystem` callback turns the kernel's request into an
//! [`Op`], sends it through the [`MountClient`] and replies from the callback when the host
//! answers. Nothing here blocks a FUSE thread on the network, and nothing here decides policy:
//! permissions, scope and quota are the host's (the kernel's `default_permissions` check is a
//! fast path for clear errors, not the line of defence).

use super::client::MountClient;
use crate::fs::{Attr, Caller, FsError, Kind, SetAttr, SetTime, Timespec, ROOT_INO};
use crate::proto::{Lock, Notice, Op, Reply, MAX_IO};
use fuser::{
    CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyLock, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// How long the kernel may trust names and attributes without asking. Every change by another
/// sandbox or the API is pushed as an invalidation while connected, and a reconnection (when
/// pushes may have been lost) drops everything this mount handed the kernel (see
/// [`Invalidator::flush_all`]), so this only bounds the damage of a push the host failed to send.
const TTL: Duration = Duration::from_secs(60);
/// How long the kernel may trust that a name does not exist. A create elsewhere is pushed too,
/// but negative entries cannot be listed for the flush at a reconnection: they stay short.
const NEG_TTL: Duration = Duration::from_secs(1);
/// Entries asked for per readdir round trip.
const DIR_BATCH: u32 = 256;

pub struct VolumeFs {
    client: Arc<MountClient>,
    invalidator: Arc<Invalidator>,
    /// (inode, owner) that asked for a lock through this mount since the owner last closed the
    /// file: only their closes need to reach the host (to drop POSIX locks); every other close
    /// is answered here. So a process that never locked (e.g. a child closing inherited
    /// descriptors at exec) never waits on the host, even while the host is down.
    locked: Arc<Mutex<HashSet<(u64, u64)>>>,
    /// Per open file (kernel handle), the lock owners that took locks through it and have not
    /// flushed it since. A POSIX owner flushes on every close; what is left at release is the
    /// open file description's own owner (OFD locks, flock), whose locks die with it. The
    /// kernel does not tell us (it releases OFD locks only in its own lock table, which FUSE
    /// bypasses), so without this an OFD lock outlived its file and blocked everyone forever.
    owners: Mutex<HashMap<u64, HashSet<u64>>>,
    /// Files written through this mount since their last close, with the thread that wrote: a
    /// host that holds writes back sends them to the store when that thread closes the file
    /// (the `Flush` it is then sent), so that another sandbox opening the file afterwards,
    /// through any server, reads them. Only the writer's close asks: a child closing inherited
    /// descriptors at exec (a fork of a writer) must not wait on the host, and others' closes
    /// are covered by the release and the host's own flush within a second.
    written: Mutex<HashSet<(u64, u32)>>,
    /// Forgets not sent to the host yet (see [`VolumeFs::forget_all`]).
    forgets: Mutex<Forgets>,
    /// Runs when the FUSE session ends, whoever ended it (see [`VolumeFs::on_end`]).
    on_end: OnEnd,
}

/// Forgets on their way to the host. The host needs them only to stop pushing invalidations the
/// kernel no longer needs (its count of this mount's lookups errs on the high side meanwhile),
/// so they travel in batches instead of one request each.
#[derive(Default)]
struct Forgets {
    items: Vec<(u64, u64)>,
    since: Option<Instant>,
}

/// A batch of forgets goes when it has this many...
const FORGET_BATCH: usize = 256;
/// ... or, with the next request, when its oldest is this old.
const FORGET_WAIT: Duration = Duration::from_millis(200);

/// Runs its callback once, when dropped: the session's filesystem is dropped when the session
/// loop ends, be it an unmount by the agent, an `umount` inside the guest, or a failure.
#[derive(Default)]
struct OnEnd(Mutex<Option<Box<dyn FnOnce() + Send>>>);

impl Drop for OnEnd {
    fn drop(&mut self) {
        if let Some(f) = self.0.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            f();
        }
    }
}

impl VolumeFs {
    pub fn new(client: Arc<MountClient>, invalidator: Arc<Invalidator>) -> VolumeFs {
        VolumeFs {
            client,
            invalidator,
            locked: Arc::default(),
            owners: Mutex::default(),
            written: Mutex::default(),
            forgets: Mutex::default(),
            on_end: OnEnd::default(),
        }
    }

    /// `f` runs (on the session's thread) when the FUSE session has ended: the kernel no longer
    /// sends this mount anything.
    pub fn on_end(mut self, f: impl FnOnce() + Send + 'static) -> VolumeFs {
        self.on_end = OnEnd(Mutex::new(Some(Box::new(f))));
        self
    }

    fn send(&self, req: &Request, op: Op, done: impl FnOnce(Result<Reply, FsError>) + Send + 'static) {
        self.send_forgets(req);
        let changes = self.invalidator.changes(&op);
        if changes.iter().all(Option::is_none) {
            return self.client.call_async(caller(req), op, Box::new(done));
        }
        // A file this mount changes is read from the kernel's pages or the host from now on,
        // not from what came with an open before.
        self.invalidator.unfetch(|ino| changes.contains(&Some(ino)));
        let inv = self.invalidator.clone();
        self.client.call_async(
            caller(req),
            op,
            Box::new(move |r| {
                if r.is_err() {
                    inv.failed(changes);
                }
                done(r)
            }),
        );
    }

    /// The kernel forgot lookups: noted at once, told to the host in batches.
    fn forget_all(&self, req: &Request, items: &[(u64, u64)]) {
        for &(ino, n) in items {
            self.invalidator.forgotten(ino, n);
        }
        {
            let mut f = self.forgets.lock().unwrap();
            f.items.extend_from_slice(items);
            f.since.get_or_insert_with(Instant::now);
        }
        self.send_forgets(req);
    }

    /// Sends the pending forgets if the batch is full or old.
    fn send_forgets(&self, req: &Request) {
        let items = {
            let mut f = self.forgets.lock().unwrap();
            let due = f.items.len() >= FORGET_BATCH || f.since.is_some_and(|t| t.elapsed() >= FORGET_WAIT);
            if !due || f.items.is_empty() {
                return;
            }
            f.since = None;
            std::mem::take(&mut f.items)
        };
        self.client.call_async(caller(req), Op::Forget { items }, Box::new(|_| {}));
    }

    /// The reply to an unlink or rmdir: a removed name is no longer the kernel's to drop.
    fn removal(&self, parent: u64, name: &OsStr, reply: ReplyEmpty) -> impl FnOnce(Result<Reply, FsError>) + Send + 'static {
        let inv = self.invalidator.clone();
        let name = name.as_bytes().to_vec();
        move |r| {
            if r.is_ok() {
                inv.removed(parent, &name);
            }
            empty_reply(reply)(r)
        }
    }

    /// The reply to a setxattr or removexattr: whether the inode has xattrs is forgotten again
    /// (see `setxattr`). Setting an access ACL also changes the permission bits on the host,
    /// which the kernel does not know: for ACL names its cached attributes are dropped before
    /// the caller is answered, so a `stat` right after `setfacl` sees them.
    fn xattr_changed(&self, ino: u64, name: &OsStr, reply: ReplyEmpty) -> impl FnOnce(Result<Reply, FsError>) + Send + 'static {
        let acl = name.as_bytes().starts_with(b"system.posix_acl_");
        let inval = self.invalidator.clone();
        move |r| {
            inval.forget(ino);
            match r {
                Ok(_) if acl => inval.invalidate_then(ino, move || reply.ok()),
                r => empty_reply(reply)(r),
            }
        }
    }
}

/// The requesting process's credentials, with supplementary groups read from /proc (FUSE only
/// passes uid and gid). Root needs no groups: it passes every check anyway.
fn caller(req: &Request) -> Caller {
    let (uid, gid) = (req.uid(), req.gid());
    let groups = if uid == 0 { Vec::new() } else { proc_groups(req.pid()) };
    Caller { uid, gid, groups }
}

fn proc_groups(pid: u32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return Vec::new() };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| g.split_whitespace().filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_default()
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno)
}

fn kind(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

fn attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks(),
        atime: a.atime.to_system_time(),
        mtime: a.mtime.to_system_time(),
        ctime: a.ctime.to_system_time(),
        crtime: a.ctime.to_system_time(),
        kind: kind(a.kind),
        perm: (a.perm & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(st) => SetTime::At(Timespec::from_system_time(st)),
    }
}

fn unexpected(r: Reply) -> Errno {
    tracing::error!("unexpected reply from the host: {r:?}");
    Errno::EIO
}

/// The reply to a request that hands the kernel an entry (`name` in `parent`): the entry is
/// remembered for the flush at a reconnection. A lookup that finds nothing (`negative`) answers
/// with a negative entry the kernel may keep for [`NEG_TTL`].
fn entry_reply(
    reply: ReplyEntry,
    inv: &Arc<Invalidator>,
    parent: u64,
    name: &OsStr,
    negative: bool,
) -> impl FnOnce(Result<Reply, FsError>) + Send {
    let inv = inv.clone();
    let name = name.as_bytes().to_vec();
    move |r| match r {
        Ok(Reply::Entry(a)) => {
            inv.note(&a);
            inv.entered(parent, name, a.ino);
            reply.entry(&TTL, &attr(&a), Generation(0))
        }
        Ok(other) => reply.error(unexpected(other)),
        Err(e) if negative && e.errno == libc::ENOENT => reply.entry(&NEG_TTL, &absent(), Generation(0)),
        Err(e) => reply.error(errno(&e)),
    }
}

/// The attributes of a negative entry: inode 0 tells the kernel the name does not exist.
fn absent() -> FileAttr {
    let t = SystemTime::UNIX_EPOCH;
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn empty_reply(reply: ReplyEmpty) -> impl FnOnce(Result<Reply, FsError>) + Send {
    move |r| match r {
        Ok(_) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

fn attr_reply(reply: ReplyAttr, inv: &Arc<Invalidator>) -> impl FnOnce(Result<Reply, FsError>) + Send {
    let inv = inv.clone();
    move |r| match r {
        Ok(Reply::Attr(a)) => {
            inv.note(&a);
            reply.attr(&TTL, &attr(&a))
        }
        Ok(other) => reply.error(unexpected(other)),
        Err(e) => reply.error(errno(&e)),
    }
}

/// How the kernel should treat a file opened with `flags`. An `O_APPEND` descriptor bypasses the
/// page cache: the host decides where its writes land, so the kernel must not file them in
/// pages at its own guess of the end of file.
fn open_flags(flags: i32) -> FopenFlags {
    if flags & libc::O_APPEND != 0 {
        FopenFlags::FOPEN_DIRECT_IO
    } else {
        FopenFlags::empty()
    }
}

fn xattr_reply(reply: ReplyXattr, size: u32) -> impl FnOnce(Result<Reply, FsError>) + Send {
    move |r| match r {
        Ok(Reply::Xattr(v)) if size == 0 => reply.size(v.len() as u32),
        Ok(Reply::Xattr(v)) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(Reply::Xattr(v)) => reply.data(&v),
        Ok(other) => reply.error(unexpected(other)),
        Err(e) => reply.error(errno(&e)),
    }
}

enum Job {
    Notice(Notice),
    /// Drop the inode's cached attributes and pages, then run the continuation.
    Then(u64, Box<dyn FnOnce() + Send>),
    /// Drop every entry and inode this mount handed the kernel (see [`Invalidator::flush_all`]).
    FlushAll,
}

/// What this mount has handed the kernel and the kernel has not forgotten: lookups per inode,
/// and the names they were found by. With long TTLs these are what a reconnection must drop.
#[derive(Default)]
struct Known {
    lookups: HashMap<u64, u64>,
    names: HashMap<(u64, Vec<u8>), u64>,
}

impl Known {
    fn entered(&mut self, parent: u64, name: Vec<u8>, ino: u64) {
        *self.lookups.entry(ino).or_default() += 1;
        if name != b"." && name != b".." {
            self.names.insert((parent, name), ino);
        }
    }

    fn forgotten(&mut self, ino: u64, n: u64) {
        let Some(count) = self.lookups.get_mut(&ino) else { return };
        *count = count.saturating_sub(n);
        if *count == 0 {
            self.lookups.remove(&ino);
            // Names of forgotten inodes are dropped in bulk, once they are most of the map.
            if self.names.len() > 2 * self.lookups.len() + 1024 {
                let lookups = &self.lookups;
                self.names.retain(|_, i| lookups.contains_key(i));
            }
        }
    }
}

/// Cache invalidation in the guest kernel.
///
/// Attribute invalidation is cheap and takes no page locks, so pushed `InvalInode`s are applied
/// inline on the connection's reader thread, in order with replies: an open answered after a
/// push sees fresh attributes. Page and entry invalidation can wait on locks held by requests
/// whose replies that same reader thread must deliver, so they run on a thread of their own.
#[derive(Default)]
pub struct Invalidator {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    /// Inodes the host last reported without any xattr, until when that may be trusted (the
    /// attribute TTL, as for the attributes it came with). Lookups of absent xattrs (`ls -l`
    /// asks every file for `security.selinux`) are answered here meanwhile; a pushed
    /// invalidation of the inode forgets it.
    bare: Mutex<HashMap<u64, Instant>>,
    /// Files whose pages in the kernel are known current: inode -> the client's link
    /// generation when that was last established (at an open). A pushed invalidation removes
    /// the inode; a reconnection (pushes may have been lost meanwhile) makes every entry old.
    /// An open of a file listed with the current generation keeps its pages (FOPEN_KEEP_CACHE):
    /// any write that another sandbox finished before the open was pushed before the open's
    /// reply, so close-to-open holds without dropping the cache at every open.
    clean: Mutex<HashMap<u64, u64>>,
    /// Lock requests waiting for a conflicting lock to go (they hear of `LockFreed` pushes).
    waits: Arc<LockWaits>,
    known: Mutex<Known>,
    /// The latest attributes of each inode, from the host's answers and pushes, with when they
    /// came: the kernel's getattr is answered from here (within the TTL) instead of by a round
    /// trip. The kernel asks again after its own changes (create, unlink, write: the host
    /// pushed the attributes after them, inside the change's transaction, so they are here
    /// before the answer) and after every read (it marks atime stale; a read that moves atime
    /// pushes the new one the same way). A push of another sandbox's change, a change that
    /// failed, a lock taken and a reconnection drop entries.
    attrs: Mutex<HashMap<u64, (Attr, Instant)>>,
    /// Files that came whole with their open (see `Op::Open`), by kernel handle, until its
    /// release: the kernel's reads of them are answered here. Dropped, like cached pages, when
    /// the file changes (a push, or a change through this mount).
    prefetched: Mutex<Prefetched>,
}

#[derive(Default)]
struct Prefetched {
    files: HashMap<u64, (u64, Arc<Vec<u8>>)>,
    bytes: usize,
}

/// The largest file asked for whole with its open (the host's `PREFETCH_MAX` bounds it too).
const PREFETCH: u32 = 128 << 10;
/// Most bytes held for prefetched files per mount: past it, opens do not ask.
const PREFETCH_BUDGET: usize = 32 << 20;

/// Most files remembered as cached-and-current (past it, the memory is cleared: the next
/// opens drop their pages, which is only slower).
const CLEAN_MAX: usize = 1 << 20;

/// Most inodes remembered as xattr-free (a bound on the guest's memory, not a tuning knob:
/// past it, entries are dropped and the host is asked).
const BARE_MAX: usize = 65536;

impl Invalidator {
    /// Starts the invalidation thread once the FUSE session (and so the notifier) exists.
    pub fn start(self: &Arc<Self>, notifier: fuser::Notifier, client: &MountClient) {
        let (tx, rx) = mpsc::channel::<Job>();
        let inline = notifier.clone();
        let me = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("vfs-notify".into())
            .spawn(move || {
                for job in rx {
                    match job {
                        Job::Notice(Notice::InvalInode { ino }) => {
                            let _ = notifier.inval_inode(INodeNo(ino), 0, 0);
                        }
                        Job::Notice(Notice::InvalEntry { parent, name }) => {
                            let _ = notifier.inval_entry(INodeNo(parent), OsStr::from_bytes(&name));
                        }
                        Job::Notice(Notice::LockFreed { .. }) => {}
                        Job::Notice(Notice::Attr { .. }) => {}
                        Job::Then(ino, then) => {
                            let _ = notifier.inval_inode(INodeNo(ino), 0, 0);
                            then();
                        }
                        Job::FlushAll => {
                            let Some(me) = me.upgrade() else { continue };
                            let (names, inodes) = {
                                let k = me.known.lock().unwrap();
                                (k.names.keys().cloned().collect::<Vec<_>>(), k.lookups.keys().copied().collect::<Vec<_>>())
                            };
                            for (parent, name) in names {
                                let _ = notifier.inval_entry(INodeNo(parent), OsStr::from_bytes(&name));
                            }
                            for ino in inodes.into_iter().chain([ROOT_INO]) {
                                let _ = notifier.inval_inode(INodeNo(ino), 0, 0);
                            }
                        }
                    }
                }
            })
            .expect("spawn notifier thread");
        *self.tx.lock().unwrap() = Some(tx);
        let me = self.clone();
        client.on_notice(move |n| match n {
            Notice::LockFreed { ino } => me.waits.freed(ino),
            // Only the attributes (atime moved): the pages stay, and so does what is known of
            // them; the new attributes answer the kernel's next getattr.
            Notice::Attr { attr } => {
                let ino = attr.ino;
                me.keep_attr(attr);
                let _ = inline.inval_inode(INodeNo(ino), -1, 0);
            }
            n => {
                match &n {
                    Notice::InvalInode { ino } => {
                        me.forget(*ino);
                        let _ = inline.inval_inode(INodeNo(*ino), -1, 0);
                    }
                    // The parent's own `InvalInode` follows; the child's link count may have moved.
                    Notice::InvalEntry { parent, name } => {
                        if let Some(child) = me.known.lock().unwrap().names.remove(&(*parent, name.clone())) {
                            me.attrs.lock().unwrap().remove(&child);
                        }
                    }
                    Notice::LockFreed { .. } | Notice::Attr { .. } => {}
                }
                me.send(Job::Notice(n));
            }
        });
        let me = self.clone();
        client.on_relink(move || me.flush_all());
    }

    /// After a reconnection: pushes sent while the link was down are lost, so everything the
    /// kernel holds from this mount (names, attributes, pages, what is known of xattrs) is
    /// dropped and asked for again. Negative entries are not listed anywhere; their TTL is short.
    pub fn flush_all(&self) {
        self.bare.lock().unwrap().clear();
        self.attrs.lock().unwrap().clear();
        self.clean.lock().unwrap().clear();
        self.send(Job::FlushAll);
    }

    /// The kernel was handed `name` in `parent` as `ino` (one more lookup of `ino`).
    fn entered(&self, parent: u64, name: Vec<u8>, ino: u64) {
        self.known.lock().unwrap().entered(parent, name, ino);
    }

    /// The kernel forgot `n` lookups of `ino`.
    fn forgotten(&self, ino: u64, n: u64) {
        self.known.lock().unwrap().forgotten(ino, n);
    }

    /// `name` is gone from `parent` (this mount removed it).
    fn removed(&self, parent: u64, name: &[u8]) {
        self.known.lock().unwrap().names.remove(&(parent, name.to_vec()));
    }

    /// This mount renamed an entry (or, with `exchange`, swapped two).
    fn renamed(&self, from: (u64, Vec<u8>), to: (u64, Vec<u8>), exchange: bool) {
        let mut k = self.known.lock().unwrap();
        let moved = k.names.remove(&from);
        let replaced = k.names.remove(&to);
        if let Some(ino) = moved {
            k.names.insert(to, ino);
        }
        if let (true, Some(ino)) = (exchange, replaced) {
            k.names.insert(from, ino);
        }
    }

    fn send(&self, job: Job) {
        let tx = self.tx.lock().unwrap();
        match (tx.as_ref(), job) {
            (Some(tx), job) => {
                if let Err(mpsc::SendError(Job::Then(_, then))) = tx.send(job) {
                    then();
                }
            }
            (None, Job::Then(_, then)) => then(),
            (None, Job::Notice(_) | Job::FlushAll) => {}
        }
    }

    /// Drops what the kernel caches of `ino` (attributes and pages), soon, on the invalidation
    /// thread.
    pub fn invalidate(&self, ino: u64) {
        self.forget(ino);
        self.send(Job::Notice(Notice::InvalInode { ino }));
    }

    /// Learns from attributes the host sent: them, and whether the inode has xattrs.
    fn note(&self, a: &Attr) {
        self.keep_attr(a.clone());
        let mut bare = self.bare.lock().unwrap();
        if a.xattrs {
            bare.remove(&a.ino);
            return;
        }
        if bare.len() >= BARE_MAX {
            let now = Instant::now();
            bare.retain(|_, until| *until > now);
            if bare.len() >= BARE_MAX {
                bare.clear();
            }
        }
        bare.insert(a.ino, Instant::now() + TTL);
    }

    fn forget(&self, ino: u64) {
        self.bare.lock().unwrap().remove(&ino);
        self.clean.lock().unwrap().remove(&ino);
        self.attrs.lock().unwrap().remove(&ino);
        self.unfetch(|i| i == ino);
    }

    /// Drops prefetched files whose inode `drop` picks.
    fn unfetch(&self, drop: impl Fn(u64) -> bool) {
        let mut p = self.prefetched.lock().unwrap();
        if p.files.is_empty() {
            return;
        }
        let mut freed = 0;
        p.files.retain(|_, (ino, data)| {
            let keep = !drop(*ino);
            if !keep {
                freed += data.len();
            }
            keep
        });
        p.bytes -= freed;
    }

    /// How much of a file to ask for with an open of `ino` for reading: nothing if the
    /// kernel's pages are known current (it will not read), or the budget is spent.
    fn prefetch_for(&self, ino: u64, generation: u64) -> u32 {
        let clean = self.clean.lock().unwrap().get(&ino) == Some(&generation);
        if clean || self.prefetched.lock().unwrap().bytes >= PREFETCH_BUDGET {
            0
        } else {
            PREFETCH
        }
    }

    fn fetched(&self, fh: u64, ino: u64, data: Vec<u8>) {
        let mut p = self.prefetched.lock().unwrap();
        p.bytes += data.len();
        if let Some((_, old)) = p.files.insert(fh, (ino, Arc::new(data))) {
            p.bytes -= old.len();
        }
    }

    fn prefetched(&self, fh: u64, ino: u64) -> Option<Arc<Vec<u8>>> {
        self.prefetched.lock().unwrap().files.get(&fh).filter(|(i, _)| *i == ino).map(|(_, d)| d.clone())
    }

    fn released(&self, fh: u64) {
        let mut p = self.prefetched.lock().unwrap();
        if let Some((_, data)) = p.files.remove(&fh) {
            p.bytes -= data.len();
        }
    }

    fn keep_attr(&self, a: Attr) {
        let mut attrs = self.attrs.lock().unwrap();
        if attrs.len() >= BARE_MAX {
            attrs.clear();
        }
        attrs.insert(a.ino, (a, Instant::now()));
    }

    /// The latest attributes of `ino`, if the host sent some within the TTL that nothing has
    /// made old since.
    fn cached_attr(&self, ino: u64) -> Option<Attr> {
        let attrs = self.attrs.lock().unwrap();
        let (a, at) = attrs.get(&ino)?;
        (at.elapsed() < TTL).then(|| a.clone())
    }

    /// The inodes whose attributes `op` changes, as far as this mount can name them. The host
    /// pushes their attributes after the change inside the change's transaction, so the push
    /// arrives before the answer and after any older one: nothing here needs forgetting, unless
    /// the change fails (see [`Invalidator::failed`]).
    fn changes(&self, op: &Op) -> [Option<u64>; 4] {
        // Locked only for the ops that name a child: this runs for every request.
        let by_name = |parent: &u64, name: &Vec<u8>| self.known.lock().unwrap().names.get(&(*parent, name.clone())).copied();
        match op {
            Op::SetAttr { ino, .. }
            | Op::Write { ino, .. }
            | Op::Fallocate { ino, .. }
            | Op::SetXattr { ino, .. }
            | Op::RemoveXattr { ino, .. }
            | Op::CopyFileRange { ino_out: ino, .. } => [Some(*ino), None, None, None],
            Op::MkNod { parent, .. } | Op::MkDir { parent, .. } | Op::Symlink { parent, .. } | Op::Create { parent, .. } => {
                [Some(*parent), None, None, None]
            }
            Op::Link { ino, new_parent, .. } => [Some(*ino), Some(*new_parent), None, None],
            Op::Unlink { parent, name } | Op::RmDir { parent, name } => [Some(*parent), by_name(parent, name), None, None],
            Op::Rename { parent, name, new_parent, new_name, .. } => {
                [Some(*parent), Some(*new_parent), by_name(parent, name), by_name(new_parent, new_name)]
            }
            Op::Lookup { .. }
            | Op::Forget { .. }
            | Op::GetAttr { .. }
            | Op::ReadLink { .. }
            | Op::Open { .. }
            | Op::Read { .. }
            | Op::Lseek { .. }
            | Op::Fsync { .. }
            | Op::Release { .. }
            | Op::OpenDir { .. }
            | Op::ReadDir { .. }
            | Op::ReleaseDir { .. }
            | Op::StatFs
            | Op::GetXattr { .. }
            | Op::ListXattr { .. }
            | Op::Renew
            | Op::Flush { .. }
            | Op::GetLk { .. }
            | Op::SetLk { .. }
            | Op::SetLkW { .. }
            | Op::ReclaimLocks { .. }
            | Op::ReleaseLease
            | Op::Unmounted => [None; 4],
        }
    }

    /// A change of these inodes failed: what was pushed while it ran may describe a
    /// transaction that did not commit.
    fn failed(&self, inodes: [Option<u64>; 4]) {
        let mut attrs = self.attrs.lock().unwrap();
        for ino in inodes.into_iter().flatten() {
            attrs.remove(&ino);
        }
    }

    /// At an open's reply: whether the kernel may keep the file's cached pages, and from now
    /// on they are current.
    fn keep_pages(&self, ino: u64, generation: u64) -> bool {
        let mut clean = self.clean.lock().unwrap();
        let keep = clean.get(&ino) == Some(&generation);
        if clean.len() >= CLEAN_MAX {
            clean.clear();
        }
        clean.insert(ino, generation);
        keep
    }

    /// Whether `ino` is known (within the TTL) to have no xattrs at all.
    fn is_bare(&self, ino: u64) -> bool {
        self.bare.lock().unwrap().get(&ino).is_some_and(|until| *until > Instant::now())
    }

    /// Drops what the kernel caches of `ino`, then runs `then`. Taking a lock is a coherence
    /// point (as on NFS): whatever another sandbox wrote before releasing the lock must be read
    /// from the host, not from pages cached before.
    pub fn invalidate_then(&self, ino: u64, then: impl FnOnce() + Send + 'static) {
        self.attrs.lock().unwrap().remove(&ino);
        self.send(Job::Then(ino, Box::new(then)));
    }
}

/// Asks the host for a lock that the caller does not wait for (F_SETLK, LOCK_NB, unlocks).
fn set_lock(client: &MountClient, inval: Arc<Invalidator>, who: Caller, ino: u64, lock: Lock, reply: ReplyEmpty) {
    client.call_async(
        who,
        Op::SetLk { ino, lock: lock.clone() },
        Box::new(move |r| match r {
            Ok(_) if lock.typ == libc::F_UNLCK => reply.ok(),
            Ok(_) => inval.invalidate_then(ino, move || reply.ok()),
            Err(e) => reply.error(errno(&e)),
        }),
    );
}

/// Longest pause between two tries of a waiting lock request: the host pushes `LockFreed`
/// when bytes are freed, so this only matters when a push was lost (a dropped connection) or
/// the host did not take this session's interest (its limit).
const WAIT_RETRY_MAX: Duration = Duration::from_millis(500);
/// How often a waiting request's process is checked for a signal.
const WAIT_CHECK: Duration = Duration::from_millis(40);

/// One waiting lock request (F_SETLKW, flock without LOCK_NB) between two tries.
struct Waiter {
    ino: u64,
    lock: Lock,
    who: Caller,
    /// The requesting thread, checked for pending signals.
    pid: u32,
    reply: ReplyEmpty,
    delay: Duration,
    due: std::time::Instant,
}

#[derive(Default)]
struct WaitState {
    parked: Vec<Waiter>,
    /// `LockFreed` pushes heard so far: a try answered `EAGAIN` after a push that arrived while
    /// it was in flight is tried again at once (the push may describe the very release it missed).
    freed: u64,
    /// Whether the waiting thread runs.
    running: bool,
}

/// Waiting lock requests. No FUSE thread and no host thread ever waits for a lock: a request
/// that conflicts is parked here and tried again when the host pushes `LockFreed` for its
/// inode (or after a backoff, as a fallback). Meanwhile one thread per mount checks each
/// waiting process for a signal, because fuser drops FUSE_INTERRUPT: a process that is
/// signalled (or killed, or gone) is answered `EINTR` (the kernel restarts the call if the
/// signal's handler asks for it), so a killed waiter dies and the mount can be unmounted.
#[derive(Default)]
pub struct LockWaits {
    state: Mutex<WaitState>,
    cv: Condvar,
}

impl LockWaits {
    /// A push: locks on `ino` were freed.
    fn freed(&self, ino: u64) {
        let mut st = self.state.lock().unwrap();
        st.freed += 1;
        let now = std::time::Instant::now();
        for w in st.parked.iter_mut().filter(|w| w.ino == ino) {
            w.due = now;
        }
        self.cv.notify_all();
    }

    /// Sends one try of a waiting request.
    fn attempt(self: &Arc<Self>, client: &Arc<MountClient>, inval: Arc<Invalidator>, mut w: Waiter) {
        let heard = self.state.lock().unwrap().freed;
        let (me, c) = (self.clone(), client.clone());
        let (who, ino, lock) = (w.who.clone(), w.ino, w.lock.clone());
        client.call_async(
            who,
            Op::SetLkW { ino, lock },
            Box::new(move |r| match r {
                Ok(_) => {
                    let reply = w.reply;
                    inval.invalidate_then(ino, move || reply.ok())
                }
                Err(e) if e.errno == libc::EAGAIN => {
                    let mut st = me.state.lock().unwrap();
                    let now = std::time::Instant::now();
                    w.due = if st.freed != heard { now } else { now + w.delay };
                    w.delay = (w.delay * 2).min(WAIT_RETRY_MAX);
                    st.parked.push(w);
                    if !st.running {
                        st.running = true;
                        let weak = Arc::downgrade(&me);
                        let (client, inval) = (Arc::downgrade(&c), Arc::downgrade(&inval));
                        let spawned = std::thread::Builder::new().name("vfs-lockwait".into()).spawn(move || wait_loop(weak, client, inval));
                        if spawned.is_err() {
                            st.running = false;
                            let w = st.parked.pop().expect("just parked");
                            drop(st);
                            w.reply.error(Errno::ENOLCK);
                            return;
                        }
                    }
                    me.cv.notify_all();
                }
                Err(e) => w.reply.error(errno(&e)),
            }),
        );
    }
}

/// Whether the thread `pid` has a signal pending that it does not block, or is gone: then the
/// request it waits in must end (with EINTR) so that the signal can be delivered.
fn interrupted(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return true };
    let mask =
        |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| u64::from_str_radix(v.trim(), 16).ok()).unwrap_or(0);
    let gone = status.lines().any(|l| l.starts_with("State:") && (l.contains("zombie") || l.contains("dead")));
    gone || (mask("SigPnd:") | mask("ShdPnd:")) & !mask("SigBlk:") != 0
}

/// The waiting thread of one mount: answers interrupted waiters with EINTR and tries again
/// those that are due. Ends when the mount is gone or nothing waits.
fn wait_loop(waits: std::sync::Weak<LockWaits>, client: std::sync::Weak<MountClient>, inval: std::sync::Weak<Invalidator>) {
    loop {
        let (Some(me), Some(client), Some(inval)) = (waits.upgrade(), client.upgrade(), inval.upgrade()) else { return };
        let (gone, due) = {
            let mut st = me.state.lock().unwrap();
            if st.parked.is_empty() {
                let (g, _) = me.cv.wait_timeout(st, Duration::from_secs(5)).unwrap();
                st = g;
                if st.parked.is_empty() {
                    st.running = false;
                    return;
                }
            }
            let now = std::time::Instant::now();
            let (gone, rest): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut st.parked).into_iter().partition(|w| interrupted(w.pid));
            let (due, rest): (Vec<Waiter>, Vec<Waiter>) = rest.into_iter().partition(|w| w.due <= now);
            st.parked = rest;
            (gone, due)
        };
        for w in gone {
            tracing::debug!(pid = w.pid, ino = w.ino, "lock wait interrupted by a signal");
            w.reply.error(Errno::EINTR);
        }
        for w in due {
            me.attempt(&client, inval.clone(), w);
        }
        let st = me.state.lock().unwrap();
        let now = std::time::Instant::now();
        let next = st.parked.iter().map(|w| w.due.saturating_duration_since(now)).min().unwrap_or(WAIT_CHECK).min(WAIT_CHECK);
        drop(me.cv.wait_timeout(st, next).unwrap());
    }
}

impl Filesystem for VolumeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let wanted = InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_BIG_WRITES
            // Every listing carries attributes (no READDIRPLUS_AUTO, which switches to plain
            // listings when it sees no lookups in between): the names come with what a later
            // lookup or stat would ask for, at the price of a bigger reply.
            | InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_AUTO_INVAL_DATA
            | InitFlags::FUSE_MAX_PAGES
            | InitFlags::FUSE_POSIX_LOCKS
            | InitFlags::FUSE_FLOCK_LOCKS
            // name_to_handle_at / open_by_handle_at: the kernel finds an inode by number with a
            // lookup of "." in it (and a directory's parent with ".."); inode numbers are stable.
            | InitFlags::FUSE_EXPORT_SUPPORT
            // mmap keeps working on descriptors opened with O_APPEND (direct I/O, see open_flags).
            | InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP
            // POSIX ACLs: the kernel reads them (getxattr system.posix_acl_*) for its own
            // permission check and sends setfacl as setxattr. With them it no longer applies the
            // umask itself; DONT_MASK makes sure nothing in the kernel does: create, mkdir and
            // mknod carry mode and umask, and the host applies the umask only when the directory
            // has no default ACL (which replaces it). The host checks ACLs on every request anyway.
            | InitFlags::FUSE_POSIX_ACL
            | InitFlags::FUSE_DONT_MASK;
        // No FUSE_WRITEBACK_CACHE: with it the kernel trusts its own size and times of regular
        // files and ignores the host's, so a file grown or truncated by another sandbox would
        // keep its old size here (and SQLite on a shared volume corrupts). Writes are
        // write-through, up to 1 MiB per request; reads still use the page cache.
        for flag in wanted.iter() {
            let _ = config.add_capabilities(flag);
        }
        let _ = config.set_max_write(MAX_IO).or_else(|max| config.set_max_write(max));
        let _ = config.set_max_readahead(MAX_IO).or_else(|max| config.set_max_readahead(max));
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let done = entry_reply(reply, &self.invalidator, parent.0, name, true);
        self.send(req, Op::Lookup { parent: parent.0, name: name.as_bytes().to_vec() }, done);
    }

    fn forget(&self, req: &Request, ino: INodeNo, nlookup: u64) {
        self.forget_all(req, &[(ino.0, nlookup)]);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if let Some(a) = self.invalidator.cached_attr(ino.0) {
            return reply.attr(&TTL, &attr(&a));
        }
        self.send(req, Op::GetAttr { ino: ino.0 }, attr_reply(reply, &self.invalidator));
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr { mode, uid, gid, size, atime: atime.map(set_time), mtime: mtime.map(set_time) };
        self.send(req, Op::SetAttr { ino: ino.0, set }, attr_reply(reply, &self.invalidator));
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        self.send(req, Op::ReadLink { ino: ino.0 }, move |r| match r {
            Ok(Reply::Data(d)) => reply.data(&d),
            Ok(other) => reply.error(unexpected(other)),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let op = Op::MkNod { parent: parent.0, name: name.as_bytes().to_vec(), mode, umask, rdev };
        self.send(req, op, entry_reply(reply, &self.invalidator, parent.0, name, false));
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let done = entry_reply(reply, &self.invalidator, parent.0, name, false);
        self.send(req, Op::MkDir { parent: parent.0, name: name.as_bytes().to_vec(), mode, umask }, done);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.send(req, Op::Unlink { parent: parent.0, name: name.as_bytes().to_vec() }, self.removal(parent.0, name, reply));
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.send(req, Op::RmDir { parent: parent.0, name: name.as_bytes().to_vec() }, self.removal(parent.0, name, reply));
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let op = Op::Symlink { parent: parent.0, name: link_name.as_bytes().to_vec(), target: target.as_os_str().as_bytes().to_vec() };
        self.send(req, op, entry_reply(reply, &self.invalidator, parent.0, link_name, false));
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let op = Op::Rename {
            parent: parent.0,
            name: name.as_bytes().to_vec(),
            new_parent: newparent.0,
            new_name: newname.as_bytes().to_vec(),
            flags: flags.bits(),
        };
        let inv = self.invalidator.clone();
        let (from, to) = ((parent.0, name.as_bytes().to_vec()), (newparent.0, newname.as_bytes().to_vec()));
        let exchange = flags.bits() & libc::RENAME_EXCHANGE != 0;
        self.send(req, op, move |r| {
            if r.is_ok() {
                inv.renamed(from, to, exchange);
            }
            empty_reply(reply)(r)
        });
    }

    fn link(&self, req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let op = Op::Link { ino: ino.0, new_parent: newparent.0, new_name: newname.as_bytes().to_vec() };
        self.send(req, op, entry_reply(reply, &self.invalidator, newparent.0, newname, false));
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // Close-to-open: the pages are kept only when nothing has changed the file since this
        // mount last opened it (see Invalidator::clean).
        // A small file opened for reading whose pages the kernel lacks comes whole with the
        // answer: its reads need no round trip each (see `Op::Open`).
        let (inv, client) = (self.invalidator.clone(), self.client.clone());
        let direct = open_flags(flags.0);
        let plain_read = flags.0 & libc::O_ACCMODE == libc::O_RDONLY && flags.0 & libc::O_DIRECT == 0 && direct.is_empty();
        let prefetch = if plain_read { inv.prefetch_for(ino.0, client.link_generation()) } else { 0 };
        self.send(req, Op::Open { ino: ino.0, flags: flags.0, prefetch }, move |r| {
            let (fh, data) = match r {
                Ok(Reply::Opened { fh }) => (fh, None),
                Ok(Reply::OpenedWith { fh, data }) => (fh, Some(data)),
                Ok(other) => return reply.error(unexpected(other)),
                Err(e) => return reply.error(errno(&e)),
            };
            let keep = direct.is_empty() && inv.keep_pages(ino.0, client.link_generation());
            if let Some(data) = data {
                inv.fetched(fh, ino.0, data);
            }
            reply.opened(FileHandle(fh), if keep { FopenFlags::FOPEN_KEEP_CACHE } else { direct })
        });
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if let Some(data) = self.invalidator.prefetched(fh.0, ino.0) {
            // The whole file as it was at the open: a read past its end is the end of file.
            let start = (offset as usize).min(data.len());
            let end = start.saturating_add(size as usize).min(data.len());
            return reply.data(&data[start..end]);
        }
        self.send(req, Op::Read { ino: ino.0, fh: fh.0, offset, size }, move |r| match r {
            Ok(Reply::Data(d)) => reply.data(&d),
            Ok(other) => reply.error(unexpected(other)),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // The kernel placed an O_APPEND write at its cached idea of the file's size, which may be
        // stale (another sandbox appended since); the host places it at its own end of file.
        let append = flags.0 & libc::O_APPEND != 0;
        let inval = append.then(|| self.invalidator.clone());
        if self.client.holds_writes() {
            self.written.lock().unwrap().insert((ino.0, req.pid()));
        }
        self.send(req, Op::Write { ino: ino.0, fh: fh.0, offset, append, data: data.to_vec() }, move |r| match r {
            Ok(Reply::Written(n)) => reply.written(n),
            Ok(Reply::Appended { written, .. }) => {
                reply.written(written);
                // The kernel's size and any pages it filled are at its guess: drop them, so the
                // next stat or read asks the host. After the reply: the write holds page locks.
                if let Some(inval) = inval {
                    inval.invalidate(ino.0);
                }
            }
            Ok(other) => reply.error(unexpected(other)),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn fallocate(&self, req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, length: u64, mode: i32, reply: ReplyEmpty) {
        self.send(req, Op::Fallocate { ino: ino.0, fh: fh.0, offset, length, mode }, empty_reply(reply));
    }

    fn lseek(&self, req: &Request, ino: INodeNo, fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        let Ok(offset) = u64::try_from(offset) else { return reply.error(Errno::ENXIO) };
        self.send(req, Op::Lseek { ino: ino.0, fh: fh.0, offset, whence }, move |r| match r {
            Ok(Reply::Offset(at)) => reply.offset(at as i64),
            Ok(other) => reply.error(unexpected(other)),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let op = Op::CopyFileRange { ino_in: ino_in.0, fh_in: fh_in.0, offset_in, ino_out: ino_out.0, fh_out: fh_out.0, offset_out, len };
        self.send(req, op, move |r| match r {
            Ok(Reply::Written(n)) => reply.written(n),
            Ok(other) => reply.error(unexpected(other)),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn flush(&self, req: &Request, ino: INodeNo, fh: FileHandle, lock_owner: LockOwner, reply: ReplyEmpty) {
        // Closing a descriptor drops its process's POSIX locks, and has the host send up what
        // it held back of the file's writes (they reached the host synchronously).
        if let Some(owners) = self.owners.lock().unwrap().get_mut(&fh.0) {
            owners.remove(&lock_owner.0);
        }
        let locked = self.locked.lock().unwrap().remove(&(ino.0, lock_owner.0));
        let written = self.written.lock().unwrap().remove(&(ino.0, req.pid()));
        if !locked && !written {
            return reply.ok();
        }
        self.send(req, Op::Flush { ino: ino.0, fh: fh.0, lock_owner: lock_owner.0 }, empty_reply(reply));
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // The open file description is gone: so are the locks it owned (OFD locks; flock's
        // owner is the same and comes as `lock` too). Sent before the release, which ends
        // the handle they name.
        self.invalidator.released(fh.0);
        self.written.lock().unwrap().retain(|(i, _)| *i != ino.0);
        let owners = self.owners.lock().unwrap().remove(&fh.0).unwrap_or_default();
        let locked = !owners.is_empty() || lock.is_some_and(|l| self.locked.lock().unwrap().contains(&(ino.0, l.0)));
        for owner in owners.into_iter().filter(|o| Some(*o) != lock.map(|l| l.0)) {
            self.client.call_async(caller(req), Op::Flush { ino: ino.0, fh: fh.0, lock_owner: owner }, Box::new(|_| {}));
        }
        let op = Op::Release { ino: ino.0, fh: fh.0, lock_owner: lock.map(|l| l.0) };
        if locked {
            // Whoever waits for these locks must find them free once close() returns.
            return self.send(req, op, empty_reply(reply));
        }
        // Nothing else waits for a release without locks (writes reached the host before it):
        // close() returns now and the host hears of it in the background.
        reply.ok();
        self.send(req, op, |_| {});
    }

    fn getlk(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let lock = Lock { owner: lock_owner.0, start, end, typ, pid };
        self.send(req, Op::GetLk { ino: ino.0, lock }, move |r| match r {
            Ok(Reply::Lock(l)) => reply.locked(l.start, l.end, l.typ, l.pid),
            Ok(other) => reply.error(unexpected(other)),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let lock = Lock { owner: lock_owner.0, start, end, typ, pid };
        self.locked.lock().unwrap().insert((ino.0, lock_owner.0));
        self.owners.lock().unwrap().entry(fh.0).or_default().insert(lock_owner.0);
        let inval = self.invalidator.clone();
        if sleep && typ != libc::F_UNLCK {
            let w = Waiter {
                ino: ino.0,
                lock,
                who: caller(req),
                pid: req.pid(),
                reply,
                delay: Duration::from_millis(5),
                due: std::time::Instant::now(),
            };
            inval.waits.clone().attempt(&self.client, inval.clone(), w);
        } else {
            set_lock(&self.client, inval, caller(req), ino.0, lock, reply);
        }
    }

    fn fsync(&self, req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        self.send(req, Op::Fsync { ino: ino.0, fh: fh.0, datasync }, empty_reply(reply));
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // The kernel caches the listing with the directory's pages (FOPEN_CACHE_DIR) and keeps
        // it across opens while nothing changed it, by the rule of `open` (a change made
        // through this mount drops it in the kernel itself; one made elsewhere is pushed).
        let (inv, client) = (self.invalidator.clone(), self.client.clone());
        self.send(req, Op::OpenDir { ino: ino.0 }, move |r| match r {
            Ok(Reply::Opened { fh }) => {
                let keep = inv.keep_pages(ino.0, client.link_generation());
                let flags = if keep { FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::FOPEN_CACHE_DIR };
                reply.opened(FileHandle(fh), flags)
            }
            Ok(other) => reply.error(unexpected(other)),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn readdir(&self, req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let op = Op::ReadDir { ino: ino.0, fh: fh.0, cookie: offset, plus: false, max_entries: DIR_BATCH };
        self.send(req, op, move |r| match r {
            Ok(Reply::Dir(entries)) => {
                for d in entries {
                    if reply.add(INodeNo(d.ino), d.cookie, kind(d.kind), OsStr::from_bytes(&d.name)) {
                        break;
                    }
                }
                reply.ok();
            }
            Ok(other) => reply.error(unexpected(other)),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn readdirplus(&self, req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let op = Op::ReadDir { ino: ino.0, fh: fh.0, cookie: offset, plus: true, max_entries: DIR_BATCH };
        let client = self.client.clone();
        let inv = self.invalidator.clone();
        let who = caller(req);
        self.send(req, op, move |r| match r {
            Ok(Reply::Dir(entries)) => {
                let mut unsent = Vec::new();
                let mut full = false;
                for d in entries {
                    let dots = d.name == b"." || d.name == b"..";
                    let Some(a) = d.attr.as_ref() else { continue };
                    if !dots {
                        inv.note(a);
                    }
                    if !full && reply.add(INodeNo(d.ino), d.cookie, OsStr::from_bytes(&d.name), &TTL, &attr(a), Generation(0)) {
                        full = true;
                    }
                    if !full && !dots {
                        inv.entered(ino.0, d.name.clone(), d.ino);
                    }
                    if full && !dots {
                        // The host counted this entry as looked up, but the kernel never saw it.
                        unsent.push((d.ino, 1));
                    }
                }
                reply.ok();
                if !unsent.is_empty() {
                    client.call_async(who, Op::Forget { items: unsent }, Box::new(|_| {}));
                }
            }
            Ok(other) => reply.error(unexpected(other)),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn releasedir(&self, req: &Request, ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.send(req, Op::ReleaseDir { ino: ino.0, fh: fh.0 }, empty_reply(reply));
    }

    fn fsyncdir(&self, req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        self.send(req, Op::Fsync { ino: ino.0, fh: fh.0, datasync }, empty_reply(reply));
    }

    fn statfs(&self, req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.send(req, Op::StatFs, move |r| match r {
            Ok(Reply::StatFs(s)) => reply.statfs(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize),
            Ok(other) => reply.error(unexpected(other)),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn setxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, value: &[u8], flags: i32, _position: u32, reply: ReplyEmpty) {
        let op = Op::SetXattr { ino: ino.0, name: name.as_bytes().to_vec(), value: value.to_vec(), flags };
        // Forgotten before and after: an attribute reply racing with this one may have said
        // "none" again meanwhile.
        self.invalidator.forget(ino.0);
        self.send(req, op, self.xattr_changed(ino.0, name, reply));
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        // An inode without xattrs has none of a namespace the host serves: ENODATA, as the host
        // would say (the kernel has checked the caller's permission to ask already).
        let served = [&b"user."[..], b"trusted.", b"security.", b"system.posix_acl_access", b"system.posix_acl_default"];
        if self.invalidator.is_bare(ino.0) && served.iter().any(|p| name.as_bytes().starts_with(p)) {
            return reply.error(Errno::NO_XATTR);
        }
        self.send(req, Op::GetXattr { ino: ino.0, name: name.as_bytes().to_vec() }, xattr_reply(reply, size));
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if self.invalidator.is_bare(ino.0) {
            return if size == 0 { reply.size(0) } else { reply.data(&[]) };
        }
        self.send(req, Op::ListXattr { ino: ino.0 }, xattr_reply(reply, size));
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.invalidator.forget(ino.0);
        self.send(req, Op::RemoveXattr { ino: ino.0, name: name.as_bytes().to_vec() }, self.xattr_changed(ino.0, name, reply));
    }

    fn create(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, flags: i32, reply: ReplyCreate) {
        let op = Op::Create { parent: parent.0, name: name.as_bytes().to_vec(), mode, umask, flags };
        let inv = self.invalidator.clone();
        let name = name.as_bytes().to_vec();
        self.send(req, op, move |r| match r {
            Ok(Reply::Created { attr: a, fh }) => {
                inv.note(&a);
                inv.entered(parent.0, name, a.ino);
                reply.created(&TTL, &attr(&a), Generation(0), FileHandle(fh), open_flags(flags))
            }
            Ok(other) => reply.error(unexpected(other)),
            Err(e) => reply.error(errno(&e)),
        });
    }
}

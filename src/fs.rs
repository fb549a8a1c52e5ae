//! The filesystem vocabulary shared by the engine, the wire protocol and the FUSE adapter.
//!
//! Everything here is plain data: inode attributes, file kinds, timestamps with nanoseconds,
//! the caller's credentials and one error type that carries an errno plus a sentence a person can
//! act on. Errors become an errno in exactly one place per boundary (FUSE reply, HTTP status).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A volume-local inode number. Stable for the life of the inode, across server restarts and
/// guest reconnects. The root directory of every volume is [`ROOT_INO`].
pub type Ino = u64;
pub const ROOT_INO: Ino = 1;

/// Longest file name, in bytes (as Linux `NAME_MAX`).
pub const NAME_MAX: usize = 255;
/// Longest symlink target, in bytes.
pub const SYMLINK_MAX: usize = 4095;
/// Longest extended attribute name and value (as Linux `XATTR_NAME_MAX` / `XATTR_SIZE_MAX`).
pub const XATTR_NAME_MAX: usize = 255;
pub const XATTR_SIZE_MAX: usize = 65536;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl Kind {
    /// The kind named by the `S_IFMT` bits of a mode; `S_IFMT == 0` means a regular file, as
    /// mknod(2) does.
    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & libc::S_IFMT {
            0 | libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => return None,
        })
    }

    pub fn mode_bits(self) -> u32 {
        match self {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
            Kind::CharDev => libc::S_IFCHR,
            Kind::BlockDev => libc::S_IFBLK,
        }
    }

    /// Stable small code used by the metadata stores.
    pub fn code(self) -> i64 {
        match self {
            Kind::File => 1,
            Kind::Dir => 2,
            Kind::Symlink => 3,
            Kind::Fifo => 4,
            Kind::Socket => 5,
            Kind::CharDev => 6,
            Kind::BlockDev => 7,
        }
    }

    pub fn from_code(code: i64) -> Option<Kind> {
        Some(match code {
            1 => Kind::File,
            2 => Kind::Dir,
            3 => Kind::Symlink,
            4 => Kind::Fifo,
            5 => Kind::Socket,
            6 => Kind::CharDev,
            7 => Kind::BlockDev,
            _ => return None,
        })
    }
}

/// Seconds and nanoseconds since the Unix epoch (seconds may be negative).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

/// Calendar date and time of day, UTC, of seconds since the epoch: `(year, month, day, hour,
/// minute, second)` (days to a civil date by Howard Hinnant's algorithm).
pub fn utc_parts(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let t = secs.rem_euclid(86_400) as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d, t / 3600, t / 60 % 60, t % 60)
}

impl Timespec {
    pub fn now() -> Timespec {
        Timespec::from_system_time(SystemTime::now())
    }

    pub fn from_system_time(t: SystemTime) -> Timespec {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timespec { sec: d.as_secs() as i64, nsec: d.subsec_nanos() },
            Err(e) => {
                let d = e.duration();
                let (mut sec, mut nsec) = (-(d.as_secs() as i64), d.subsec_nanos());
                if nsec > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                Timespec { sec, nsec }
            }
        }
    }

    pub fn to_system_time(self) -> SystemTime {
        if self.sec >= 0 {
            UNIX_EPOCH + Duration::new(self.sec as u64, self.nsec)
        } else {
            UNIX_EPOCH - Duration::from_secs(self.sec.unsigned_abs()) + Duration::from_nanos(self.nsec as u64)
        }
    }

    /// The instant `d` before this one.
    pub fn minus(self, d: std::time::Duration) -> Timespec {
        Timespec::from_nanos(self.to_nanos().saturating_sub(d.as_nanos().min(i64::MAX as u128) as i64))
    }

    /// Packed as nanoseconds in an i64 for storage (covers 1678–2262).
    pub fn to_nanos(self) -> i64 {
        self.sec.saturating_mul(1_000_000_000).saturating_add(self.nsec as i64)
    }

    pub fn from_nanos(n: i64) -> Timespec {
        Timespec { sec: n.div_euclid(1_000_000_000), nsec: n.rem_euclid(1_000_000_000) as u32 }
    }
}

/// Attributes of one inode, as `stat(2)` reports them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
    pub perm: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Bytes the volume stores for a regular file: those its writes and preallocations cover.
    /// Holes cost nothing, so this may be less than `size` (a sparse file) or more (space
    /// preallocated past the end with `FALLOC_FL_KEEP_SIZE`). 0 for anything else.
    pub alloc: u64,
    /// Whether the inode has any extended attribute: a guest answers lookups of absent ones
    /// (every `ls -l` asks for `security.selinux`) without a round trip while this is false.
    pub xattrs: bool,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub rdev: u32,
    /// Which POSIX ACLs the inode has ([`ACL_ACCESS`], [`ACL_DEFAULT`]; 0 for none, the common
    /// case): permission checks read the ACL itself only when the mark says there is one.
    pub acl: u8,
}

/// [`Attr::acl`]: the inode has an access ACL (`system.posix_acl_access`).
pub const ACL_ACCESS: u8 = 1;
/// [`Attr::acl`]: the directory has a default ACL (`system.posix_acl_default`).
pub const ACL_DEFAULT: u8 = 2;

impl Attr {
    /// 512-byte blocks, as `st_blocks` counts them.
    pub fn blocks(&self) -> u64 {
        match self.kind {
            Kind::File => self.alloc.div_ceil(512),
            Kind::Dir | Kind::Symlink | Kind::Fifo | Kind::Socket | Kind::CharDev | Kind::BlockDev => self.size.div_ceil(512),
        }
    }

    /// Bytes of the volume's cap this inode's contents take: a file's stored bytes, a symlink's
    /// target (xattrs are counted apart).
    pub fn stored(&self) -> u64 {
        match self.kind {
            Kind::File => self.alloc,
            Kind::Symlink => self.size,
            Kind::Dir | Kind::Fifo | Kind::Socket | Kind::CharDev | Kind::BlockDev => 0,
        }
    }

    pub fn mode(&self) -> u32 {
        self.kind.mode_bits() | (self.perm & 0o7777)
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    Now,
    At(Timespec),
}

/// A `setattr` request: each field that is `Some` is changed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// Who is asking: the credentials of the process in the guest that made the request. They are
/// used for POSIX permission semantics (a guest may be root and lie; security is enforced by the
/// attachment's scope on the host, not by these).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Caller {
    pub fn root() -> Caller {
        Caller { uid: 0, gid: 0, groups: Vec::new() }
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// One directory entry. `cookie` is the position to resume listing after this entry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: Ino,
    pub kind: Kind,
    pub cookie: u64,
    pub attr: Option<Attr>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// Flags of `rename`, as in renameat2(2).
pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;
pub const RENAME_WHITEOUT: u32 = 4;

/// The most bytes one copy_file_range request copies (the call may copy less than asked;
/// callers loop): one request holds the volume's metadata transaction that long.
pub const COPY_MAX: u64 = 8 << 20;

/// Flags of `setxattr`.
pub const XATTR_CREATE: i32 = 1;
pub const XATTR_REPLACE: i32 = 2;

/// An error with the errno the caller will see and a sentence that says what went wrong.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FsError {
    pub errno: i32,
    pub msg: String,
}

pub type FsResult<T> = Result<T, FsError>;

impl FsError {
    pub fn new(errno: i32, msg: impl Into<String>) -> FsError {
        FsError { errno, msg: msg.into() }
    }

    pub fn errno_name(&self) -> &'static str {
        errno_name(self.errno)
    }
}

impl fmt::Display for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.msg, self.errno_name())
    }
}

impl std::error::Error for FsError {}

impl From<std::io::Error> for FsError {
    fn from(e: std::io::Error) -> FsError {
        FsError::new(e.raw_os_error().unwrap_or(libc::EIO), e.to_string())
    }
}

pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOVERFLOW => "EOVERFLOW",
        libc::ENOTSUP => "ENOTSUP",
        libc::ESTALE => "ESTALE",
        libc::EDQUOT => "EDQUOT",
        libc::E2BIG => "E2BIG",
        libc::ENOTCONN => "ENOTCONN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EPROTO => "EPROTO",
        libc::ENOLCK => "ENOLCK",
        libc::EMFILE => "EMFILE",
        libc::ENFILE => "ENFILE",
        _ => "errno",
    }
}

/// Checks one path component received from anywhere (guest, HTTP, CLI).
pub fn check_name(name: &[u8]) -> FsResult<()> {
    if name.is_empty() || name == b"." || name == b".." {
        return Err(FsError::new(libc::EINVAL, format!("invalid file name {:?}", String::from_utf8_lossy(name))));
    }
    if name.len() > NAME_MAX {
        return Err(FsError::new(libc::ENAMETOOLONG, format!("file name longer than {NAME_MAX} bytes")));
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err(FsError::new(libc::EINVAL, "file name contains '/' or NUL"));
    }
    Ok(())
}

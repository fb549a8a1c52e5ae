//! The guest ⇄ host wire protocol.
//!
//! A connection carries frames: a `u32` little-endian body length, then a bincode-2 body. A body
//! longer than [`MAX_FRAME`] or one that does not decode is a protocol violation: the receiver
//! closes that one connection and nothing else.
//!
//! The first frame from the guest is a [`Hello`]; the server answers with a [`Welcome`] that says
//! what this connection may do. The guest never chooses its volume, mode or subpath: the listener
//! the connection arrived on names the sandbox, and the server looks the rest up.
//!
//! After that the guest sends [`Request`]s, each with its own id; many may be in flight and the
//! server answers with [`ServerMsg::Reply`] in any order. The server may also push
//! [`ServerMsg::Notify`] at any time (cache invalidations), on the same connection, in order with
//! the replies: an invalidation pushed before a reply is seen before that reply.
//!
//! Inode numbers on a mount connection are the volume's own, except that the mount's root (the
//! attachment's subpath directory) is always [`crate::fs::ROOT_INO`], which is what FUSE expects.
//!
//! Mutating requests carry a per-session sequence number `seq` (non-zero) so that a request
//! replayed after a reconnect is recognised and answered from the server's record instead of
//! being applied twice.

use crate::fs::{Attr, Caller, DirEntry, FsError, Ino, SetAttr, StatFs};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

/// Protocol version spoken by this build. The server accepts exactly the versions it knows.
pub const PROTOCOL_VERSION: u32 = 6;

/// Largest read or write carried by one request (the FUSE max_write / max_read).
pub const MAX_IO: u32 = 1 << 20;

/// Largest frame body either side accepts: one maximal write plus generous headroom.
pub const MAX_FRAME: usize = MAX_IO as usize + (64 << 10);

/// The guest's first frame on every connection.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub role: Role,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The agent asking which attachments its sandbox has.
    Control,
    /// One mount: the attachment at `path` in this sandbox. `resume` names the session this
    /// guest held before a reconnect (or, in a forked VM, the parent's session) so that its
    /// open handles, inode references and replay record carry over.
    Mount { path: String, resume: Option<u64> },
}

/// What an attachment is, as the guest needs to know it to mount it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct AttachmentSpec {
    pub id: u64,
    pub volume: String,
    pub path: String,
    pub read_only: bool,
    pub subpath: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Welcome {
    Control {
        sandbox: String,
        attachments: Vec<AttachmentSpec>,
    },
    /// `holds_writes`: the server holds this mount's writes back (a block store, see
    /// `engine::buffer`), so the guest asks for them to go up when the writer closes the file.
    Mount {
        session: u64,
        attachment: u64,
        read_only: bool,
        volume: String,
        lease_ttl_ms: u64,
        holds_writes: bool,
    },
    Refused(FsError),
}

/// One request from the guest.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: u64,
    /// Non-zero on mutating requests: this session's sequence number for exactly-once replay.
    pub seq: u64,
    pub caller: Caller,
    pub op: Op,
}

/// Filesystem operations, shaped after FUSE / 9P2000.L. Names are raw bytes.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Lookup {
        parent: Ino,
        name: Vec<u8>,
    },
    /// Batched forget: (inode, number of lookups to drop).
    Forget {
        items: Vec<(Ino, u64)>,
    },
    GetAttr {
        ino: Ino,
    },
    SetAttr {
        ino: Ino,
        set: SetAttr,
    },
    ReadLink {
        ino: Ino,
    },
    MkNod {
        parent: Ino,
        name: Vec<u8>,
        mode: u32,
        umask: u32,
        rdev: u32,
    },
    MkDir {
        parent: Ino,
        name: Vec<u8>,
        mode: u32,
        umask: u32,
    },
    Symlink {
        parent: Ino,
        name: Vec<u8>,
        target: Vec<u8>,
    },
    Link {
        ino: Ino,
        new_parent: Ino,
        new_name: Vec<u8>,
    },
    Unlink {
        parent: Ino,
        name: Vec<u8>,
    },
    RmDir {
        parent: Ino,
        name: Vec<u8>,
    },
    Rename {
        parent: Ino,
        name: Vec<u8>,
        new_parent: Ino,
        new_name: Vec<u8>,
        flags: u32,
    },
    Open {
        ino: Ino,
        flags: i32,
        /// With a number above 0: a regular file of at most that many bytes comes whole with
        /// the answer ([`Reply::OpenedWith`], as a read from offset 0 would return it), so the
        /// guest answers the kernel's reads of it without a round trip each.
        prefetch: u32,
    },
    Create {
        parent: Ino,
        name: Vec<u8>,
        mode: u32,
        umask: u32,
        flags: i32,
    },
    Read {
        ino: Ino,
        fh: u64,
        offset: u64,
        size: u32,
    },
    /// Writes `data` at `offset`, or, with `append` (the file was opened with `O_APPEND`), at the
    /// host's end of file, placed in the same transaction that extends the size: appends from
    /// any number of sandboxes never overwrite one another. `offset` is then only the guest
    /// kernel's guess and is ignored.
    Write {
        ino: Ino,
        fh: u64,
        offset: u64,
        append: bool,
        #[serde(with = "bytes")]
        data: Vec<u8>,
    },
    /// fallocate(2): `mode` 0 (preallocate, growing the file), with `FALLOC_FL_KEEP_SIZE`,
    /// `FALLOC_FL_PUNCH_HOLE` (with KEEP_SIZE) or `FALLOC_FL_ZERO_RANGE`.
    Fallocate {
        ino: Ino,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    },
    /// lseek(2) with `SEEK_DATA` or `SEEK_HOLE`: answered with [`Reply::Offset`].
    Lseek {
        ino: Ino,
        fh: u64,
        offset: u64,
        whence: i32,
    },
    /// copy_file_range(2), done on the host: no data crosses the connection. Copies at most
    /// [`crate::fs::COPY_MAX`] bytes (fewer at the source's end of file), answered with [`Reply::Written`].
    CopyFileRange {
        ino_in: Ino,
        fh_in: u64,
        offset_in: u64,
        ino_out: Ino,
        fh_out: u64,
        offset_out: u64,
        len: u64,
    },
    Fsync {
        ino: Ino,
        fh: u64,
        datasync: bool,
    },
    /// Closes a handle; `lock_owner` is set when flock locks of that owner must go too.
    Release {
        ino: Ino,
        fh: u64,
        lock_owner: Option<u64>,
    },
    OpenDir {
        ino: Ino,
    },
    /// Entries after `cookie`; `plus` asks for attributes too (and counts as a lookup of each).
    ReadDir {
        ino: Ino,
        fh: u64,
        cookie: u64,
        plus: bool,
        max_entries: u32,
    },
    ReleaseDir {
        ino: Ino,
        fh: u64,
    },
    StatFs,
    SetXattr {
        ino: Ino,
        name: Vec<u8>,
        value: Vec<u8>,
        flags: i32,
    },
    GetXattr {
        ino: Ino,
        name: Vec<u8>,
    },
    ListXattr {
        ino: Ino,
    },
    RemoveXattr {
        ino: Ino,
        name: Vec<u8>,
    },
    /// Keep this session's lease alive.
    Renew,
    /// Give the lease up (hibernation): the session is kept for a later resume, and the
    /// server closes the connection after answering.
    ReleaseLease,
    /// Release POSIX locks of `lock_owner` on `ino` (close of a descriptor).
    Flush {
        ino: Ino,
        fh: u64,
        lock_owner: u64,
    },
    /// The first lock that would conflict with `lock`, if any.
    GetLk {
        ino: Ino,
        lock: Lock,
    },
    /// Takes or releases a byte-range lock; never blocks (the guest retries on `EAGAIN`).
    SetLk {
        ino: Ino,
        lock: Lock,
    },
    /// The guest's kernel no longer has this mount (it was unmounted inside the guest): the
    /// host ends the session (locks and handles go), records the attachment as `released`, and
    /// closes the connection after answering. Ends only the session it is sent on.
    Unmounted,
    /// [`Op::SetLk`] for a guest that will wait (F_SETLKW, flock without LOCK_NB): it never
    /// blocks either, but on `EAGAIN` the host remembers that this session waits on `ino` and
    /// pushes [`Notice::LockFreed`] when a lock there is released or downgraded, so the guest
    /// retries at once instead of polling.
    SetLkW {
        ino: Ino,
        lock: Lock,
    },
    /// Sent once, first thing, by a guest that reconnected to a restarted server (its session
    /// was gone): the locks the old server had granted it. Each is taken again unless it now
    /// conflicts; during the server's grace period ordinary lock requests wait for these.
    ReclaimLocks {
        locks: Vec<(Ino, Lock)>,
    },
}

/// A byte-range advisory lock as fcntl(2) describes it; `end` is inclusive.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Lock {
    pub owner: u64,
    pub start: u64,
    pub end: u64,
    /// `F_RDLCK`, `F_WRLCK` or `F_UNLCK`.
    pub typ: i32,
    pub pid: u32,
}

/// Commands the host sends to a guest agent on its control port (vsock port 1025, or a unix
/// socket next to the sandbox's guest socket when the agent runs on an ordinary host). One
/// command per connection, answered by one [`AgentReply`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum AgentCommand {
    /// Mount this attachment now.
    Attach(AttachmentSpec),
    /// Flush and unmount the volume at `path`; `force` detaches it even if busy.
    Detach { path: String, force: bool },
    /// Flush every mount, give up the leases, and make every access wait.
    Hibernate,
    /// Take the leases again and let waiting accesses continue.
    Resume,
    /// Run a program and return its output.
    Exec { argv: Vec<String>, stdin: Vec<u8>, timeout_ms: u64 },
    /// Flush and unmount everything, then power the VM off (exit, outside a VM).
    Shutdown,
    /// What is mounted and in which state.
    Status,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MountStatus {
    pub path: String,
    pub volume: String,
    pub read_only: bool,
    pub session: u64,
    pub hibernated: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum AgentReply {
    Done,
    Status(Vec<MountStatus>),
    Exec { code: i32, stdout: Vec<u8>, stderr: Vec<u8> },
    Failed(FsError),
}

/// What an op does to the server's state: the one classification that the read-only check
/// and exactly-once replay both follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpClass {
    /// Changes the volume: refused on read-only attachments, sequenced for replay.
    Mutation,
    /// Changes locks or the lease, not the volume: sequenced for replay.
    SessionState,
    /// Reads, or changes only this session's own bookkeeping (handles, references).
    Query,
}

impl Op {
    /// Every op is named here on purpose (no wildcard): a new op does not compile until someone
    /// decides what it is.
    pub fn class(&self) -> OpClass {
        match self {
            Op::SetAttr { .. }
            | Op::MkNod { .. }
            | Op::MkDir { .. }
            | Op::Symlink { .. }
            | Op::Link { .. }
            | Op::Unlink { .. }
            | Op::RmDir { .. }
            | Op::Rename { .. }
            | Op::Create { .. }
            | Op::Write { .. }
            | Op::Fallocate { .. }
            | Op::CopyFileRange { .. }
            | Op::SetXattr { .. }
            | Op::RemoveXattr { .. } => OpClass::Mutation,
            Op::SetLk { .. } | Op::SetLkW { .. } | Op::ReclaimLocks { .. } | Op::Flush { .. } | Op::ReleaseLease | Op::Unmounted => {
                OpClass::SessionState
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
            | Op::GetLk { .. } => OpClass::Query,
        }
    }

    /// Whether the server closes the connection after answering: the guest gave its lease up
    /// (hibernation) or ended its session (unmounted in the guest). Named one by one, as above.
    pub fn ends_connection(&self) -> bool {
        match self {
            Op::ReleaseLease | Op::Unmounted => true,
            Op::Lookup { .. }
            | Op::Forget { .. }
            | Op::GetAttr { .. }
            | Op::SetAttr { .. }
            | Op::ReadLink { .. }
            | Op::MkNod { .. }
            | Op::MkDir { .. }
            | Op::Symlink { .. }
            | Op::Link { .. }
            | Op::Unlink { .. }
            | Op::RmDir { .. }
            | Op::Rename { .. }
            | Op::Open { .. }
            | Op::Create { .. }
            | Op::Read { .. }
            | Op::Write { .. }
            | Op::Fallocate { .. }
            | Op::Lseek { .. }
            | Op::CopyFileRange { .. }
            | Op::Fsync { .. }
            | Op::Release { .. }
            | Op::OpenDir { .. }
            | Op::ReadDir { .. }
            | Op::ReleaseDir { .. }
            | Op::StatFs
            | Op::SetXattr { .. }
            | Op::GetXattr { .. }
            | Op::ListXattr { .. }
            | Op::RemoveXattr { .. }
            | Op::Renew
            | Op::Flush { .. }
            | Op::GetLk { .. }
            | Op::SetLk { .. }
            | Op::SetLkW { .. }
            | Op::ReclaimLocks { .. } => false,
        }
    }

    /// Whether this op changes the volume (refused on read-only attachments).
    pub fn is_mutation(&self) -> bool {
        self.class() == OpClass::Mutation
    }

    /// Whether a replay of this op must be recognised: applying it twice would differ from
    /// applying it once.
    pub fn is_sequenced(&self) -> bool {
        self.class() != OpClass::Query
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Empty,
    /// A new reference to an inode (counts as one lookup).
    Entry(Attr),
    Attr(Attr),
    Data(#[serde(with = "bytes")] Vec<u8>),
    Written(u32),
    /// Answer to an appending `Write`: where the bytes landed and the file's attributes after it,
    /// so the writer can bring its cached size and pages up to date.
    Appended {
        written: u32,
        offset: u64,
        attr: Attr,
    },
    Opened {
        fh: u64,
    },
    /// An `Open` that asked for `prefetch`: the whole file, read as the open was answered.
    OpenedWith {
        fh: u64,
        #[serde(with = "bytes")]
        data: Vec<u8>,
    },
    Created {
        attr: Attr,
        fh: u64,
    },
    Dir(Vec<DirEntry>),
    StatFs(StatFs),
    Xattr(Vec<u8>),
    /// Answer to `GetLk`: the conflicting lock, or one with `typ == F_UNLCK`.
    Lock(Lock),
    /// Answer to `Lseek`: the offset found.
    Offset(u64),
    /// Answer to `ReclaimLocks`: the positions of the locks that could not be taken again.
    Reclaimed {
        failed: Vec<u32>,
    },
}

/// Pushed by the server: something this session has cached changed elsewhere.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Attributes and data of an inode changed.
    InvalInode { ino: Ino },
    /// A name in a directory was added, removed or now points elsewhere.
    InvalEntry { parent: Ino, name: Vec<u8> },
    /// A lock on `ino` was released or downgraded: a request that waits for it (sent with
    /// [`Op::SetLkW`] and answered `EAGAIN`) should try again.
    LockFreed { ino: Ino },
    /// Only the attributes of an inode changed, not its data, and these are the new ones: the
    /// host moved its atime on a read or listing (relatime), through this very mount perhaps,
    /// which the kernel does not know. The guest drops the kernel's copy and answers the next
    /// getattr with these.
    Attr { attr: Attr },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum ServerMsg {
    Reply { id: u64, result: Result<Reply, FsError> },
    Notify(Notice),
}

/// File data as one length-prefixed run of bytes: serde's default for `Vec<u8>` is a sequence of
/// single bytes, which costs a call per byte on both sides of a 1 MiB write.
mod bytes {
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde::Serializer;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Bytes;
        impl<'de> Visitor<'de> for Bytes {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut v = Vec::new();
                while let Some(b) = seq.next_element()? {
                    v.push(b);
                }
                Ok(v)
            }
        }
        d.deserialize_byte_buf(Bytes)
    }
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// Encodes a frame body (without the length prefix).
pub fn encode<T: Serialize>(msg: &T) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 4];
    bincode::serde::encode_into_std_write(msg, &mut buf, config())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let len = buf.len() - 4;
    if len > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("frame of {len} bytes exceeds the maximum of {MAX_FRAME}")));
    }
    buf[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(buf)
}

/// Writes one whole frame (length prefix included) in one `write_all`.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> io::Result<()> {
    w.write_all(&encode(msg)?)
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a frame starts.
pub fn read_frame<T: DeserializeOwned>(r: &mut impl Read) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len[..1]) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut len[1..])?;
    let len = frame_len(len)?;
    // The buffer grows with the bytes that actually arrive: a peer that announces a large frame
    // and sends little makes the server hold little.
    let mut body = Vec::new();
    r.take(len as u64).read_to_end(&mut body)?;
    decode_body(&body, len).map(Some)
}

/// [`read_frame`] on an async stream (the host's data plane).
#[cfg(feature = "host")]
pub async fn read_frame_async<T: DeserializeOwned>(r: &mut (impl tokio::io::AsyncRead + Unpin)) -> io::Result<Option<T>> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    if r.read(&mut len[..1]).await? == 0 {
        return Ok(None);
    }
    r.read_exact(&mut len[1..]).await?;
    let len = frame_len(len)?;
    let mut body = Vec::new();
    r.take(len as u64).read_to_end(&mut body).await?;
    decode_body(&body, len).map(Some)
}

fn frame_len(prefix: [u8; 4]) -> io::Result<usize> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("frame of {len} bytes exceeds the maximum of {MAX_FRAME}")));
    }
    Ok(len)
}

fn decode_body<T: DeserializeOwned>(body: &[u8], len: usize) -> io::Result<T> {
    if body.len() < len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("frame of {len} bytes ended after {}", body.len())));
    }
    let (msg, used) = bincode::serde::decode_from_slice(body, config())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("malformed frame: {e}")))?;
    if used != len {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "malformed frame: trailing bytes"));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::Caller;

    #[test]
    fn frames_round_trip() {
        let req = Request {
            id: 7,
            seq: 3,
            caller: Caller::root(),
            op: Op::Write { ino: 5, fh: 1, offset: 9, append: true, data: vec![1, 2, 3] },
        };
        let buf = encode(&req).unwrap();
        let back: Request = read_frame(&mut &buf[..]).unwrap().unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut buf = ((MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
        buf.extend_from_slice(&[0; 16]);
        let err = read_frame::<Request>(&mut &buf[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn garbage_body_is_refused() {
        let mut buf = 8u32.to_le_bytes().to_vec();
        buf.extend_from_slice(&[0xff; 8]);
        assert_eq!(read_frame::<Request>(&mut &buf[..]).unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    proptest::proptest! {
        /// Fuzzing the decoder: arbitrary bytes, and valid frames with bytes flipped, cut or
        /// inserted, are decoded or refused with an error, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let _ = read_frame::<Request>(&mut &bytes[..]);
            let _ = read_frame::<Hello>(&mut &bytes[..]);
            let _ = read_frame::<ServerMsg>(&mut &bytes[..]);
        }

        #[test]
        fn mutated_frames_never_panic_the_decoder(
            ino in proptest::prelude::any::<u64>(),
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            flips in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()), 1..8),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let ops = [
                Op::Write { ino, fh: ino, offset: ino, append: ino % 2 == 0, data: data.clone() },
                Op::Rename { parent: ino, name: data.clone(), new_parent: 1, new_name: data.clone(), flags: ino as u32 },
                Op::SetXattr { ino, name: data.clone(), value: data.clone(), flags: 0 },
                Op::Forget { items: vec![(ino, ino); data.len() % 16] },
            ];
            for op in ops {
                let mut buf = encode(&Request { id: ino, seq: ino, caller: Caller::root(), op }).unwrap();
                for (at, b) in &flips {
                    let i = 4 + at.index(buf.len() - 4);
                    buf[i] ^= b | 1;
                }
                let _ = read_frame::<Request>(&mut &buf[..]);
                // The same body cut short, with its length prefix corrected.
                let keep = 4 + cut.index(buf.len() - 4);
                buf.truncate(keep);
                let n = (keep - 4) as u32;
                buf[..4].copy_from_slice(&n.to_le_bytes());
                let _ = read_frame::<Request>(&mut &buf[..]);
            }
        }
    }

    #[test]
    fn a_frame_that_announces_more_than_it_sends_holds_only_what_arrived() {
        let mut buf = (MAX_FRAME as u32).to_le_bytes().to_vec();
        buf.extend_from_slice(&[0; 100]);
        let err = read_frame::<Request>(&mut &buf[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("ended after 100"), "{err}");
    }

    #[test]
    fn a_vec_claiming_more_than_the_frame_is_refused() {
        // A Write whose data length prefix claims far more bytes than the frame holds.
        let req =
            Request { id: 1, seq: 1, caller: Caller::root(), op: Op::Write { ino: 1, fh: 1, offset: 0, append: false, data: vec![0; 4] } };
        let mut buf = encode(&req).unwrap();
        let n = buf.len();
        // Corrupt the trailing varint length of `data` into a huge u64 marker.
        buf.truncate(n - 5);
        buf.extend_from_slice(&[253, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        let len = (buf.len() - 4) as u32;
        buf[..4].copy_from_slice(&len.to_le_bytes());
        assert!(read_frame::<Request>(&mut &buf[4 - 4..]).is_err());
    }
}

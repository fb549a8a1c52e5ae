//! Byte-stream transports between guest and host: unix sockets, AF_VSOCK, and the
//! Firecracker-style hybrid vsock that the host side of a VM uses.
//!
//! Hybrid vsock (Firecracker, vhost-device-vsock): the VM's vsock device is backed by a unix
//! socket `U` on the host. A guest that connects to CID 2 (the host) port `P` reaches whoever
//! listens on the host unix socket `U_P`; the host reaches a guest listener on port `P` by
//! connecting to `U` and writing `CONNECT P\n`, answered by `OK <port>\n`.
//!
//! Every transport yields a [`Stream`]: a connected stream socket that can be cloned into a
//! reader half and a writer half.

use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The well-known CID of the host, as seen from a guest.
pub const VSOCK_HOST_CID: u32 = 2;
/// The vsock port the host server listens on for guest connections (Firecracker convention:
/// unix socket `<uds>_1024`).
pub const GUEST_SERVER_PORT: u32 = 1024;
/// The vsock port the guest agent listens on for control commands.
pub const AGENT_CONTROL_PORT: u32 = 1025;

/// Where to connect or listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `unix:PATH`
    Unix(PathBuf),
    /// `vsock:CID:PORT` (AF_VSOCK; only inside a VM).
    Vsock { cid: u32, port: u32 },
    /// `hvsock:PATH:PORT`: a host connecting to a guest port through a hybrid-vsock socket.
    Hybrid { uds: PathBuf, port: u32 },
}

impl Endpoint {
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        let bad = || format!("invalid endpoint {s:?}: expected unix:PATH, vsock:CID:PORT or hvsock:PATH:PORT");
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("vsock:") {
            let (cid, port) = rest.split_once(':').ok_or_else(bad)?;
            return Ok(Endpoint::Vsock { cid: cid.parse().map_err(|_| bad())?, port: port.parse().map_err(|_| bad())? });
        }
        if let Some(rest) = s.strip_prefix("hvsock:") {
            let (path, port) = rest.rsplit_once(':').ok_or_else(bad)?;
            return Ok(Endpoint::Hybrid { uds: PathBuf::from(path), port: port.parse().map_err(|_| bad())? });
        }
        Err(bad())
    }

    pub fn connect(&self) -> io::Result<Stream> {
        match self {
            Endpoint::Unix(path) => Ok(Stream::from(UnixStream::connect(path)?)),
            Endpoint::Vsock { cid, port } => vsock_connect(*cid, *port),
            Endpoint::Hybrid { uds, port } => hybrid_connect(uds, *port),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Endpoint::Hybrid { uds, port } => write!(f, "hvsock:{}:{port}", uds.display()),
        }
    }
}

/// A connected stream socket of any family.
#[derive(Debug)]
pub struct Stream {
    file: File,
}

impl Stream {
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(Stream { file: self.file.try_clone()? })
    }

    /// Closes both directions, waking any thread blocked reading this socket.
    pub fn shutdown(&self) {
        // SAFETY: shutdown(2) on a descriptor we own; failure (already closed) is harmless.
        unsafe { libc::shutdown(self.file.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// One write(2) through this descriptor, without needing it mutably (another descriptor of
    /// the socket may be written elsewhere: the caller orders them).
    pub fn write_once(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.file).write(buf)
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        set_timeout(&self.file, libc::SO_RCVTIMEO, t)
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        set_timeout(&self.file, libc::SO_SNDTIMEO, t)
    }
}

fn set_timeout(file: &File, opt: libc::c_int, t: Option<Duration>) -> io::Result<()> {
    let tv = match t {
        Some(d) => libc::timeval { tv_sec: d.as_secs() as libc::time_t, tv_usec: d.subsec_micros() as libc::suseconds_t },
        None => libc::timeval { tv_sec: 0, tv_usec: 0 },
    };
    // SAFETY: setsockopt with a valid timeval of the right size.
    let rc = unsafe {
        libc::setsockopt(
            file.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl From<UnixStream> for Stream {
    fn from(s: UnixStream) -> Stream {
        Stream { file: File::from(OwnedFd::from(s)) }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening socket: unix or AF_VSOCK.
#[derive(Debug)]
pub enum Listener {
    Unix(UnixListener),
    Vsock(OwnedFd),
}

impl Listener {
    /// Binds a unix socket, replacing a stale socket file left by a previous run.
    pub fn bind_unix(path: &Path) -> io::Result<Listener> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(path)?;
            }
        }
        Ok(Listener::Unix(UnixListener::bind(path)?))
    }

    /// Listens on an AF_VSOCK port (inside a VM: the agent's control port).
    pub fn bind_vsock(port: u32) -> io::Result<Listener> {
        let fd = vsock_socket()?;
        let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
        // SAFETY: bind/listen on a socket we own with a correctly sized sockaddr_vm.
        unsafe {
            if libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_vm as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_vm>() as u32,
            ) < 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::listen(fd.as_raw_fd(), 64) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Listener::Vsock(fd))
    }

    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => Ok(Stream::from(l.accept()?.0)),
            Listener::Vsock(fd) => {
                // SAFETY: accept4 on a listening socket; a negative return is an error.
                let c = unsafe { libc::accept4(fd.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
                if c < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: c is a fresh descriptor that nothing else owns.
                Ok(Stream { file: unsafe { File::from_raw_fd(c) } })
            }
        }
    }

    /// Wakes a thread blocked in `accept` (used to stop listener threads).
    pub fn shutdown(&self) {
        let fd = match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Vsock(fd) => fd.as_raw_fd(),
        };
        // SAFETY: shutdown(2) on our own descriptor.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

fn vsock_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid starting value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

fn vsock_connect(cid: u32, port: u32) -> io::Result<Stream> {
    let fd = vsock_socket()?;
    let addr = vsock_addr(cid, port);
    // SAFETY: connect on our socket with a correctly sized sockaddr_vm.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_vm as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_vm>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Stream { file: File::from(fd) })
}

/// Host → guest through a hybrid-vsock socket: `CONNECT <port>\n`, expect `OK ...\n`.
/// Before the guest listens the backend closes the connection without an answer: that is
/// `ConnectionRefused`, for the caller to retry.
fn hybrid_connect(uds: &Path, port: u32) -> io::Result<Stream> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Read the answer byte by byte so that no byte of the stream after it is consumed.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        match s.read(&mut byte)? {
            0 => break,
            _ if byte[0] == b'\n' => {
                s.set_read_timeout(None)?;
                let text = String::from_utf8_lossy(&line);
                if text.starts_with("OK") {
                    return Ok(Stream::from(s));
                }
                return Err(io::Error::new(io::ErrorKind::ConnectionRefused, format!("vsock port {port}: {text}")));
            }
            _ => line.push(byte[0]),
        }
    }
    Err(io::Error::new(io::ErrorKind::ConnectionRefused, format!("vsock port {port}: no listener in the guest")))
}

/// Reads one `\n`-terminated line (helper for text handshakes in tests and tools).
pub fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut s = String::new();
    r.read_line(&mut s)?;
    Ok(s.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(Endpoint::parse("unix:/tmp/a").unwrap(), Endpoint::Unix("/tmp/a".into()));
        assert_eq!(Endpoint::parse("vsock:2:1024").unwrap(), Endpoint::Vsock { cid: 2, port: 1024 });
        assert_eq!(Endpoint::parse("hvsock:/run/v.sock:1025").unwrap(), Endpoint::Hybrid { uds: "/run/v.sock".into(), port: 1025 });
        assert!(Endpoint::parse("tcp:1").is_err());
        assert!(Endpoint::parse("vsock:x:1").is_err());
    }

    #[test]
    fn hybrid_connect_speaks_the_handshake() {
        let dir = std::env::temp_dir().join(format!("vfs-hv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut r = io::BufReader::new(c.try_clone().unwrap());
            assert_eq!(read_line(&mut r).unwrap(), "CONNECT 1025");
            c.write_all(b"OK 1073741824\nhello").unwrap();
        });
        let mut s = Endpoint::Hybrid { uds: path.clone(), port: 1025 }.connect().unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        t.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

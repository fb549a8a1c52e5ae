//! volumefs: durable volumes for microVM sandboxes.
//!
//! The crate is one library with two binaries. The module list is the architecture:
//!
//! - [`fs`]: the filesystem vocabulary (attributes, kinds, errors) shared by every layer.
//! - [`proto`]: the guest ⇄ host wire protocol (framed, multiplexed, versioned).
//! - [`transport`]: unix sockets, AF_VSOCK and Firecracker-style hybrid vsock.
//! - [`logging`]: the one `tracing` setup of every binary.
//! - `engine` (host): POSIX semantics over a `MetaStore` (SQLite) and a `BlobStore` (local files).
//! - `server` (host): guest listeners, sessions, scope checks, the HTTP API.
//! - `guest`: the FUSE adapter and the agent that runs inside the VM.
//! - `cli` (host): the `volumefs` command line.
//!
//! Host-only modules sit behind the `host` feature so the static guest binary never links SQLite
//! or HTTP code; the guest sits behind `guest` so the host-only build does not need fuser.

pub mod fs;
pub mod logging;
pub mod proto;
pub mod transport;

#[cfg(feature = "host")]
pub mod cli;
#[cfg(feature = "host")]
pub mod engine;
#[cfg(feature = "host")]
pub mod server;

#[cfg(feature = "guest")]
pub mod guest;

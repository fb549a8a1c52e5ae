//! Tier 2 of the test plan: real FUSE mounts through the real server over a real socket.
//!
//! Each test starts its own `volumefs server` (see [`harness::Cluster`]), registers sandboxes,
//! attaches volumes, runs `volumefs-guest agent` processes that mount them, and then asserts
//! outcomes through the mounted filesystem with ordinary system calls: bytes read back, errno
//! values, stat fields. Nothing here knows the product's internals: the binaries, the CLI and
//! the mounts are the whole interface.
//!
//! Needs root and `/dev/fuse`; without them the FUSE tests print `SKIPPED` and pass, unless
//! `VOLUMEFS_REQUIRE_FUSE=1` (CI), which turns a missing prerequisite into a failure.
//! `VOLUMEFS_KEEP_TEST_DIRS=1` keeps each test's temporary directory (logs, data) for debugging.
//!
//! Modules, by the behaviour they cover:
//! - [`api_cli`]: the file verbs of `volumefs volume` against the server's HTTP API (no mount).
//! - [`appends`]: O_APPEND from many sandboxes, lock revalidation, a stop with the server down.
//! - [`crash`]: server SIGKILL and SIGTERM under a running workload; nothing acknowledged is lost.
//! - [`differential`]: random operations on a mount and on a local directory, compared step by step.
//! - [`http_api`]: the HTTP API with curl, GNU tar and unzip: ranges, archives, batches, signed
//!   URLs, streaming (1 GiB with flat memory), guests seeing API changes.
//! - [`files`]: reading and writing file contents (overwrite, sparse, truncate, append, large).
//! - [`namespace`]: directories, rename (all flavours), hard links, symlinks, fifos, unlink of
//!   open files.
//! - [`attrs`]: mode/owner/times, xattrs, non-root permission checks.
//! - [`posix`]: sparse files, fallocate, SEEK_DATA/SEEK_HOLE, copy_file_range, atime,
//!   execute-only programs, file handles, listings during renames, overlayfs whiteouts.
//! - [`volumes`]: statfs, durability across agent restarts, quota, the volume CLI.
//! - [`load`]: 64 sandboxes doing mixed work on one server; resources return afterwards.
//! - [`locks`]: fcntl and flock locks across mounts of one volume.
//! - [`lifecycle`]: runtime attach/detach, hibernate/resume, resets, lease expiry, fork.
//! - [`sharing`]: two mounts of one volume, read-only and subpath attachments.
//! - [`tools`]: ordinary shell tools over a tree of files.

#[macro_use]
mod harness;

mod api_cli;
mod appends;
mod attrs;
mod blocks;
mod crash;
mod differential;
mod files;
mod http_api;
mod lifecycle;
mod load;
mod locks;
mod namespace;
mod posix;
mod protocol;
mod scale;
mod sharing;
mod tools;
mod vm;
mod volumes;

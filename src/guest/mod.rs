//! The guest side: the agent that runs inside the VM and the FUSE adapter it mounts volumes with.
//! Nothing here links SQLite or HTTP; the binary is static and small.

pub mod agent;
pub mod client;
pub mod fuse;

//! `xfer-runtime`: the container runtime side of xfer.
//!
//! * [`daemon`] starts and stops a private containerd instance (own root, state and socket).
//! * [`image`] writes OCI images without a registry (busybox-static, host binaries with
//!   their shared libraries) and imports them through containerd's Content, Images,
//!   Snapshots and Diff services.
//! * [`containerd`] creates, checkpoints and restores containers through containerd's API.
//! * [`criu`] probes the CRIU on this host.

pub mod containerd;
pub mod criu;
pub mod daemon;
pub mod error;
pub mod image;
pub mod lazy;
pub mod rootfs;
pub mod unixsock;

pub use error::RuntimeError;

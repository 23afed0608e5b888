//! The one error type of `xfer-runtime`. Variants are named after the operation that failed.

use std::path::PathBuf;

/// An operation of the runtime layer failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Connecting to containerd's socket failed.
    #[error("connect to containerd at {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    /// A containerd API call failed.
    #[error("containerd {op}")]
    Containerd {
        op: String,
        #[source]
        source: tonic::Status,
    },
    /// A local file system operation failed.
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Running a helper program (criu, containerd) failed.
    #[error("run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// CRIU (through runc and containerd) could not checkpoint the task.
    #[error("checkpoint task {id} ({criu_log})")]
    Checkpoint {
        id: String,
        criu_log: String,
        #[source]
        source: tonic::Status,
    },
    /// Capturing or reading the writable-layer diff failed.
    #[error("writable-layer diff of {path}")]
    RootfsDiff {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Something was malformed or missing.
    #[error("{0}")]
    Invalid(String),
    /// A private containerd daemon did not start or stop as expected; `log_tail` holds
    /// the last lines of its log file.
    #[error("containerd daemon: {reason}\n--- tail of the containerd log ---\n{log_tail}")]
    Daemon { reason: String, log_tail: String },
}

//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can fail in the knowledge base. Variants are named after the
/// operation that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KbError {
    /// More distinct hosts than the compact index can number (65 535).
    #[error("too many hosts in the knowledge base (at most {max})")]
    InternHost { max: usize },
    /// Reading the embedded store's file.
    #[error("loading the knowledge base from {path}")]
    Load {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The embedded store's file is not one this version wrote.
    #[error("decoding the knowledge base file {path}: {what}")]
    Decode { path: PathBuf, what: String },
    /// Writing the embedded store's file.
    #[error("persisting the knowledge base to {path}")]
    Persist {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Encoding or decoding a JSON record (etcd values).
    #[error("encoding or decoding a {what} record")]
    Codec {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// Starting a private etcd-server (tests, examples).
    #[error("starting etcd: {what}")]
    StartEtcd {
        what: String,
        #[source]
        source: Option<std::io::Error>,
    },
    /// Connecting to etcd.
    #[error("connecting to etcd at {endpoints:?}")]
    EtcdConnect {
        endpoints: Vec<String>,
        #[source]
        source: etcd_client::Error,
    },
    /// An etcd request (`op` says which).
    #[error("etcd {op}")]
    Etcd {
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    /// Another writer changed a host's sequence number between our read and write.
    #[error("concurrent update of host {host} (sequence {expected} changed)")]
    ApplyConflict { host: String, expected: u64 },
    /// Other writers kept changing a binding's key between our read and our write.
    #[error("concurrent updates of the binding of {home}: gave up")]
    BindingConflict { home: std::net::Ipv4Addr },
    /// A host could not be reached through the transport.
    #[error("reaching host {host}: {what}")]
    Reach { host: String, what: String },
    /// A call to a host or to the knowledge base took too long.
    #[error("{op} at {host} timed out")]
    Timeout { op: &'static str, host: String },
    /// Pushing to the knowledge base failed.
    #[error("pushing {what} of host {host} to the knowledge base")]
    Push {
        host: String,
        what: &'static str,
        #[source]
        source: Box<KbError>,
    },
}

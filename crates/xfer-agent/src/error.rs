//! The one error type of `xfer-agent`.

use std::path::PathBuf;

use xfer_proto::v1::Step;

/// An operation of the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A runtime (containerd/CRIU) operation failed.
    #[error("{} step", step_name(*.step))]
    Runtime {
        step: Step,
        #[source]
        source: xfer_runtime::RuntimeError,
    },
    /// A destination-side runtime operation failed (the source names the step).
    #[error("on the destination")]
    AtDestination {
        #[source]
        source: xfer_runtime::RuntimeError,
    },
    /// Reading a file to send failed.
    #[error("read {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Writing a received file failed.
    #[error("write {path}")]
    WriteFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A zstd frame or digest was malformed.
    #[error("decode frame")]
    Frame(#[source] xfer_store::StoreError),
    /// A received file did not match its announced size or digest.
    #[error("verify {name}: {detail}")]
    Verify { name: String, detail: String },
    /// A chunk was out of order or malformed.
    #[error("bad chunk: {0}")]
    BadChunk(String),
    /// A message failed protocol checks.
    #[error("decode message")]
    Decode(#[source] xfer_proto::ProtoError),
    /// The stream's other end went away.
    #[error("the transfer stream closed early")]
    StreamClosed,
    /// Connecting to a peer agent failed.
    #[error("connect to agent at {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// A call to a peer agent failed; the peer's message carries its own error chain.
    #[error("{} step: {}{}", step_name(*.step), .status.message(), peer_hint(.status))]
    Peer { step: Step, status: tonic::Status },
    /// A migration driven by a remote agent failed; its message names the step and cause.
    #[error("{}", .status.message())]
    Remote { status: tonic::Status },
    /// A chunk store operation failed.
    #[error("chunk store: {what}")]
    Store {
        what: String,
        #[source]
        source: xfer_store::StoreError,
    },
    /// Fetching chunks failed.
    #[error("fetch chunks")]
    Fetch(#[source] crate::chunks::ChunkError),
    /// A knowledge-base message from the wire was malformed.
    #[error("decode knowledge-base message: {what}")]
    DecodeKb { what: String },
    /// Setting up or asking the cluster knowledge base failed.
    #[error("knowledge base: {what}")]
    Kb {
        what: String,
        #[source]
        source: xfer_kb::KbError,
    },
    /// A network operation (container namespace, veth, address) failed.
    #[error("network: {what}")]
    Net {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Setting up TLS failed.
    #[error("TLS: {what}")]
    Tls {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The request was refused before anything was changed.
    #[error("{0}")]
    Refused(String),
}

/// What a transport-level failure of a peer call means to an operator.
fn peer_hint(status: &tonic::Status) -> &'static str {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
            " (the other agent stopped answering: it died or the link is down; the source container keeps running)"
        }
        tonic::Code::DeadlineExceeded => " (the other agent did not answer in time)",
        _ => "",
    }
}

/// Lower-case name of a step, as operators read it.
pub fn step_name(step: Step) -> &'static str {
    match step {
        Step::Unspecified => "migration",
        Step::Validate => "validate",
        Step::Prepare => "prepare",
        Step::Image => "image",
        Step::Freeze => "freeze",
        Step::Checkpoint => "checkpoint",
        Step::RootfsDiff => "writable-layer diff",
        Step::Transfer => "transfer",
        Step::Restore => "restore",
        Step::CleanupSource => "source clean-up",
    }
}

impl AgentError {
    /// The gRPC status that carries this error to a client, with its whole chain.
    pub fn to_status(&self) -> tonic::Status {
        let mut msg = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        match self {
            AgentError::Refused(_) | AgentError::Decode(_) => {
                tonic::Status::failed_precondition(msg)
            }
            AgentError::BadChunk(_) | AgentError::Verify { .. } | AgentError::Frame(_) => {
                tonic::Status::data_loss(msg)
            }
            _ => tonic::Status::internal(msg),
        }
    }
}

//! The one error type of the chunk transport.

use xfer_store::Digest;

use super::fetch::FetchReport;

/// An operation of the chunk transport failed.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The first message carried a protocol version this node does not speak.
    #[error("check protocol version")]
    CheckVersion(#[source] xfer_proto::ProtoError),
    /// A packed id field was not a whole number of 32-byte ids.
    #[error("decode ids: {len} bytes is not a multiple of 32")]
    DecodeIds { len: usize },
    /// A message carried more ids than one message may.
    #[error("decode ids: {count} ids in one message, at most {limit}")]
    TooManyIds { count: usize, limit: usize },
    /// A have-bitmap did not have the size the request implies, or set padding bits.
    #[error("decode bitmap: {got} bytes for {ids} ids (expected {want}, padding bits 0)")]
    DecodeBitmap { got: usize, ids: usize, want: usize },
    /// A chunk of a batch was malformed (id length, raw length, frame size).
    #[error("decode chunk {index} of a batch: {detail}")]
    DecodeChunk { index: usize, detail: String },
    /// A chunk's frame did not decode to its announced length.
    #[error("verify chunk {id}: frame")]
    VerifyFrame {
        id: Digest,
        #[source]
        source: xfer_store::StoreError,
    },
    /// A chunk's bytes did not hash to its id.
    #[error("verify chunk {id}: bytes hash to {got}")]
    VerifyDigest { id: Digest, got: Digest },
    /// The local store could not keep a verified chunk (disk full, I/O error...).
    #[error("store chunk {id}")]
    PutChunk {
        id: Digest,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Connecting to a peer failed.
    #[error("connect to chunk peer {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// A call to a peer failed or its stream was cut; the status carries the peer's chain.
    #[error("chunk peer {endpoint}: {}", .status.message())]
    Call {
        endpoint: String,
        status: tonic::Status,
    },
    /// A peer broke the protocol (a chunk it was not asked for, a stream that ended
    /// without accounting for every id...).
    #[error("chunk peer {peer}: {detail}")]
    Protocol { peer: String, detail: String },
    /// A peer made no progress for too long.
    #[error("chunk peer {peer}: no progress for {secs:.1} s")]
    Stalled { peer: String, secs: f64 },
    /// A want named a source the fetcher has no peer for.
    #[error("source {0:?} is not known to the fetcher")]
    UnknownSource(String),
    /// More distinct sources than one fetch supports.
    #[error("{count} sources in one fetch, at most {limit}")]
    TooManySources { count: usize, limit: usize },
    /// A blocking task (store access) panicked or was cancelled.
    #[error("blocking store task: {0}")]
    Task(String),
    /// The server is serving as many fetch streams as it allows.
    #[error("busy: {streams} fetch streams in flight (limit {limit})")]
    Busy { streams: u32, limit: u32 },
    /// Some chunks could not be fetched from any source (every candidate lacked them,
    /// served them corrupt, or failed). The report says what each source did.
    #[error("{} chunks could not be fetched from any source (first: {})", .missing.len(),
        .missing.first().map(|d| d.to_string()).unwrap_or_default())]
    Incomplete {
        missing: Vec<Digest>,
        report: Box<FetchReport>,
    },
}

impl ChunkError {
    /// The chunk's bytes were wrong (the serving source is to blame, not the link).
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            ChunkError::VerifyFrame { .. } | ChunkError::VerifyDigest { .. }
        )
    }

    /// A local failure that no other source can fix: the fetch stops.
    pub fn is_fatal(&self) -> bool {
        matches!(self, ChunkError::PutChunk { .. } | ChunkError::Task(_))
    }

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
            ChunkError::CheckVersion(_) => tonic::Status::failed_precondition(msg),
            ChunkError::DecodeIds { .. }
            | ChunkError::TooManyIds { .. }
            | ChunkError::DecodeBitmap { .. }
            | ChunkError::DecodeChunk { .. } => tonic::Status::invalid_argument(msg),
            ChunkError::Busy { .. } => tonic::Status::resource_exhausted(msg),
            ChunkError::VerifyFrame { .. } | ChunkError::VerifyDigest { .. } => {
                tonic::Status::data_loss(msg)
            }
            _ => tonic::Status::internal(msg),
        }
    }
}

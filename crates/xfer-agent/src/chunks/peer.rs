//! Sources of chunks: the [`ChunkPeer`] trait and its gRPC implementation.

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use tonic::transport::{Channel, Endpoint};
use xfer_proto::v1::chunks_client::ChunksClient;
use xfer_proto::v1::{FetchRequest, HaveRequest};
use xfer_store::Digest;

use super::wire::{self, Batch, Load, MAX_HAVE_IDS};
use super::ChunkError;

/// The answer to a `have`: one flag per id asked, and the peer's load.
pub type HaveFuture = BoxFuture<'static, Result<(Vec<bool>, Option<Load>), ChunkError>>;

/// A stream of decoded batches; dropping it cancels the peer's work.
pub type BatchStream = BoxStream<'static, Result<Batch, ChunkError>>;

/// A node that may hold chunks.
pub trait ChunkPeer: Send + Sync + std::fmt::Debug + 'static {
    /// For each id, whether the peer holds it; and the peer's load.
    fn have(&self, ids: Vec<Digest>) -> HaveFuture;

    /// Asks for `ids` (at most [`wire::MAX_FETCH_IDS`]) in batches of at most
    /// `max_batch_bytes` of frames. Every requested id comes back once, as a chunk or
    /// as missing; dropping the stream aborts the request.
    fn fetch(
        &self,
        ids: Vec<Digest>,
        max_batch_bytes: u32,
    ) -> BoxFuture<'static, Result<BatchStream, ChunkError>>;
}

/// A peer agent reached over gRPC.
#[derive(Debug, Clone)]
pub struct GrpcPeer {
    endpoint: String,
    client: ChunksClient<Channel>,
}

impl GrpcPeer {
    /// Wraps an existing channel (one channel may carry the agent and chunk services).
    pub fn new(endpoint: impl Into<String>, channel: Channel) -> Self {
        GrpcPeer {
            endpoint: endpoint.into(),
            client: ChunksClient::new(channel)
                .max_decoding_message_size(crate::MAX_MESSAGE)
                .max_encoding_message_size(crate::MAX_MESSAGE),
        }
    }

    fn endpoint(endpoint: &str) -> Result<Endpoint, ChunkError> {
        Ok(Endpoint::from_shared(endpoint.to_string())
            .map_err(|source| ChunkError::Connect {
                endpoint: endpoint.to_string(),
                source,
            })?
            .connect_timeout(std::time::Duration::from_secs(3))
            .tcp_nodelay(true))
    }

    /// Connects now, e.g. to `http://10.77.0.2:7070`.
    pub async fn connect(endpoint: &str) -> Result<Self, ChunkError> {
        let ch = Self::endpoint(endpoint)?
            .connect()
            .await
            .map_err(|source| ChunkError::Connect {
                endpoint: endpoint.to_string(),
                source,
            })?;
        Ok(Self::new(endpoint, ch))
    }

    /// Connects on first use (and again after the connection broke).
    pub fn lazy(endpoint: &str) -> Result<Self, ChunkError> {
        Ok(Self::new(
            endpoint,
            Self::endpoint(endpoint)?.connect_lazy(),
        ))
    }

    fn call_err(&self) -> impl Fn(tonic::Status) -> ChunkError + Send + Sync + 'static {
        let endpoint = self.endpoint.clone();
        move |status| ChunkError::Call {
            endpoint: endpoint.clone(),
            status,
        }
    }
}

impl ChunkPeer for GrpcPeer {
    fn have(&self, ids: Vec<Digest>) -> HaveFuture {
        let mut client = self.client.clone();
        let err = self.call_err();
        async move {
            let mut bits = Vec::with_capacity(ids.len());
            let mut load = None;
            for part in ids.chunks(MAX_HAVE_IDS) {
                let reply = client
                    .have(HaveRequest {
                        version: xfer_proto::PROTOCOL_VERSION as i32,
                        ids: wire::encode_ids(part),
                    })
                    .await
                    .map_err(&err)?
                    .into_inner();
                let (b, l) = wire::decode_have_reply(&reply, part.len())?;
                bits.extend(b);
                load = l.or(load);
            }
            Ok((bits, load))
        }
        .boxed()
    }

    fn fetch(
        &self,
        ids: Vec<Digest>,
        max_batch_bytes: u32,
    ) -> BoxFuture<'static, Result<BatchStream, ChunkError>> {
        let mut client = self.client.clone();
        let err = self.call_err();
        async move {
            let stream = client
                .fetch(FetchRequest {
                    version: xfer_proto::PROTOCOL_VERSION as i32,
                    ids: wire::encode_ids(&ids),
                    max_batch_bytes,
                })
                .await
                .map_err(&err)?
                .into_inner();
            let s: BatchStream = stream
                .map(move |item| item.map_err(&err).and_then(wire::decode_batch))
                .boxed();
            Ok(s)
        }
        .boxed()
    }
}

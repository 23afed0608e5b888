//! The serving side: [`ChunkService`] implements the generated `Chunks` service over
//! any [`ChunkStore`].
//!
//! `Fetch` reads the store on a blocking thread and hands batches to a bounded
//! channel ([`ServiceConfig::queue_batches`] deep) that the response stream drains, so
//! HTTP/2 flow control paces the reads: a slow reader stops the disk after a few
//! batches, and a client that drops the stream (RST_STREAM) closes the channel, which
//! ends the reader before its next chunk.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::debug;
use xfer_proto::v1::chunks_server::{Chunks, ChunksServer};
use xfer_proto::v1::{ChunkBatch, FetchRequest, HaveReply, HaveRequest, PeerLoad};
use xfer_store::Digest;

use super::wire::{self, Batcher, Load};
use super::{ChunkError, ChunkStore};

/// How a [`ChunkService`] serves.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Batches read ahead of the network per stream (the bounded channel's depth).
    pub queue_batches: usize,
    /// Most fetch streams served at once; more are refused with RESOURCE_EXHAUSTED
    /// (the fetcher then tries another source).
    pub max_streams: u32,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            queue_batches: 2,
            max_streams: 64,
        }
    }
}

/// Bytes served per second over a sliding window of one to two seconds.
#[derive(Debug)]
struct Rate {
    start: Instant,
    sec: u64,
    cur: u64,
    prev: u64,
}

impl Rate {
    fn roll(&mut self, now: Instant) -> f64 {
        let t = now.saturating_duration_since(self.start).as_secs_f64();
        let sec = t as u64;
        if sec == self.sec + 1 {
            self.prev = self.cur;
            self.cur = 0;
        } else if sec > self.sec + 1 {
            self.prev = 0;
            self.cur = 0;
        }
        self.sec = self.sec.max(sec);
        t - sec as f64
    }
}

/// A node's serving load: open fetch streams and recent bytes per second.
#[derive(Debug)]
pub struct LoadMeter {
    streams: AtomicU32,
    rate: Mutex<Rate>,
}

impl Default for LoadMeter {
    fn default() -> Self {
        LoadMeter {
            streams: AtomicU32::new(0),
            rate: Mutex::new(Rate {
                start: Instant::now(),
                sec: 0,
                cur: 0,
                prev: 0,
            }),
        }
    }
}

impl LoadMeter {
    fn add_bytes(&self, n: usize) {
        let mut r = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        r.roll(Instant::now());
        r.cur += n as u64;
    }

    /// The load now.
    pub fn load(&self) -> Load {
        let mut r = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        let frac = r.roll(Instant::now());
        let bps = (r.prev + r.cur) as f64 / (1.0 + frac);
        Load {
            fetch_streams: self.streams.load(Ordering::Relaxed),
            served_bytes_per_sec: bps as u64,
        }
    }

    fn peer_load(&self) -> Option<PeerLoad> {
        Some(self.load().into())
    }
}

/// Counts one fetch stream while alive.
struct StreamGuard(Arc<LoadMeter>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves chunks of a [`ChunkStore`] (the `Chunks` gRPC service).
pub struct ChunkService<S: ChunkStore> {
    store: Arc<S>,
    meter: Arc<LoadMeter>,
    cfg: ServiceConfig,
}

impl<S: ChunkStore> std::fmt::Debug for ChunkService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkService")
            .field("load", &self.meter.load())
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl<S: ChunkStore> Clone for ChunkService<S> {
    fn clone(&self) -> Self {
        ChunkService {
            store: self.store.clone(),
            meter: self.meter.clone(),
            cfg: self.cfg.clone(),
        }
    }
}

impl<S: ChunkStore> ChunkService<S> {
    /// Serves `store` with the default configuration.
    pub fn new(store: Arc<S>) -> Self {
        Self::with_config(store, ServiceConfig::default())
    }

    /// Serves `store` with `cfg`.
    pub fn with_config(store: Arc<S>, cfg: ServiceConfig) -> Self {
        ChunkService {
            store,
            meter: Arc::new(LoadMeter::default()),
            cfg,
        }
    }

    /// The service's load meter (what it reports to clients).
    pub fn meter(&self) -> Arc<LoadMeter> {
        self.meter.clone()
    }

    /// The tonic server, with xfer's message size limits.
    pub fn into_server(self) -> ChunksServer<Self> {
        ChunksServer::new(self)
            .max_decoding_message_size(crate::MAX_MESSAGE)
            .max_encoding_message_size(crate::MAX_MESSAGE)
    }
}

/// Reads `ids` from `store` into bounded batches on `tx`, until done or until the
/// receiver is gone. Runs on a blocking thread.
fn read_batches<S: ChunkStore>(
    store: &S,
    ids: Vec<Digest>,
    max_batch_bytes: usize,
    meter: &LoadMeter,
    tx: &mpsc::Sender<Result<ChunkBatch, Status>>,
) {
    let send = |mut b: ChunkBatch| -> bool {
        let bytes: usize = b.chunks.iter().map(|c| c.zstd.len()).sum();
        meter.add_bytes(bytes);
        b.load = meter.peer_load();
        tx.blocking_send(Ok(b)).is_ok()
    };
    let mut batcher = Batcher::new(max_batch_bytes);
    let n = ids.len();
    for (i, id) in ids.into_iter().enumerate() {
        if tx.is_closed() {
            debug!(
                read = i,
                of = n,
                "fetch stream dropped by the client; reader stops"
            );
            return;
        }
        let ready = match store.get_compressed(&id) {
            Some((frame, raw_len)) => batcher.push_chunk(&id, frame, raw_len),
            None => batcher.push_missing(&id),
        };
        if let Some(b) = ready {
            if !send(b) {
                return;
            }
        }
        if batcher.full() {
            if let Some(b) = batcher.take() {
                if !send(b) {
                    return;
                }
            }
        }
    }
    if let Some(b) = batcher.take() {
        send(b);
    }
}

#[tonic::async_trait]
impl<S: ChunkStore> Chunks for ChunkService<S> {
    async fn have(&self, req: Request<HaveRequest>) -> Result<Response<HaveReply>, Status> {
        let ids = wire::decode_have_request(req.get_ref()).map_err(|e| e.to_status())?;
        let store = self.store.clone();
        let bits = tokio::task::spawn_blocking(move || store.has_many(&ids))
            .await
            .map_err(|e| ChunkError::Task(e.to_string()).to_status())?;
        Ok(Response::new(HaveReply {
            bitmap: wire::encode_bitmap(&bits),
            load: self.meter.peer_load(),
        }))
    }

    type FetchStream = ReceiverStream<Result<ChunkBatch, Status>>;

    async fn fetch(
        &self,
        req: Request<FetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        let order = wire::decode_fetch_request(req.get_ref()).map_err(|e| e.to_status())?;
        let streams = self.meter.streams.fetch_add(1, Ordering::Relaxed) + 1;
        let guard = StreamGuard(self.meter.clone());
        if streams > self.cfg.max_streams {
            return Err(ChunkError::Busy {
                streams: streams - 1,
                limit: self.cfg.max_streams,
            }
            .to_status());
        }
        let (tx, rx) = mpsc::channel(self.cfg.queue_batches.max(1));
        let store = self.store.clone();
        let meter = self.meter.clone();
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            read_batches(&*store, order.ids, order.max_batch_bytes, &meter, &tx);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

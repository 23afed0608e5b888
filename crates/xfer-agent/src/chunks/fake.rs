//! A [`ChunkPeer`] for tests and benchmarks: serves a [`MemStore`] in-process and can
//! be slow, cut its stream after N chunks, lack chunks (leave them out of its store),
//! serve corrupt bytes, or be down. It records every request it gets.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use xfer_proto::v1::ChunkBatch;
use xfer_store::Digest;

use super::peer::{BatchStream, ChunkPeer, HaveFuture};
use super::wire::{self, Batcher, Load};
use super::{ChunkError, ChunkStore, MemStore};

/// How a [`FakePeer`] misbehaves.
#[derive(Debug, Clone, Default)]
pub struct FakeBehavior {
    /// Delay before the first batch of a stream (and of a `have` reply).
    pub latency: Duration,
    /// Time to serve one chunk (slept once per batch, for the batch's chunks).
    pub per_chunk: Duration,
    /// After this many chunks served in total, the stream in progress is cut with an
    /// error (once; the field is then cleared).
    pub fail_after: Option<u64>,
    /// Chunks served with a flipped byte.
    pub corrupt: HashSet<Digest>,
    /// Every call fails and open streams break (a killed node).
    pub down: bool,
}

#[derive(Debug)]
struct Inner {
    name: String,
    store: Arc<MemStore>,
    behavior: Mutex<FakeBehavior>,
    requests: Mutex<Vec<Vec<Digest>>>,
    served: AtomicU64,
    pushed: AtomicU64,
    cancelled: AtomicU64,
    streams: AtomicU32,
}

/// An in-process chunk source; clones share state.
#[derive(Debug, Clone)]
pub struct FakePeer(Arc<Inner>);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Active(Arc<Inner>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl FakePeer {
    /// A well-behaved peer named `name` serving `store`.
    pub fn new(name: impl Into<String>, store: Arc<MemStore>) -> Self {
        FakePeer(Arc::new(Inner {
            name: name.into(),
            store,
            behavior: Mutex::new(FakeBehavior::default()),
            requests: Mutex::new(Vec::new()),
            served: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            streams: AtomicU32::new(0),
        }))
    }

    /// Sets the behaviour (builder style).
    pub fn with(self, f: impl FnOnce(&mut FakeBehavior)) -> Self {
        self.set(f);
        self
    }

    /// Changes the behaviour now (open streams see it at their next chunk).
    pub fn set(&self, f: impl FnOnce(&mut FakeBehavior)) {
        f(&mut lock(&self.0.behavior));
    }

    /// Makes every call fail from now on, open streams included.
    pub fn kill(&self) {
        self.set(|b| b.down = true);
    }

    /// The ids of every fetch request received, in order.
    pub fn requests(&self) -> Vec<Vec<Digest>> {
        lock(&self.0.requests).clone()
    }

    /// How many ids were requested in total (over all fetch requests).
    pub fn requested_ids(&self) -> usize {
        lock(&self.0.requests).iter().map(Vec::len).sum()
    }

    /// Chunks delivered (in batches that were sent).
    pub fn served(&self) -> u64 {
        self.0.served.load(Ordering::Relaxed)
    }

    /// Streams the client dropped before their end.
    pub fn cancelled(&self) -> u64 {
        self.0.cancelled.load(Ordering::Relaxed)
    }

    /// Streams open now.
    pub fn open_streams(&self) -> u32 {
        self.0.streams.load(Ordering::Relaxed)
    }

    fn down_err(name: &str) -> ChunkError {
        ChunkError::Call {
            endpoint: name.to_string(),
            status: tonic::Status::unavailable("the fake peer is down"),
        }
    }
}

impl Inner {
    fn behavior(&self) -> FakeBehavior {
        lock(&self.behavior).clone()
    }

    fn load(&self) -> Load {
        Load {
            fetch_streams: self.streams.load(Ordering::Relaxed),
            served_bytes_per_sec: 0,
        }
    }

    /// Sends one batch after the serving delay; false when the client is gone.
    async fn send(
        &self,
        tx: &mpsc::Sender<Result<wire::Batch, ChunkError>>,
        mut b: ChunkBatch,
    ) -> bool {
        let delay = self.behavior().per_chunk * b.chunks.len() as u32;
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = tx.closed() => return false,
        }
        b.load = Some(self.load().into());
        let n = b.chunks.len() as u64;
        // Through the real decoder, as a gRPC peer would.
        let decoded = wire::decode_batch(b);
        if tx.send(decoded).await.is_err() {
            return false;
        }
        self.served.fetch_add(n, Ordering::Relaxed);
        true
    }

    async fn produce(
        self: Arc<Self>,
        ids: Vec<Digest>,
        max_batch: usize,
        tx: mpsc::Sender<Result<wire::Batch, ChunkError>>,
    ) {
        let _active = Active(self.clone());
        let latency = self.behavior().latency;
        tokio::select! {
            _ = tokio::time::sleep(latency) => {}
            _ = tx.closed() => {
                self.cancelled.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let mut batcher = Batcher::new(max_batch);
        for id in ids {
            let beh = self.behavior();
            if beh.down {
                let _ = tx.send(Err(FakePeer::down_err(&self.name))).await;
                return;
            }
            let ready = match self.store.get_compressed(&id) {
                Some((mut frame, raw_len)) => {
                    if beh.corrupt.contains(&id) {
                        let mid = frame.len() / 2;
                        match frame.get_mut(mid) {
                            Some(b) => *b ^= 0x5a,
                            None => frame.push(0),
                        }
                    }
                    self.pushed.fetch_add(1, Ordering::Relaxed);
                    batcher.push_chunk(&id, frame, raw_len)
                }
                None => batcher.push_missing(&id),
            };
            if let Some(b) = ready {
                if !self.send(&tx, b).await {
                    self.cancelled.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            let cut = {
                let mut b = lock(&self.behavior);
                match b.fail_after {
                    Some(n) if self.pushed.load(Ordering::Relaxed) >= n => {
                        b.fail_after = None;
                        true
                    }
                    _ => false,
                }
            };
            if cut || batcher.full() {
                if let Some(b) = batcher.take() {
                    if !self.send(&tx, b).await {
                        self.cancelled.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
            if cut {
                let _ = tx
                    .send(Err(ChunkError::Call {
                        endpoint: self.name.clone(),
                        status: tonic::Status::unavailable("the fake peer cut the stream"),
                    }))
                    .await;
                return;
            }
        }
        if let Some(b) = batcher.take() {
            if !self.send(&tx, b).await {
                self.cancelled.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl ChunkPeer for FakePeer {
    fn have(&self, ids: Vec<Digest>) -> HaveFuture {
        let inner = self.0.clone();
        async move {
            let beh = inner.behavior();
            tokio::time::sleep(beh.latency).await;
            if beh.down {
                return Err(FakePeer::down_err(&inner.name));
            }
            Ok((inner.store.has_many(&ids), Some(inner.load())))
        }
        .boxed()
    }

    fn fetch(
        &self,
        ids: Vec<Digest>,
        max_batch_bytes: u32,
    ) -> BoxFuture<'static, Result<BatchStream, ChunkError>> {
        let inner = self.0.clone();
        async move {
            if inner.behavior().down {
                return Err(FakePeer::down_err(&inner.name));
            }
            lock(&inner.requests).push(ids.clone());
            let max_batch = match max_batch_bytes as usize {
                0 => wire::DEFAULT_BATCH_BYTES,
                n => n.clamp(wire::MIN_BATCH_BYTES, wire::MAX_BATCH_BYTES),
            };
            inner.streams.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(inner.produce(ids, max_batch, tx));
            let s: BatchStream = ReceiverStream::new(rx).boxed();
            Ok(s)
        }
        .boxed()
    }
}

//! What the chunk transport needs from a chunk store, and an in-memory store.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use xfer_store::{frame, Digest};

use super::ChunkError;

/// A synchronous chunk store, as the chunk transport sees it. Called from blocking
/// threads (`spawn_blocking`), never from async code directly.
pub trait ChunkStore: Send + Sync + 'static {
    /// For each id, whether the store holds it.
    fn has_many(&self, ids: &[Digest]) -> Vec<bool>;

    /// The stored zstd frame of `id` and its decoded size, exactly as stored; `None`
    /// when the chunk is missing or the store found it corrupt.
    fn get_compressed(&self, id: &Digest) -> Option<(Vec<u8>, u32)>;

    /// Verifies that `frame` decodes to `raw_len` bytes hashing to `id`, then keeps it.
    /// Verification failures are [`ChunkError::is_corrupt`]; anything else (I/O) is
    /// [`ChunkError::PutChunk`].
    fn put_verified(&self, id: &Digest, frame: &[u8], raw_len: u32) -> Result<(), ChunkError>;

    /// [`ChunkStore::put_verified`] for a batch of chunks (id, frame, decoded size),
    /// which a store may make durable together; one result per chunk, in order.
    fn put_verified_many(&self, chunks: &[(Digest, &[u8], u32)]) -> Vec<Result<(), ChunkError>> {
        chunks
            .iter()
            .map(|(id, frame, raw_len)| self.put_verified(id, frame, *raw_len))
            .collect()
    }
}

/// Decodes `frame` (exactly `raw_len` bytes, at most `MAX_FRAME`) and checks that the
/// bytes hash to `id`; returns the bytes.
pub fn verify_frame(id: &Digest, frame: &[u8], raw_len: u32) -> Result<Vec<u8>, ChunkError> {
    let data = frame::decode(frame, raw_len as usize)
        .map_err(|source| ChunkError::VerifyFrame { id: *id, source })?;
    let got = Digest::of(&data);
    if got != *id {
        return Err(ChunkError::VerifyDigest { id: *id, got });
    }
    Ok(data)
}

/// An in-memory [`ChunkStore`] (tests, benchmarks, small caches). Verifies on put;
/// serves what it holds as is (so a test can plant a corrupt frame with
/// [`MemStore::insert_unchecked`]).
#[derive(Debug, Default)]
pub struct MemStore {
    map: Mutex<HashMap<Digest, (Vec<u8>, u32)>>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Digest, (Vec<u8>, u32)>> {
        // A panic while holding the lock cannot leave the map half-updated (single
        // inserts), so a poisoned lock is still usable.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Compresses and keeps `data` (at most `MAX_FRAME` bytes); returns its id.
    pub fn insert(&self, data: &[u8]) -> Result<Digest, xfer_store::StoreError> {
        let id = Digest::of(data);
        let f = frame::encode(data)?;
        self.lock().insert(id, (f, data.len() as u32));
        Ok(id)
    }

    /// Keeps `frame` under `id` without any check (to plant corrupt chunks in tests).
    pub fn insert_unchecked(&self, id: Digest, frame: Vec<u8>, raw_len: u32) {
        self.lock().insert(id, (frame, raw_len));
    }

    /// Forgets `id`.
    pub fn remove(&self, id: &Digest) -> bool {
        self.lock().remove(id).is_some()
    }

    /// Number of chunks held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Whether `id` is held.
    pub fn contains(&self, id: &Digest) -> bool {
        self.lock().contains_key(id)
    }

    /// The decoded bytes of `id`, verified.
    pub fn read(&self, id: &Digest) -> Option<Result<Vec<u8>, ChunkError>> {
        let (f, n) = self.lock().get(id).cloned()?;
        Some(verify_frame(id, &f, n))
    }

    /// The ids held, in no particular order.
    pub fn ids(&self) -> Vec<Digest> {
        self.lock().keys().copied().collect()
    }
}

impl ChunkStore for MemStore {
    fn has_many(&self, ids: &[Digest]) -> Vec<bool> {
        let map = self.lock();
        ids.iter().map(|id| map.contains_key(id)).collect()
    }

    fn get_compressed(&self, id: &Digest) -> Option<(Vec<u8>, u32)> {
        self.lock().get(id).cloned()
    }

    fn put_verified(&self, id: &Digest, frame: &[u8], raw_len: u32) -> Result<(), ChunkError> {
        verify_frame(id, frame, raw_len)?;
        self.lock().insert(*id, (frame.to_vec(), raw_len));
        Ok(())
    }
}
